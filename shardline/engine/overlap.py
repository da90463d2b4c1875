"""Overlapped pipelining: every rank of a pipeline computes at once, each on its own micro-batch.

In mlx_lm's step every rank runs its layers in turn (the hidden state goes down from rank N-1, which holds
the first layers, to rank 0) and then gathers rank 0's output so that every rank samples: while one rank
computes, the others wait. Here the batch is cut into N micro-batches that follow each other through the
ranks: rank N-1 computes micro-batch B while rank 0 finishes A. Only rank 0 runs the head and samples; it sends
the tokens to rank N-1, which embeds them for that micro-batch's next step and passes them down with its hidden
state. So every rank knows each micro-batch's tokens when it runs its step, and keeps the same bookkeeping as
mlx_lm's step (tokens, counts, stop tokens, finishes, each finished row's cache): the batch goes back to mlx_lm's
steps, on every rank alike, after any run. A rank that samples nothing advances each seeded row's random stream
as rank 0 draws from it, so later steps sample what they would have.

It runs in place of `steps` (two or more) of mlx_lm's steps when the batch is all decoding, has two rows or
more, and no row has logits processors (a grammar or a penalty is computed from tokens on every rank: mlx_lm's steps
then).
Messages follow one order on every rank (micro-batches 0..N-1, step after step), so each pair of ranks reads
them as they were sent.
"""

import copy
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import GenerationBatch, PromptProcessingBatch
from mlx_lm.sample_utils import greedy_sampler

from shardline.engine.pipeline import Split
from shardline.engine.sampling import SeededSampler

Response = GenerationBatch.Response
# A run fills the pipeline (rank 0 waits for the first micro-batch) and drains it (rank N-1 waits for the last
# tokens), and copies the batch's KV state into its micro-batches and back: a run is at least this many steps
# (rank 0 asks for as many: generation.py), so that costs about an eighth of a 2-rank run
MIN_STEPS = 4
NO_LOGPROBS = mx.array(0.0)  # what a rank other than 0 holds in place of log-probabilities it never computes


@dataclass
class Micro:
    """One micro-batch: some rows of the batch (their indices in it when the run began) and this rank's caches."""

    rows: list[int]
    caches: list[Any]
    inputs: mx.array | None = None  # the tokens its next step feeds (int32), once this rank knows them
    logprobs: list[mx.array] = field(default_factory=list)  # rank 0: what each input was sampled from
    owed: int = 0  # rank N-1: how many tokens rank 0 has sent it for this micro-batch, not yet received
    keep: list[int] = field(default_factory=list)  # rank N-1: which of those to keep (the rest finished)


def split_of(batch: GenerationBatch | PromptProcessingBatch) -> Split | None:
    return getattr(batch.model, "shardline_split", None)


def usable(gb: GenerationBatch) -> bool:
    split = split_of(gb)
    if split is None or split.size < 2 or len(gb.uids) < 2 or gb._next_tokens is None:
        return False
    if any(gb.logits_processors or ()):
        return False
    samplers = gb.samplers or [None] * len(gb.uids)
    return all((s or gb.fallback_sampler) is greedy_sampler or isinstance(s, SeededSampler) for s in samplers)


def cut(rows: int, parts: int) -> list[list[int]]:
    """`rows` rows in `parts` contiguous micro-batches, as even as they go."""
    bounds = [rows * p // parts for p in range(parts + 1)]
    return [list(range(bounds[p], bounds[p + 1])) for p in range(parts) if bounds[p + 1] > bounds[p]]


def rows_of(caches: list[Any], rows: list[int]) -> list[Any]:
    """Copies of a batch's caches holding only `rows` (the batch's own are left as they are)."""
    part = [copy.copy(c) for c in caches]
    for c in part:
        c.filter(rows)
    return part


def merged(parts: list[list[Any]]) -> list[Any]:
    """Micro-batches' caches back into one batch's, their rows in order (the first part's caches are extended)."""
    caches = parts[0]
    for part in parts[1:]:
        for c, other in zip(caches, part, strict=True):
            c.extend(other)
    return caches


def run(gb: GenerationBatch, steps: int) -> list[list[Response]]:
    """`steps` steps of the whole batch, overlapped; each step's responses, as mlx_lm's step would give them."""
    split = split_of(gb)
    assert split is not None
    rank, size = split.rank, split.size
    mx.eval(gb._next_tokens)
    micros = []
    for rows in cut(len(gb.uids), size):
        inputs = gb._next_tokens[mx.array(rows)].astype(mx.int32)
        logprobs = [gb._next_logprobs[i] for i in rows] if rank == 0 else []
        micros.append(Micro(rows, rows_of(gb.prompt_cache, rows), inputs, logprobs))
    out: list[list[Response]] = []
    split.overlapped = True
    try:
        for s in range(steps):
            responses: list[Response] = []
            for micro in micros:
                if s > 0:
                    receive_inputs(micro, split)
                if micro.rows:
                    responses += micro_step(gb, micro, split)
            out.append(responses)
        for micro in micros:  # every rank learns the tokens the last step sampled: the batch's next inputs
            receive_inputs(micro, split)
    finally:
        split.overlapped = False
        split.sent = None
    merge(gb, micros, rank)
    return out


def receive_inputs(micro: Micro, split: Split) -> None:
    """Ranks past 0: the tokens of the micro-batch's next step, from rank 0 to rank N-1 and then down the ranks."""
    rank, size, group = split.rank, split.size, split.group
    if rank == size - 1:
        if micro.owed:
            sampled = mx.distributed.recv((micro.owed,), mx.int32, 0, group=group)
            mx.eval(sampled)  # received even when every row it was for has finished
            micro.inputs = sampled[mx.array(micro.keep)] if micro.keep else None
            micro.owed = 0
    elif rank > 0 and micro.rows:
        micro.inputs = mx.distributed.recv((len(micro.rows),), mx.int32, rank + 1, group=group)
    if rank > 1 and micro.rows:
        assert micro.inputs is not None
        mx.eval(mx.distributed.send(micro.inputs, rank - 1, group=group))
    if rank > 0 and micro.inputs is not None:
        mx.eval(micro.inputs)


def micro_step(gb: GenerationBatch, micro: Micro, split: Split) -> list[Response]:
    """This rank's share of one step of one micro-batch, then mlx_lm's bookkeeping of the tokens it fed."""
    rank, size, group = split.rank, split.size, split.group
    assert micro.inputs is not None
    inputs = micro.inputs
    logits = gb.model(inputs[:, None], cache=micro.caches)
    samplers = [(gb.samplers[i] if gb.samplers else None) or gb.fallback_sampler for i in micro.rows]
    if rank == 0:
        logprobs = logits[:, -1, :]
        logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
        if all(s is samplers[0] for s in samplers):
            sampled = samplers[0](logprobs)
        else:
            sampled = mx.concatenate([s(logprobs[e : e + 1]) for e, s in enumerate(samplers)], axis=0)
        sampled = sampled.astype(mx.int32)
        mx.eval(mx.distributed.send(sampled, size - 1, group=group), logprobs)
        fed_logprobs, next_logprobs = micro.logprobs, list(logprobs)
    else:
        assert split.sent is not None
        mx.eval(split.sent)
        for s in samplers:
            if isinstance(s, SeededSampler):
                s.skip()
        fed_logprobs, next_logprobs = [NO_LOGPROBS] * len(micro.rows), []
    tokens = inputs.tolist()
    responses, keep = [], []
    for j, (i, token) in enumerate(zip(micro.rows, tokens, strict=True)):
        gb.tokens[i].append(token)
        gb._num_tokens[i] += 1
        reason = "length" if gb._num_tokens[i] >= gb.max_tokens[i] else None
        if gb._matchers[i].advance(token):
            reason = "stop"
        if reason is None:
            keep.append(j)
            responses.append(Response(gb.uids[i], token, fed_logprobs[j], None, None, None))
        else:
            cache = [c.extract(j) for c in micro.caches]
            responses.append(Response(gb.uids[i], token, fed_logprobs[j], reason, cache, gb.tokens[i]))
    if rank == size - 1:
        micro.owed, micro.keep = len(micro.rows), keep
    if rank == 0:
        micro.inputs = sampled[mx.array(keep)] if keep else None
        micro.logprobs = [next_logprobs[j] for j in keep]
    else:
        micro.inputs = None
    if len(keep) < len(micro.rows):
        micro.rows = [micro.rows[j] for j in keep]
        for c in micro.caches if keep else ():
            c.filter(keep)
    return responses


def merge(gb: GenerationBatch, micros: list[Micro], rank: int) -> None:
    """The micro-batches back into the one batch mlx_lm steps: the rows left, in order, and their caches."""
    left = [m for m in micros if m.rows]
    keep = [i for m in left for i in m.rows]
    for s in gb.samplers or ():
        if isinstance(s, SeededSampler):
            mx.eval(s.key)
    gb.prompt_cache = []  # replaced below: not filtered for nothing
    gb.filter(keep)
    if not left:
        gb._next_tokens = None
        return
    gb.prompt_cache = merged([m.caches for m in left])
    gb._next_tokens = mx.concatenate([m.inputs for m in left if m.inputs is not None])
    gb._next_logprobs = [p for m in left for p in m.logprobs] if rank == 0 else [NO_LOGPROBS] * len(keep)
    gb._current_tokens, gb._current_logprobs = None, []


def plain_attention(split: Split) -> bool:
    """Every layer of the whole model (not only this rank's: every rank must decide alike) has a plain KV cache,
    whose rows can be cut apart and merged back after prompts were added with right padding."""
    return all(kind[0] == "KVCache" for kind in split.kinds)


def prompt(batch: PromptProcessingBatch, tokens: list[list[int]]) -> None:
    """mlx_lm's prompt processing (PromptProcessingBatch.prompt) on a pipeline, the rows in one micro-batch per rank
    processed one after the other: rank 0 processes one micro-batch's prompts while rank N-1 already processes the
    next's. No token comes back (nobody reads a prompt's logits: every rank's caches are all it leaves), so the
    ranks need no message beyond the hidden states; the micro-batches' caches are then merged back in order."""
    split = split_of(batch)
    if split is None or split.size < 2 or len(tokens) < 2 or not plain_attention(split):
        PromptProcessingBatch.prompt(batch, tokens)
        return
    parts = []
    for rows in cut(len(tokens), split.size):
        part = copy.copy(batch)  # its token lists are the batch's own: processing adds the prompts to both
        part.uids = [batch.uids[i] for i in rows]
        part.tokens = [batch.tokens[i] for i in rows]
        part.prompt_cache = rows_of(batch.prompt_cache, rows)
        PromptProcessingBatch.prompt(part, [tokens[i] for i in rows])
        parts.append(part.prompt_cache)
    batch.prompt_cache = merged(parts)
