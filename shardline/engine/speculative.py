"""Speculative decoding: several tokens per forward pass where drafts guess the output right.

A request that asks for it (`Sampling.draft_tokens` = k) gets, at each decoding step, up to k draft tokens
(drafter.py: copied from what followed the latest earlier occurrence of its last few tokens, as an agent's edit
repeats the file it read; or written by a small draft model). One forward pass over [next token, drafts] scores
them all: greedy rows keep the drafts up to the first the model would not have chosen (so the output is exactly
plain decoding's), seeded rows accept each draft with the probability the model gives it and, at the first
rejection, sample from the rest of the distribution (the standard rule for a deterministic draft, so the output
keeps plain sampling's distribution). Each row's KV cache then drops the positions it did not keep: BatchKVCache
trims what all rows dropped, and shifts each row's extra right into its left padding.

It runs on mlx_lm's GenerationBatch in place of its one-token step, keeping its bookkeeping (tokens, counts, stop
matchers, the next token and its log-probabilities) as that step would. Every rank runs it alike: drafts are the
same on every rank (drafter.py), acceptance comes from the sampled values.
"""

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import GenerationBatch
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.sample_utils import greedy_sampler

from shardline.engine.drafter import Drafter, drop_positions
from shardline.engine.grammar import GrammarProcessor
from shardline.engine.sampling import SeededSampler

Response = GenerationBatch.Response


@dataclass
class Tally:
    """Draft tokens offered and accepted, for the metrics."""

    drafted: int = 0
    accepted: int = 0


def usable(gb: GenerationBatch) -> bool:
    """Plain attention caches only: each row's can be cut back."""
    return len(gb.uids) > 0 and all(type(c) is BatchKVCache for c in gb.prompt_cache) and gb._next_tokens is not None


def step(gb: GenerationBatch, draft_tokens: list[int], drafter: Drafter, tally: Tally) -> list[Response] | None:
    """One speculative step for the whole batch (`draft_tokens[i]`: row i's k, 0 = none), or None when no row has
    a draft this step (the caller then takes mlx_lm's own step)."""
    mx.eval(gb._next_tokens, gb._next_logprobs)
    first = gb._next_tokens.tolist()
    drafts = drafter.propose(gb.uids, [gb.tokens[i] + [first[i]] for i in range(len(first))], draft_tokens)
    width = max(len(d) for d in drafts)
    if width == 0:
        return None
    # rows with shorter drafts are padded with a repeat of their token, which is computed but never judged: a row
    # without drafts samples from its first position only, as plain decoding does (a seeded one draws as it would)
    padded = [[t, *d, *[t] * (width - len(d))] for t, d in zip(first, drafts, strict=True)]
    logits = gb.model(mx.array(padded), cache=gb.prompt_cache)
    processors = gb.logits_processors or [()] * len(gb.uids)
    logits = mx.stack(
        [processed(gb, i, logits[i], padded[i]) if processors[i] else logits[i] for i in range(len(padded))]
    )
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (B, width + 1, V)
    mx.eval(logprobs)
    samplers = gb.samplers or [None] * len(gb.uids)
    verdicts = [judge(samplers[i] or gb.fallback_sampler, logprobs[i], drafts[i]) for i in range(len(gb.uids))]

    emitted: list[list[tuple[int, mx.array]]] = []
    finish: list[str | None] = []
    drop: list[int] = []
    for i, (accepted, _) in enumerate(verdicts):
        tally.drafted += len(drafts[i])
        tally.accepted += min(accepted, len(drafts[i]))
        row = [(first[i], gb._next_logprobs[i])] + [(padded[i][j + 1], logprobs[i, j]) for j in range(accepted)]
        kept: list[tuple[int, mx.array]] = []
        reason = None
        for token, token_logprobs in row:
            kept.append((token, token_logprobs))
            gb._num_tokens[i] += 1
            if gb._num_tokens[i] >= gb.max_tokens[i]:
                reason = "length"
            if gb._matchers[i].advance(token):
                reason = "stop"
            if reason is not None:
                break
        emitted.append(kept)
        finish.append(reason)
        gb.tokens[i].extend(token for token, _ in kept)
        if processors[i]:  # what mlx_lm's step adds: the tokens fed, which its processors see from now on
            gb._token_context[i].update_and_fetch(mx.array([token for token, _ in kept]))
            for grammar in (p for p in processors[i] if isinstance(p, GrammarProcessor)):
                grammar.settle(len(kept))
        drop.append(width + 1 - len(kept))  # the cache holds what was emitted, as after mlx_lm's step

    drop_positions(gb.prompt_cache, drop)
    gb._current_tokens = mx.array(first)
    gb._current_logprobs = [kept[0][1] for kept in emitted]
    gb._next_tokens = mx.array([following[0] for _, following in verdicts])  # a finished row's is dropped below
    gb._next_logprobs = [following[1] for _, following in verdicts]

    responses: list[Response] = []
    keep = []
    for i, (kept, reason) in enumerate(zip(emitted, finish, strict=True)):
        for n, (token, token_logprobs) in enumerate(kept):
            last = reason is not None and n == len(kept) - 1
            ending = (reason, gb.extract_cache(i), gb.tokens[i]) if last else (None, None, None)
            responses.append(Response(gb.uids[i], token, token_logprobs, *ending))
        if reason is None:
            keep.append(i)
    if len(keep) < len(gb.uids):
        gb.filter(keep)
    return responses


def processed(gb: GenerationBatch, i: int, logits: mx.array, fed: list[int]) -> mx.array:
    """Row i's logits at each position after its processors, each seeing the tokens up to and including that
    position's input, as mlx_lm's step would have shown them one step at a time. A grammar (always the last
    processor) masks each position from its matcher's state after that position's input."""
    buffer = gb._token_context[i]
    before = buffer.state[: buffer._size]
    shaping = [p for p in gb.logits_processors[i] if not isinstance(p, GrammarProcessor)]
    rows = []
    for j in range(len(fed)):
        context = mx.concatenate([before, mx.array(fed[: j + 1], dtype=before.dtype)])
        row = logits[j : j + 1]
        for processor in shaping:
            row = processor(context, row)
        rows.append(row[0])
    grammar = next((p for p in gb.logits_processors[i] if isinstance(p, GrammarProcessor)), None)
    return grammar.draft(mx.stack(rows), fed) if grammar is not None else mx.stack(rows)


def judge(sampler: Any, logprobs: mx.array, drafts: list[int]) -> tuple[int, tuple[int, mx.array]]:
    """How many of `drafts` the row accepts, and the token that follows them with its log-probabilities.
    `logprobs[j]`: the distribution after the row's token and its first j drafts."""
    if sampler is greedy_sampler:
        best = mx.argmax(logprobs, axis=-1).tolist()
        n = next((j for j, d in enumerate(drafts) if best[j] != d), len(drafts))
        return n, (best[n], logprobs[n])
    if not isinstance(sampler, SeededSampler):  # a sampler we cannot read a distribution from: plain steps
        token = sampler(logprobs[0:1]).item()
        return 0, (token, logprobs[0])
    for j, d in enumerate(drafts):
        probs = sampler.distribution(logprobs[j : j + 1])[0]
        if sampler.uniform() < probs[d].item():
            continue
        rest = mx.where(mx.arange(probs.shape[-1]) == d, 0.0, probs)
        token = sampler.categorical(mx.log(rest)[None]).item()
        return j, (token, logprobs[j])
    n = len(drafts)
    return n, (sampler(logprobs[n : n + 1]).item(), logprobs[n])
