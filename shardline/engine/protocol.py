"""How rank 0 tells the other ranks what to compute, over the same ring the model uses.

Every message is an all_sum of int32s to which only rank 0 contributes, so every rank
gets rank 0's values. All of them run on mlx_lm's generation stream: the ops of one
stream run in the order they were issued, so these messages can never interleave with
the model's own collectives (pipeline send/recv/all_gather, tensor all_sum), which
the batch generator may still have in flight.

  every step (or every POLL_S while idle):  header [kind, payload length, check]
  kind STEP with a payload, then:           the payload: who leaves the batch, which cached
                                            prefixes are dropped, who joins (prompt, sampling,
                                            the cached prefix it reuses)
check is the sum of the tokens rank 0 sampled in the step before, so the others can tell
they sampled the same ones.
"""

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generation_stream

IDLE, STEP, SHUTDOWN = 0, 1, 2
HEADER_SIZE = 3
OP_LEAVE, OP_DROP, OP_JOIN = 1, 2, 3
JOIN_FIELDS = 9  # op, entry, reuse, max_tokens, temperature, top_p, seed low, seed high, prompt length
POLL_S = 0.2
# A rank waiting in a ring collective spins a core (MLX's socket thread busy-polls), so
# between idle headers the other ranks sleep, waking just before rank 0's next one.
# The price: a request that arrives while idle may wait up to POLL_S for them.
NAP_S = POLL_S - 0.01
NO_ENTRY = -1


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int  # 0 .. 2**64-1; the request's own random stream starts from it on every rank


@dataclass(frozen=True)
class Join:
    tokens: list[int]
    sampling: Sampling
    entry: int | None = None  # the prefix-cache entry this request starts from
    reuse: int = 0  # how many of its first tokens that entry already holds


@dataclass
class Step:
    """What changes in the batch before the next forward pass, in the order every rank applies it."""

    leaves: list[int] = field(default_factory=list)  # request ids
    drops: list[int] = field(default_factory=list)  # prefix-cache entry ids
    joins: list[Join] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.leaves or self.drops or self.joins)


def share(group: mx.distributed.Group, values: list[int] | None, size: int) -> list[int]:
    """Rank 0's `values` on every rank; the other ranks pass None."""
    data = mx.array(values if values is not None else [0] * size, dtype=mx.int32)
    with mx.stream(generation_stream):
        return mx.distributed.all_sum(data, group=group).tolist()


def float_bits(value: float) -> int:
    return int(np.array(value, dtype=np.float32).view(np.int32))


def bits_float(bits: int) -> float:
    return float(np.array(bits, dtype=np.int32).view(np.float32))


def seed_words(seed: int) -> list[int]:
    words = np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint32).view(np.int32)
    return [int(w) for w in words]


def words_seed(low: int, high: int) -> int:
    words = np.array([low, high], dtype=np.int32).view(np.uint32)
    return int(words[0]) | int(words[1]) << 32


def checksum(tokens: list[int]) -> int:
    return sum(tokens) % 2**31


def encode_step(step: Step) -> list[int]:
    out: list[int] = []
    for uid in step.leaves:
        out += [OP_LEAVE, uid]
    for entry in step.drops:
        out += [OP_DROP, entry]
    for join in step.joins:
        s = join.sampling
        entry = NO_ENTRY if join.entry is None else join.entry
        out += [OP_JOIN, entry, join.reuse, s.max_tokens, float_bits(s.temperature), float_bits(s.top_p)]
        out += [*seed_words(s.seed), len(join.tokens), *join.tokens]
    return out


def decode_step(values: list[int]) -> Step:
    step, at = Step(), 0
    while at < len(values):
        op = values[at]
        if op == OP_LEAVE:
            step.leaves.append(values[at + 1])
            at += 2
        elif op == OP_DROP:
            step.drops.append(values[at + 1])
            at += 2
        elif op == OP_JOIN:
            _, entry, reuse, max_tokens, temperature, top_p, low, high, n = values[at : at + JOIN_FIELDS]
            tokens = values[at + JOIN_FIELDS : at + JOIN_FIELDS + n]
            sampling = Sampling(max_tokens, bits_float(temperature), bits_float(top_p), words_seed(low, high))
            step.joins.append(Join(tokens, sampling, None if entry == NO_ENTRY else entry, reuse))
            at += JOIN_FIELDS + n
        else:
            raise ValueError(f"unknown step op {op} at {at}")
    return step


def send_idle(group: mx.distributed.Group) -> None:
    share(group, [IDLE, 0, 0], HEADER_SIZE)


def send_shutdown(group: mx.distributed.Group) -> None:
    share(group, [SHUTDOWN, 0, 0], HEADER_SIZE)


def send_step(group: mx.distributed.Group, step: Step, check: int) -> None:
    payload = encode_step(step)
    share(group, [STEP, len(payload), check], HEADER_SIZE)
    if payload:
        share(group, payload, len(payload))


def receive(group: mx.distributed.Group) -> tuple[int, Step, int]:
    """(kind, step, check) as rank 0 sent them."""
    kind, size, check = share(group, None, HEADER_SIZE)
    payload = share(group, None, size) if kind == STEP and size else []
    return kind, decode_step(payload), check
