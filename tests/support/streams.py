"""Streams that a failure lands in the middle of, read through the official OpenAI client, and how they compare
with an undisturbed run."""

import asyncio
from dataclasses import dataclass, field
from typing import Any

from openai import AsyncOpenAI

from tests.support.processes import Cluster
from tests.support.serving import MESSAGES

LONG = 200  # tokens: seconds of decoding on a pipeline, so that the failure lands mid-stream
CUT_AT = 8  # content chunks every stream has before the failure


@dataclass
class Streamed:
    text: str = ""
    chunks: int = 0
    ids: set[str] = field(default_factory=set)
    finish: str | None = None
    completion_tokens: int = 0


async def stream(
    cluster: Cluster, model: str, at: asyncio.Barrier | None = None, tokens: int = LONG, **sampling: Any
) -> Streamed:
    """One streamed chat completion through the official client, as a user's app reads it; waits at `at` once it
    has CUT_AT chunks (the test fails something there)."""
    openai = AsyncOpenAI(base_url=f"{cluster.api}/v1", api_key="unused", max_retries=0, timeout=300)
    out = Streamed()
    events = await openai.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=tokens, stream=True, stream_options={"include_usage": True},
        **{"temperature": 0, **sampling},
    )  # fmt: skip
    async for event in events:
        out.ids.add(event.id)
        if event.usage:
            out.completion_tokens = event.usage.completion_tokens
        if not event.choices:
            continue
        out.text += event.choices[0].delta.content or ""
        out.finish = event.choices[0].finish_reason or out.finish
        out.chunks += 1
        if at is not None and out.chunks == CUT_AT:
            await at.wait()
    return out


REQUESTS: list[dict[str, Any]] = [{}] * 8 + [{"temperature": 1.2, "seed": 11}, {"temperature": 0.9, "seed": 12}]


async def streams(cluster: Cluster, model: str, at: asyncio.Barrier | None = None) -> list[Streamed]:
    return list(await asyncio.gather(*(stream(cluster, model, at, **r) for r in REQUESTS)))


def same(got: list[Streamed], expected: list[Streamed]) -> None:
    assert [len(s.ids) for s in got] == [1] * len(got)  # one stream each, one id
    for g, e in zip(got, expected, strict=True):
        assert e.completion_tokens > 2 * CUT_AT and e.finish in ("length", "stop", "max_tokens", "end_turn")
        assert (g.text, g.finish, g.completion_tokens) == (e.text, e.finish, e.completion_tokens)
