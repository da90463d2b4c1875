"""Draft tokens for speculative decoding: copied from the context (prompt lookup), or written by a small draft
model that shares the served model's tokenizer.

The draft model lives on rank 0 only. It decodes greedily, one row at a time, from its own KV cache per request,
which follows what the request has really emitted: each step cuts it back to the longest prefix it shares with
the request's tokens and feeds it the rest. The other ranks receive rank 0's drafts over the ring (every rank
must feed the same tokens to its layers), so a draft-model step costs them one message.

A deterministic draft keeps seeded sampling's distribution under speculative.judge's acceptance rule, whichever
model wrote it.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_model, load_tokenizer

from shardline.engine import protocol

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


@dataclass
class Written:
    """A request's draft-model state: its cache holds `tokens`."""

    cache: list[Any]
    tokens: list[int] = field(default_factory=list)


class DraftModel:
    """Drafts written by a small model on rank 0 (`model` None on the other ranks, which receive them)."""

    def __init__(self, model: nn.Module | None, group: mx.distributed.Group | None, prefill_step: int) -> None:
        self.model = model
        self.group = group
        self.prefill_step = prefill_step
        self.rows: dict[int, Written] = {}

    def propose(self, uids: list[int], sequences: list[list[int]], ks: list[int]) -> list[list[int]]:
        drafts = [self.write(uid, tokens, k) if k else [] for uid, tokens, k in
                  zip(uids, sequences, ks, strict=True)] if self.model is not None else []  # fmt: skip
        width = max(ks, default=0)
        if self.group is None or width == 0:  # every rank knows the ks alike
            return drafts or [[] for _ in ks]
        # 0 = no token: rank 0's drafts are sent shifted by one, the other ranks add zeros
        flat = [t + 1 for d in drafts for t in [*d, *[-1] * (width - len(d))]] if self.model is not None else None
        shared = protocol.share(self.group, flat, len(ks) * width)
        return [[t - 1 for t in shared[i * width : (i + 1) * width] if t] for i in range(len(ks))]

    def write(self, uid: int, tokens: list[int], k: int) -> list[int]:
        """`k` greedy tokens after `tokens`."""
        assert self.model is not None
        row = self.rows.get(uid) or Written(make_prompt_cache(self.model))
        self.rows[uid] = row
        common = shared_prefix(row.tokens, tokens)
        common = min(common, len(tokens) - 1)  # at least one token to feed, for the logits after it
        if len(row.tokens) > common:
            trim_prompt_cache(row.cache, len(row.tokens) - common)
        pending = tokens[common:]
        while len(pending) > self.prefill_step:  # a long prompt in chunks, as the served model takes it
            self.model(mx.array([pending[: self.prefill_step]]), cache=row.cache)
            mx.eval([c.state for c in row.cache])
            pending = pending[self.prefill_step :]
        drafts: list[int] = []
        for _ in range(k):
            logits = self.model(mx.array([pending]), cache=row.cache)
            token = mx.argmax(logits[0, -1]).item()
            drafts.append(int(token))
            pending = [int(token)]
        # the cache holds every token fed: all but the last draft
        row.tokens = [*tokens, *drafts[:-1]]
        return drafts

    def forget(self, uid: int) -> None:
        self.rows.pop(uid, None)

    def clear(self) -> None:
        self.rows.clear()


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
    caches = make_prompt_cache(model)
    if not can_trim_prompt_cache(caches) or any(hasattr(c, "max_size") for c in caches):
        raise DraftRefused(f"the draft model at {path.name} keeps caches that cannot be cut back (a sliding "
                           "window or recurrent layers): rejected drafts could not be dropped")  # fmt: skip
    return model
