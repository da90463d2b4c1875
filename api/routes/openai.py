"""OpenAI-compatible inference: the request goes to rank 0's runner; tokens never pass through Temporal."""

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import httpx
from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import HttpDep, InFlightDep, InstancesDep, MetricsDep
from api.metrics import UNSERVED, ChatWatch, outcome_of
from api.openai_types import (
    ChatRequest,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    Usage,
    chunk,
    completion,
    completion_id,
    now,
)
from api.runners import Events, InFlight, RunnerUnreachable, generate
from workflows.serve import InstanceStatus

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models", response_model=ModelList)
async def list_models(instances: InstancesDep) -> ModelList:
    ready = sorted({i.model_id for i in await instances.all() if i.state == "ready"})
    return ModelList(data=[ModelCard(id=m, created=now()) for m in ready])


async def instance_for(instances: InstancesDep, model: str, in_flight: InFlight) -> InstanceStatus:
    """The ready instance of `model` with the fewest requests in flight from this API."""
    candidates = await instances.for_model(model)
    ready = [i for i in candidates if i.state == "ready" and i.endpoint]
    if ready:
        return in_flight.pick(ready)
    if not candidates:
        raise HTTPException(404, f"model {model!r} is not served: start it with POST /instances or `shardline serve`")
    states = ", ".join(f"{i.instance_id} is {i.state}" + (f" ({i.reason})" if i.reason else "") for i in candidates)
    raise HTTPException(503, f"model {model!r} is not ready: {states}")


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatRequest, instances: InstancesDep, http: HttpDep, metrics: MetricsDep, in_flight: InFlightDep
) -> StreamingResponse | JSONResponse:
    watch = metrics.chat(body.model)
    try:
        events = await runner_events(instances, http, body, in_flight)
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


async def runner_events(
    instances: InstancesDep, http: httpx.AsyncClient, body: ChatRequest, in_flight: InFlight
) -> Events:
    """One generation's events, from the first on: so a runner that is gone, or a request it refuses, is an
    error before any response starts, not a 200 cut short. A runner that moved (its instance recovered since
    the last lookup) is looked up again, once."""
    instance = await instance_for(instances, body.model, in_flight)
    try:
        return await first_event(generate(http, instance, body.generate_body(), in_flight))
    except RunnerUnreachable:
        await instances.refresh()
        moved = await instance_for(instances, body.model, in_flight)
        if moved.endpoint == instance.endpoint:
            in_flight.release(str(moved.endpoint))  # picked, never sent
            raise
        return await first_event(generate(http, moved, body.generate_body(), in_flight))


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
    cached = PromptTokensDetails(cached_tokens=int(final.get("cached_tokens", 0)))
    return Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done, prompt_tokens_details=cached)


async def sse(lines: AsyncIterator[dict[str, Any] | None], model: str, include_usage: bool) -> AsyncIterator[str]:
    cid = completion_id()
    yield data(chunk(cid, model, {"role": "assistant", "content": ""}))
    try:
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
    except HTTPException as exc:  # the response has started: the error goes to this client as an event
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        yield data({"error": {"message": str(exc.detail), "type": kind, "code": exc.status_code}})
    yield "data: [DONE]\n\n"


def data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
