"""How rank 0 tells the other ranks what to compute, over the same ring the model uses.

Every message is an all_sum of int32s to which only rank 0 contributes, so every rank
gets rank 0's values. All of them run on mlx_lm's generation stream: the ops of one
stream run in the order they were issued, so these messages can never interleave with
the model's own collectives (pipeline send/recv/all_gather, tensor all_sum), which
the batch generator may still have in flight.

  every few steps (or POLL_S while idle):   header [kind, payload length, check, steps]
  kind STEP with a payload, then:           the payload: who leaves the batch, which cached
                                            prefixes are dropped, who joins (prompt, sampling,
                                            the cached prefix it reuses)
then every rank runs `steps` forward passes, the first after applying the payload. check is
the sum of the tokens rank 0 sampled in the passes before, so the others can tell they sampled
the same ones.
"""

import json
from dataclasses import dataclass, field, fields

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generation_stream

IDLE, STEP, SHUTDOWN = 0, 1, 2
HEADER_SIZE = 4
OP_LEAVE, OP_DROP, OP_JOIN = 1, 2, 3
# op, entry, reuse, max_tokens, temperature, top_p, seed low, seed high, prompt length, options length;
# then the prompt's tokens, then the options (Sampling's other fields, JSON, 4 bytes a word)
JOIN_FIELDS = 10
POLL_S = 0.5
# Without the ring-wait shim (ring_wait.c: macOS, or SHARDLINE_RUNNER_RING_WAIT=spin) a rank waiting
# in a ring collective spins a core (MLX's socket thread busy-polls), so between idle headers the
# other ranks sleep, waking just before rank 0's next one (even so, an idle 2-rank instance measured
# 22 % of a core spinning, under 1 % with the shim). Rank 0 wakes them when a request comes
# (wake.py), so only a lost wake-up makes a request wait, up to POLL_S.
NAP_S = POLL_S - 0.01
NO_ENTRY = -1


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int  # 0 .. 2**64-1; the request's own random stream starts from it on every rank
    # Every rank samples, so whatever shapes sampling travels with the join (as `options`):
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 0.0  # 0 = off (mlx_lm's multiplicative penalty)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias) pairs
    grammar: str = ""  # an llguidance grammar the output must match; "" = free
    resumed: int = 0  # the last this many of the join's tokens are the request's own output, already delivered
    draft_tokens: int = 0  # speculative decoding by prompt lookup: up to this many drafts a step (0 = off)

    def options(self) -> dict[str, object]:
        """The fields past the fixed four that differ from their defaults."""
        defaults = Sampling(0, 0.0, 1.0, 0)
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)[4:]
            if getattr(self, f.name) != getattr(defaults, f.name)
        }


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


def options_words(sampling: Sampling) -> tuple[int, list[int]]:
    """(byte length, int32 words) of the sampling options as JSON."""
    options = sampling.options()
    if not options:
        return 0, []
    data = json.dumps(options, separators=(",", ":")).encode()
    padded = data + b"\0" * (-len(data) % 4)
    return len(data), [int(w) for w in np.frombuffer(padded, dtype="<i4")]


def words_options(nbytes: int, words: list[int]) -> dict[str, object]:
    if not nbytes:
        return {}
    options: dict[str, object] = json.loads(np.array(words, dtype="<i4").tobytes()[:nbytes])
    if "logit_bias" in options:
        options["logit_bias"] = tuple((int(t), float(b)) for t, b in options["logit_bias"])  # type: ignore[attr-defined]
    return options


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
        nbytes, words = options_words(s)
        out += [*seed_words(s.seed), len(join.tokens), nbytes, *join.tokens, *words]
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
            _, entry, reuse, max_tokens, temperature, top_p, low, high, n, nbytes = values[at : at + JOIN_FIELDS]
            at += JOIN_FIELDS
            tokens, at = values[at : at + n], at + n
            nwords = (nbytes + 3) // 4
            options, at = words_options(nbytes, values[at : at + nwords]), at + nwords
            sampling = Sampling(
                max_tokens, bits_float(temperature), bits_float(top_p), words_seed(low, high), **options
            )  # type: ignore[arg-type]
            step.joins.append(Join(tokens, sampling, None if entry == NO_ENTRY else entry, reuse))
        else:
            raise ValueError(f"unknown step op {op} at {at}")
    return step


def send_idle(group: mx.distributed.Group) -> None:
    share(group, [IDLE, 0, 0, 0], HEADER_SIZE)


def send_shutdown(group: mx.distributed.Group) -> None:
    share(group, [SHUTDOWN, 0, 0, 0], HEADER_SIZE)


def send_step(group: mx.distributed.Group, step: Step, check: int, steps: int = 1) -> None:
    """`step`'s changes, then `steps` forward passes (the later ones change nothing) before the next message:
    every message waits for the work before it, so fewer of them keep the ranks' pipelines full."""
    payload = encode_step(step)
    share(group, [STEP, len(payload), check, steps], HEADER_SIZE)
    if payload:
        share(group, payload, len(payload))


def receive(group: mx.distributed.Group) -> tuple[int, Step, int, int]:
    """(kind, step, check, steps) as rank 0 sent them."""
    kind, size, check, steps = share(group, None, HEADER_SIZE)
    payload = share(group, None, size) if kind == STEP and size else []
    return kind, decode_step(payload), check, steps
