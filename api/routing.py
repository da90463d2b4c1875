"""Which ready instance of a model takes a request: the one most likely to hold its longest prefix in its prefix
cache, unless that one is clearly busier than the least loaded (then the least loaded).

Every runner keeps the KV state of the requests it finished, so a conversation's next turn, sent where its last
turn went, computes only what is new. The API cannot see those caches; it remembers instead, per instance and
bounded, the prefixes of the prompts it sent there: chained hashes, one per message (or per chunk of a plain
prompt), each naming everything before it. A client's own conversation key (`prompt_cache_key`, `user`,
Anthropic's `metadata.user_id`) keeps a conversation together even where its messages change.
"""

import hashlib
import json
from collections import Counter, OrderedDict
from typing import Any

from workflows.serve import InstanceStatus

PREFIXES_KEPT = 4096  # per instance endpoint
KEYS_KEPT = 4096
ENDPOINTS_KEPT = 256
PROMPT_CHUNK = 256  # characters of a plain prompt per prefix


def prefixes(body: dict[str, Any]) -> list[str]:
    """The request's prompt as chained hashes, shortest first: the tools and template options open it (they are
    rendered first), then one hash per message, or per PROMPT_CHUNK characters of a plain prompt. The leading
    system messages get none of their own: a system prompt that every conversation shares must not pull every
    new conversation to one instance; the first hash covers them and the first message after them."""
    chain = hashlib.blake2b(digest_size=16)
    chain.update(json.dumps([body.get("tools"), body.get("chat_template_kwargs")], sort_keys=True).encode())
    head = 0
    if body.get("messages") is not None:
        messages = body["messages"]
        pieces = [json.dumps(m, sort_keys=True) for m in messages]
        while head < len(messages) - 1 and messages[head].get("role") in ("system", "developer"):
            head += 1
    else:
        prompt = str(body.get("prompt") or "")
        pieces = [prompt[i : i + PROMPT_CHUNK] for i in range(0, len(prompt), PROMPT_CHUNK)]
    out = []
    for n, piece in enumerate(pieces):
        chain.update(piece.encode())
        if n >= head:
            out.append(chain.hexdigest())
    return out


def endpoint_of(instance: InstanceStatus) -> str:
    return str(instance.endpoint)


class Balancer:
    """Requests this API has open on each runner endpoint, and what it sent where. `slack`: how many more in
    flight than the least loaded an instance may have and still get the requests whose prefix it holds (-1: none,
    every request goes to the least loaded)."""

    def __init__(self, slack: int) -> None:
        self.slack = slack
        self.counts: Counter[str] = Counter()
        self.seen: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()  # endpoint -> prefixes sent there
        self.keys: OrderedDict[str, str] = OrderedDict()  # conversation key -> endpoint
        self.batch: OrderedDict[str, int] = OrderedDict()  # endpoint -> requests its runner decodes together

    def least_busy(self, ready: list[InstanceStatus]) -> InstanceStatus:
        return min(ready, key=lambda i: self.counts[endpoint_of(i)])

    def depth(self, instance: InstanceStatus, chain: list[str], key: str | None) -> int:
        """How much of the prompt this instance was sent before: prefixes matched; the whole, for its key."""
        endpoint = endpoint_of(instance)
        if key is not None and self.keys.get(key) == endpoint:
            return len(chain) + 1
        seen = self.seen.get(endpoint, {})
        return next((n for n in range(len(chain), 0, -1) if chain[n - 1] in seen), 0)

    def learn(self, endpoint: str, max_batch: object) -> None:
        if isinstance(max_batch, int) and max_batch > 0:
            self.batch[endpoint] = max_batch
            trim(self.batch, ENDPOINTS_KEPT)

    def choose(self, ready: list[InstanceStatus], chain: list[str], key: str | None = None) -> InstanceStatus:
        """Clearly busier: `slack` more in flight than the least loaded, or a full batch (a request sent there
        would wait its turn while another instance has room)."""
        least = self.least_busy(ready)
        depth, _, affine = max(((self.depth(i, chain, key), -self.counts[endpoint_of(i)], i) for i in ready),
                               key=lambda d: d[:2])  # fmt: skip
        if depth == 0 or affine is least:
            return least
        endpoint = endpoint_of(affine)
        busier = self.counts[endpoint] - self.counts[endpoint_of(least)]
        full = self.counts[endpoint] >= self.batch.get(endpoint, self.counts[endpoint] + 1)
        return affine if busier <= self.slack and not full else least

    def pick(self, ready: list[InstanceStatus], chain: list[str], key: str | None = None) -> InstanceStatus:
        """The instance for a request, counted in flight from now on (`release` ends that) and remembered as
        holding its prefixes."""
        chosen = self.choose(ready, chain, key)
        endpoint = endpoint_of(chosen)
        self.counts[endpoint] += 1
        seen = self.seen.setdefault(endpoint, OrderedDict())
        self.seen.move_to_end(endpoint)
        for prefix in chain:
            seen[prefix] = None
            seen.move_to_end(prefix)
        trim(seen, PREFIXES_KEPT)
        trim(self.seen, ENDPOINTS_KEPT)
        if key is not None:
            self.keys[key] = endpoint
            self.keys.move_to_end(key)
            trim(self.keys, KEYS_KEPT)
        return chosen

    def hold(self, instance: InstanceStatus) -> InstanceStatus:
        """`instance`, counted in flight from now on (chosen by other means than `pick`)."""
        self.counts[endpoint_of(instance)] += 1
        return instance

    def release(self, endpoint: str) -> None:
        self.counts[endpoint] -= 1
        if self.counts[endpoint] <= 0:
            del self.counts[endpoint]


def trim(kept: OrderedDict[str, Any], size: int) -> None:
    while len(kept) > size:
        kept.popitem(last=False)
