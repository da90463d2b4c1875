"""How rank 0 tells the other ranks what to compute, over the same ring the model uses.

Every message is an all_sum of int32s to which only rank 0 contributes, so every rank
gets rank 0's values. All of them run on mlx_lm's generation stream: the ops of one
stream run in the order they were issued, so these messages can never interleave with
the model's own collectives (pipeline send/recv/all_gather, tensor all_sum), which
generate_step may still have in flight.

  between requests, every POLL_S:  header [kind, n_prompt, max_tokens, temperature bits,
                                    top_p bits, seed low, seed high]
  kind GENERATE, then:             the n_prompt prompt token ids
  after every generated token:     [go, token]; go 0 = all ranks stop now (done, stop
                                    string or client gone); token lets the others check
                                    they sampled the same one
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generation_stream

IDLE, GENERATE, SHUTDOWN = 0, 1, 2
HEADER_SIZE = 7
POLL_S = 0.2
# A rank waiting in a ring collective spins a core (MLX's socket thread busy-polls), so
# between idle headers the other ranks sleep, waking just before rank 0's next one.
# The price: a request that arrives while idle may wait up to POLL_S for them.
NAP_S = POLL_S - 0.01


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int  # 0 .. 2**64-1; every rank seeds mx.random with it


@dataclass(frozen=True)
class Header:
    kind: int
    prompt_len: int = 0
    sampling: Sampling | None = None


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


def encode_header(header: Header) -> list[int]:
    s = header.sampling
    if s is None:
        return [header.kind] + [0] * (HEADER_SIZE - 1)
    fields = [header.kind, header.prompt_len, s.max_tokens, float_bits(s.temperature), float_bits(s.top_p)]
    return [*fields, *seed_words(s.seed)]


def decode_header(values: list[int]) -> Header:
    kind, prompt_len, max_tokens, temperature, top_p, low, high = values
    if kind != GENERATE:
        return Header(kind)
    sampling = Sampling(max_tokens, bits_float(temperature), bits_float(top_p), words_seed(low, high))
    return Header(kind, prompt_len, sampling)


def send_header(group: mx.distributed.Group, header: Header) -> None:
    share(group, encode_header(header), HEADER_SIZE)


def receive_header(group: mx.distributed.Group) -> Header:
    return decode_header(share(group, None, HEADER_SIZE))


def send_request(group: mx.distributed.Group, tokens: list[int], sampling: Sampling) -> None:
    send_header(group, Header(GENERATE, len(tokens), sampling))
    share(group, tokens, len(tokens))


def receive_prompt(group: mx.distributed.Group, header: Header) -> list[int]:
    return share(group, None, header.prompt_len)


def send_step(group: mx.distributed.Group, go: bool, token: int) -> None:
    share(group, [int(go), token], 2)


def receive_step(group: mx.distributed.Group) -> tuple[bool, int]:
    go, token = share(group, None, 2)
    return bool(go), token
