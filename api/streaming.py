"""Server-sent events, whatever the wire format: frames, a keep-alive while the runner is quiet, and an error
after the response has started (its status line is gone, so the error is an event of the stream)."""

import asyncio
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any, TypeVar

from fastapi import HTTPException
from fastapi.responses import StreamingResponse

KEEPALIVE_S = 5.0  # a keep-alive this often while the prompt is still being processed (or waits its turn)
DONE = "data: [DONE]\n\n"
Events = AsyncGenerator[dict[str, Any] | None, None]  # a runner's NDJSON events; None: nothing came for a while
T = TypeVar("T")


async def with_keepalives(source: AsyncIterator[T], every: float = KEEPALIVE_S) -> AsyncGenerator[T | None, None]:
    """`source`'s items, and None each time nothing came for `every` seconds (the cue for a keep-alive).
    `source` is read ahead in a task, cancelled when this is closed; closing `source` is left to its owner."""
    pending = asyncio.ensure_future(anext(source))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            yield item
            pending = asyncio.ensure_future(anext(source))
    finally:
        pending.cancel()


def data(payload: dict[str, Any]) -> str:
    """An unnamed event, as OpenAI's chat and completions stream them."""
    return f"data: {json.dumps(payload)}\n\n"


def event(name: str, payload: dict[str, Any]) -> str:
    """A named event whose data carries its name as `type`, as Anthropic's and the Responses API stream them."""
    return f"event: {name}\ndata: {json.dumps({'type': name, **payload})}\n\n"


class Stream(ABC):
    """One streamed response in one wire format: what opens it, the frames of each runner event, what is sent
    while the runner is quiet, an error, and what closes it (after an error too)."""

    keep_alive = ": keep-alive\n\n"  # an SSE comment: every client skips it, proxies see bytes flow
    media_type = "text/event-stream"  # Ollama's streams are NDJSON, framed the same way

    def opening(self) -> Iterator[str]:
        return iter(())

    @abstractmethod
    def frames(self, event: dict[str, Any]) -> Iterator[str]: ...

    @abstractmethod
    def error(self, exc: HTTPException) -> str: ...

    def closing(self) -> Iterator[str]:
        return iter(())


async def sse(lines: Events, stream: Stream) -> AsyncIterator[str]:
    for text in stream.opening():
        yield text
    async with aclosing(lines):
        try:
            async for item in lines:
                if item is None:
                    yield stream.keep_alive
                    continue
                for text in stream.frames(item):
                    yield text
        except HTTPException as exc:  # the response has started: the error goes to this client as an event
            yield stream.error(exc)
    for text in stream.closing():
        yield text


def sse_response(lines: Events, stream: Stream) -> StreamingResponse:
    return StreamingResponse(sse(lines, stream), media_type=stream.media_type)
