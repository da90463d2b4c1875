"""Draft tokens for speculative decoding: copied from the context (prompt lookup), or written by a small draft
model that shares the served model's tokenizer.

The draft model lives on rank 0 only. It decodes greedily from a KV cache per request (one batched cache for all of
them), which follows what the request has really emitted: each step cuts it back to the longest prefix it shares
with the request's tokens and feeds it the rest. The other ranks receive rank 0's drafts over the ring (every rank
must feed the same tokens to its layers), so a draft-model step costs them one message.

A deterministic draft keeps seeded sampling's distribution under speculative.judge's acceptance rule, whichever
model wrote it.
"""

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache, trim_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_model, load_tokenizer

from shardline.engine import protocol
from shardline.engine.pipeline import trimmable

MATCH_MIN, MATCH_MAX = 1, 3  # n-gram lengths tried for the lookup, longest first


def lookup(tokens: list[int], k: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix (MATCH_MAX down to
    MATCH_MIN tokens) of `tokens`; [] when the suffix never occurred before."""
    for n in range(min(MATCH_MAX, len(tokens) - 1), MATCH_MIN - 1, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == tail:
                return tokens[start + n : start + n + k]
    return []


class PromptLookup:
    """Drafts from each row's own context: every rank computes the same ones."""

    def propose(self, uids: list[int], sequences: list[list[int]], ks: list[int]) -> list[list[int]]:
        return [lookup(tokens, k) if k else [] for tokens, k in zip(sequences, ks, strict=True)]

    def forget(self, uid: int) -> None:
        pass

    def clear(self) -> None:
        pass


CATCH_UP = 32  # a row further behind than this many tokens catches up alone, not padding the whole batch's pass


class DraftModel:
    """Drafts written by a small model on rank 0 (`model` None on the other ranks, which receive them).

    The rows of the requests it drafts for share one batched KV cache, so each draft position is one forward pass
    for all of them: a row joins with its prompt prefilled alone (in chunks), and each step every row is cut back to
    what it shares with its request's tokens, fed the rest (right-padded to the longest, the padding then dropped),
    and decodes its drafts greedily."""

    def __init__(self, model: nn.Module | None, group: mx.distributed.Group | None, prefill_step: int) -> None:
        self.model = model
        self.group = group
        self.prefill_step = prefill_step
        self.order: list[int] = []  # request uid of each row of `caches`
        self.held: list[list[int]] = []  # the tokens each row's cache holds
        self.caches: list[BatchKVCache] | None = None

    def propose(self, uids: list[int], sequences: list[list[int]], ks: list[int]) -> list[list[int]]:
        drafts = self.write(uids, sequences, ks) if self.model is not None else []
        width = max(ks, default=0)
        if self.group is None or width == 0:  # every rank knows the ks alike
            return drafts or [[] for _ in ks]
        # 0 = no token: rank 0's drafts are sent shifted by one, the other ranks add zeros
        flat = [t + 1 for d in drafts for t in [*d, *[-1] * (width - len(d))]] if self.model is not None else None
        shared = protocol.share(self.group, flat, len(ks) * width)
        return [[t - 1 for t in shared[i * width : (i + 1) * width] if t] for i in range(len(ks))]

    def write(self, uids: list[int], sequences: list[list[int]], ks: list[int]) -> list[list[int]]:
        """Up to k greedy tokens after each row's tokens (`ks[i]`, 0 = none)."""
        assert self.model is not None
        wanted = {uid: (tokens, k) for uid, tokens, k in zip(uids, sequences, ks, strict=True) if k}
        if not wanted:
            return [[] for _ in uids]
        self.admit(wanted)
        caches = self.caches
        assert caches is not None
        tokens = [wanted[uid][0] for uid in self.order]
        common = [min(shared_prefix(held, t), len(t) - 1) for held, t in zip(self.held, tokens, strict=True)]
        drop_positions(caches, [len(held) - n for held, n in zip(self.held, common, strict=True)])
        pending = [t[n:] for t, n in zip(tokens, common, strict=True)]
        width = max(len(p) for p in pending)
        logits = self.model(mx.array([[*p, *[0] * (width - len(p))] for p in pending]), cache=caches)
        last = mx.stack([logits[i, len(p) - 1] for i, p in enumerate(pending)])
        drop_positions(caches, [width - len(p) for p in pending])
        written = [[t] for t in mx.argmax(last, axis=-1).tolist()]
        for _ in range(max(k for _, k in wanted.values()) - 1):
            logits = self.model(mx.array([[w[-1]] for w in written]), cache=caches)
            for w, t in zip(written, mx.argmax(logits[:, -1], axis=-1).tolist(), strict=True):
                w.append(t)
        self.held = [[*t, *w[:-1]] for t, w in zip(tokens, written, strict=True)]  # all but the last were fed
        by_uid = {uid: w[: wanted[uid][1]] for uid, w in zip(self.order, written, strict=True)}
        return [by_uid.get(uid, []) for uid in uids]

    def admit(self, wanted: dict[int, tuple[list[int], int]]) -> None:
        """Rows for exactly the `wanted` requests: new ones (and rows far behind theirs) prefilled alone."""
        assert self.model is not None

        def close(i: int) -> bool:  # wanted, and no further behind than CATCH_UP
            tokens = wanted.get(self.order[i], ([], 0))[0]
            return bool(tokens) and len(tokens) - shared_prefix(self.held[i], tokens) <= CATCH_UP

        stay = [i for i in range(len(self.order)) if close(i)]
        behind = {self.order[i]: i for i in range(len(self.order)) if self.order[i] in wanted and i not in stay}
        alone = {uid: ([c.extract(i) for c in self.caches or []], self.held[i]) for uid, i in behind.items()}
        self.keep(stay)
        for uid, (tokens, _) in wanted.items():
            if uid in self.order:
                continue
            cache, held = alone.get(uid) or (make_prompt_cache(self.model), [])
            common = shared_prefix(held, tokens[:-1])
            if len(held) > common:
                trim_prompt_cache(cache, len(held) - common)
            for start in range(common, len(tokens) - 1, self.prefill_step):  # all but the last: fed with the batch
                self.model(mx.array([tokens[start : min(start + self.prefill_step, len(tokens) - 1)]]), cache=cache)
                mx.eval([c.state for c in cache])
            row = [BatchKVCache.merge([c]) for c in cache]
            if self.caches is None:
                self.caches = row
            else:
                for batched, one in zip(self.caches, row, strict=True):
                    batched.extend(one)
            self.order.append(uid)
            self.held.append(tokens[:-1])

    def keep(self, rows: list[int]) -> None:
        if len(rows) == len(self.order):
            return
        self.order = [self.order[i] for i in rows]
        self.held = [self.held[i] for i in rows]
        if not rows:
            self.caches = None
        for cache in self.caches or []:
            cache.filter(mx.array(rows))

    def forget(self, uid: int) -> None:
        if uid in self.order:
            self.keep([i for i, u in enumerate(self.order) if u != uid])

    def clear(self) -> None:
        self.keep([])


Drafter = PromptLookup | DraftModel


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class DraftRefused(ValueError):
    """The draft model cannot draft for this model."""


def load_draft_model(path: Path, tokenizer: TokenizerWrapper) -> nn.Module:
    """The draft model at `path`, checked against the served model's tokenizer; DraftRefused when it cannot
    serve as one (another vocabulary, caches that cannot be cut back)."""
    model, config = load_model(path)
    own = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    if own.get_vocab() != tokenizer.get_vocab():
        raise DraftRefused(
            f"the draft model at {path.name} has another vocabulary ({len(own.get_vocab())} tokens) than the "
            f"served model ({len(tokenizer.get_vocab())}): its tokens would mean other text"
        )
    if not trimmable(model):
        raise DraftRefused(f"the draft model at {path.name} keeps caches that cannot be cut back (a sliding "
                           "window or recurrent layers): rejected drafts could not be dropped")  # fmt: skip
    return model


def drop_positions(caches: list[Any], drop: list[int]) -> None:
    """Remove the last `drop[i]` positions of row i from every BatchKVCache: trim what all rows drop, and roll each
    row's extra right into its left padding (mlx_lm's own `finalize` for right-padded prompts)."""
    least = min(drop)
    extra = [d - least for d in drop]
    for cache in caches:
        if least:
            cache.trim(least)
        if any(extra):
            cache._right_padding = mx.array(extra)
            cache.finalize()
