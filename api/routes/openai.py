"""OpenAI-compatible inference: the request goes to rank 0's runner; tokens never pass through Temporal."""

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import httpx
from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import HttpDep, InstancesDep, MetricsDep
from api.metrics import UNSERVED, ChatWatch, outcome_of
from api.openai_types import ChatRequest, ModelCard, ModelList, Usage, chunk, completion, completion_id, now

router = APIRouter(prefix="/v1", tags=["openai"])
KEEPALIVE_S = 5.0  # an SSE comment this often while the prompt is still being processed
# a runner's host that is gone (partitioned, powered off) is a 503 within seconds, not after the OS gives up
RUNNER_TIMEOUT = httpx.Timeout(None, connect=10.0)
Events = AsyncGenerator[dict[str, Any] | None, None]  # the runner's NDJSON events; None: nothing came for a while


@router.get("/models", response_model=ModelList)
async def list_models(instances: InstancesDep) -> ModelList:
    ready = sorted({i.model_id for i in await instances.all() if i.state == "ready"})
    return ModelList(data=[ModelCard(id=m, created=now()) for m in ready])


async def endpoint_for(instances: InstancesDep, model: str) -> str:
    candidates = await instances.for_model(model)
    ready = [i for i in candidates if i.state == "ready" and i.endpoint]
    if ready:
        return str(ready[0].endpoint)
    if not candidates:
        raise HTTPException(404, f"model {model!r} is not served: start it with POST /instances or `shardline serve`")
    states = ", ".join(f"{i.instance_id} is {i.state}" + (f" ({i.reason})" if i.reason else "") for i in candidates)
    raise HTTPException(503, f"model {model!r} is not ready: {states}")


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatRequest, instances: InstancesDep, http: HttpDep, metrics: MetricsDep
) -> StreamingResponse | JSONResponse:
    watch = metrics.chat(body.model)
    try:
        events = await runner_events(instances, http, body)
    except Exception as exc:
        failed(watch, exc)
        raise
    lines = watched(events, watch)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(sse(lines, body.model, include_usage), media_type="text/event-stream")
    text, final = [], {}
    async for event in lines:
        if event is None:
            continue
        if "text" in event:
            text.append(event["text"])
        else:
            final = event
    return JSONResponse(completion(completion_id(), body.model, "".join(text), final.get("finish_reason", "stop"),
                                   usage_of(final)))  # fmt: skip


def failed(watch: ChatWatch, exc: Exception) -> None:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 404:
        watch.model = UNSERVED
    watch.end(outcome_of(status))


async def watched(lines: Events, watch: ChatWatch) -> Events:
    """The events, passed on as they are and timed on the way."""
    outcome = "cancelled"  # unless the stream is read to its end: the client went away
    async with aclosing(lines):
        try:
            async for event in lines:
                if event is not None:
                    watch.saw(event)
                yield event
            outcome = "ok"
        except Exception as exc:
            failed(watch, exc)
            raise
        finally:
            watch.end(outcome)  # a no-op after failed()


class RunnerUnreachable(HTTPException):
    def __init__(self, detail: str) -> None:
        super().__init__(503, detail)


async def runner_events(instances: InstancesDep, http: httpx.AsyncClient, body: ChatRequest) -> Events:
    """One generation's events, from the first on: so a runner that is gone is a 503 before any response
    starts, not a 200 cut short. A runner that moved (its instance recovered since the last lookup) is
    looked up again, once."""
    endpoint = await endpoint_for(instances, body.model)
    try:
        return await first_event(generate(http, endpoint, body.generate_body()))
    except RunnerUnreachable:
        await instances.refresh()
        moved = await endpoint_for(instances, body.model)
        if moved == endpoint:
            raise
        return await first_event(generate(http, moved, body.generate_body()))


async def first_event(lines: Events) -> Events:
    """Wait for the runner's first event (or the first keep-alive), then stream everything from there."""
    try:
        first = await anext(lines)
    except StopAsyncIteration:
        return lines
    except BaseException:
        await lines.aclose()
        raise

    async def from_first() -> Events:
        async with aclosing(lines):
            yield first
            async for event in lines:
                yield event

    return from_first()


def usage_of(final: dict[str, Any]) -> Usage:
    prompt, done = int(final.get("prompt_tokens", 0)), int(final.get("completion_tokens", 0))
    return Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done)


async def generate(http: httpx.AsyncClient, endpoint: str, body: dict[str, Any]) -> Events:
    """The runner's NDJSON events; None while nothing came for KEEPALIVE_S. Closing this generator closes
    the connection, and the runner stops that generation."""
    try:
        async with http.stream("POST", f"{endpoint}/generate", json=body, timeout=RUNNER_TIMEOUT) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:500]
                raise HTTPException(502 if response.status_code >= 500 else 400, f"runner refused: {detail}")
            lines = response.aiter_lines()
            pending = asyncio.ensure_future(anext(lines))
            try:
                while True:
                    done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE_S)
                    if not done:
                        yield None
                        continue
                    try:
                        line = pending.result()
                    except StopAsyncIteration:
                        return
                    if line.strip():
                        yield json.loads(line)
                    pending = asyncio.ensure_future(anext(lines))
            finally:
                pending.cancel()
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise RunnerUnreachable(f"the model's runner is unreachable ({exc}); the instance is recovering") from exc
    except httpx.TransportError as exc:
        raise HTTPException(503, f"the model's runner went away ({exc}); the instance is recovering") from exc


async def sse(lines: AsyncIterator[dict[str, Any] | None], model: str, include_usage: bool) -> AsyncIterator[str]:
    cid = completion_id()
    yield data(chunk(cid, model, {"role": "assistant", "content": ""}))
    async for event in lines:
        if event is None:
            yield ": keep-alive\n\n"
        elif "text" in event:
            if event["text"]:
                yield data(chunk(cid, model, {"content": event["text"]}))
        else:
            yield data(chunk(cid, model, {}, event.get("finish_reason", "stop")))
            if include_usage:
                yield data({**chunk(cid, model, {}), "choices": [], "usage": usage_of(event).model_dump()})
    yield "data: [DONE]\n\n"


def data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
