"""Per-request sampling inside a batch: each request draws from its own random stream.

`mx.random.seed(s)` followed by draws splits one global key; a request here splits its own
key the same way, so a seeded request samples exactly what mlx_lm's stream_generate would
after `mx.random.seed(seed)`, alone or beside any number of others.
"""

from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p, greedy_sampler

from shardline.engine.protocol import Sampling


class SeededSampler:
    def __init__(self, temperature: float, top_p: float, seed: int) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.key = mx.random.key(seed)

    def __call__(self, logprobs: mx.array) -> mx.array:
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        self.key, draw = mx.random.split(self.key)
        return mx.random.categorical(logprobs * (1 / self.temperature), key=draw)


def sampler_for(sampling: Sampling) -> Callable[[mx.array], mx.array]:
    # Greedy requests share one function, so a batch of them samples in one call.
    if sampling.temperature == 0:
        return greedy_sampler
    return SeededSampler(sampling.temperature, sampling.top_p, sampling.seed)
