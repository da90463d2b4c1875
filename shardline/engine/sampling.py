"""Per-request sampling inside a batch: each request draws from its own random stream.

`mx.random.seed(s)` followed by draws splits one global key; a request here splits its own
key the same way, so a seeded request samples exactly what mlx_lm's stream_generate would
after `mx.random.seed(seed)` with `make_sampler` and `make_logits_processors`, alone or
beside any number of others. Every rank builds the same samplers and processors from the
same Sampling, so every rank samples the same tokens.
"""

from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler, make_logits_processors

from shardline.engine.grammar import Grammars
from shardline.engine.protocol import Sampling

Processor = Callable[[mx.array, mx.array], mx.array]


class SeededSampler:
    def __init__(self, sampling: Sampling) -> None:
        self.s = sampling
        self.key = mx.random.key(sampling.seed)
        for _ in range(sampling.resumed):  # a resumed request draws on where it left off, not afresh
            self.key, _ = mx.random.split(self.key)

    def __call__(self, logprobs: mx.array) -> mx.array:
        return self.categorical(self.shaped(logprobs))

    def shaped(self, logprobs: mx.array) -> mx.array:
        """The logits this request samples from: mlx_lm's make_sampler order (top_p, min_p, top_k), then temperature."""
        if 0 < self.s.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.s.top_p)
        if self.s.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.s.min_p)
        if 0 < self.s.top_k < logprobs.shape[-1]:  # as many as the vocabulary or more: every token, as off
            logprobs = apply_top_k(logprobs, self.s.top_k)
        return logprobs * (1 / self.s.temperature)

    def categorical(self, logits: mx.array) -> mx.array:
        self.key, draw = mx.random.split(self.key)
        return mx.random.categorical(logits, key=draw)

    def skip(self) -> None:
        """The draw another rank made from this stream (overlap.py): the next draw is the one after it."""
        self.key, _ = mx.random.split(self.key)

    def distribution(self, logprobs: mx.array) -> mx.array:
        return mx.softmax(self.shaped(logprobs), axis=-1)

    def uniform(self) -> float:
        self.key, draw = mx.random.split(self.key)
        return float(mx.random.uniform(key=draw).item())


def sampler_for(sampling: Sampling) -> Callable[[mx.array], mx.array]:
    # Greedy requests share one function, so a batch of them samples in one call.
    if sampling.temperature == 0:
        return greedy_sampler
    return SeededSampler(sampling)


def processors_for(sampling: Sampling, grammars: Grammars, output: list[int] | None = None) -> list[Processor]:
    """The request's logits processors: mlx_lm's (bias, penalties), then its grammar, which has the last word.
    `output`: what a resumed request already generated, which its grammar has already matched."""
    processors: list[Processor] = make_logits_processors(
        dict(sampling.logit_bias) or None,
        sampling.repetition_penalty or None,
        presence_penalty=sampling.presence_penalty or None,
        frequency_penalty=sampling.frequency_penalty or None,
    )
    if sampling.grammar:
        processors.append(grammars.processor(sampling.grammar, output or []))
    return processors
