"""OpenAI-compatible inference: the request goes to rank 0's runner; tokens never pass through Temporal."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import HttpDep, InFlightDep, InstancesDep, MetricsDep
from api.errors import openai_error_type
from api.inference import call_id, gather, start
from api.openai_types import (
    ChatRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    Placement,
    PromptTokensDetails,
    Usage,
    chat_logprobs,
    chunk,
    completion,
    completion_id,
    now,
    text_logprobs,
)
from api.runners import Events, runner_stats
from workflows.serve import InstanceStatus

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models", response_model=ModelList)
async def list_models(instances: InstancesDep, http: HttpDep) -> ModelList:
    ready = [i for i in await instances.all() if i.state == "ready"]
    contexts = await asyncio.gather(*(context_of(http, i) for i in ready))
    cards: dict[str, ModelCard] = {}
    for instance, context in sorted(zip(ready, contexts, strict=True), key=lambda p: p[0].model_id):
        card = cards.setdefault(instance.model_id, ModelCard(id=instance.model_id, created=now()))
        card.context_length = card.context_length or context
        card.placement.append(placement_of(instance))
    return ModelList(data=list(cards.values()))


async def context_of(http: HttpDep, instance: InstanceStatus) -> int | None:
    stats = await runner_stats(http, instance)
    context = (stats or {}).get("context")
    return int(context) if isinstance(context, int) else None


def placement_of(instance: InstanceStatus) -> Placement:
    shards = [
        {"node_id": s.node_id, "rank": s.rank, "layer_start": s.layer_start, "layer_end": s.layer_end}
        for s in instance.shards
    ]
    return Placement(instance_id=instance.instance_id, strategy=instance.strategy, shards=shards)


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatRequest, instances: InstancesDep, http: HttpDep, metrics: MetricsDep, in_flight: InFlightDep
) -> StreamingResponse | JSONResponse:
    lines = await start(instances, http, metrics, in_flight, body.model, body.generate_body())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(sse(lines, body.model, include_usage), media_type="text/event-stream")
    done = await gather(lines)
    message: dict[str, Any] = {"role": "assistant", "content": done.text}
    if done.reasoning:
        message["reasoning_content"] = done.reasoning
    if done.tool_calls:
        message["tool_calls"] = [openai_call(c) for c in done.tool_calls]
        message["content"] = done.text or None
    logprobs = chat_logprobs(done.tokens) if body.logprobs else None
    return JSONResponse(completion(completion_id(), body.model, message, done.finish_reason, usage_of(done.final),
                                   logprobs))  # fmt: skip


def openai_call(call: dict[str, Any]) -> dict[str, Any]:
    return {"id": call_id(), "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, instances: InstancesDep, http: HttpDep, metrics: MetricsDep, in_flight: InFlightDep
) -> StreamingResponse | JSONResponse:
    """A raw prompt, no chat template: what editors' code completion sends."""
    lines = await start(instances, http, metrics, in_flight, body.model, body.generate_body())
    cid = completion_id("cmpl-")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(text_sse(lines, cid, body, include_usage), media_type="text/event-stream")
    done = await gather(lines)
    logprobs = text_logprobs(done.tokens) if body.logprobs is not None else None
    choice = {"index": 0, "text": done.text, "logprobs": logprobs, "finish_reason": done.finish_reason}
    return JSONResponse(text_completion(cid, body.model, [choice]) | {"usage": usage_of(done.final).model_dump()})


def text_completion(cid: str, model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": cid, "object": "text_completion", "created": now(), "model": model, "choices": choices}


async def text_sse(lines: Events, cid: str, body: CompletionRequest, include_usage: bool) -> AsyncIterator[str]:
    async for item in events_or_error(lines):
        if isinstance(item, str):
            yield item
        elif "token" in item:
            logprobs = text_logprobs([item]) if body.logprobs is not None else None
            if item.get("text") or logprobs:
                choice = {"index": 0, "text": item.get("text", ""), "logprobs": logprobs, "finish_reason": None}
                yield data(text_completion(cid, body.model, [choice]))
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": item.get("finish_reason", "stop")}
            yield data(text_completion(cid, body.model, [choice]))
            if include_usage:
                yield data(text_completion(cid, body.model, []) | {"usage": usage_of(item).model_dump()})
    yield "data: [DONE]\n\n"


def usage_of(final: dict[str, Any]) -> Usage:
    prompt, done = int(final.get("prompt_tokens", 0)), int(final.get("completion_tokens", 0))
    cached = PromptTokensDetails(cached_tokens=int(final.get("cached_tokens", 0)))
    return Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done, prompt_tokens_details=cached)


async def events_or_error(lines: Events) -> AsyncIterator[dict[str, Any] | str]:
    """The runner's events; keep-alives and an error after the response started as ready SSE text."""
    try:
        async for event in lines:
            yield ": keep-alive\n\n" if event is None else event
    except HTTPException as exc:  # the response has started: the error goes to this client as an event
        kind = openai_error_type(exc.status_code)
        yield data({"error": {"message": str(exc.detail), "type": kind, "code": exc.status_code}})


async def sse(lines: Events, model: str, include_usage: bool) -> AsyncIterator[str]:
    cid = completion_id()
    yield data(chunk(cid, model, {"role": "assistant", "content": ""}))
    calls = 0
    async for item in events_or_error(lines):
        if isinstance(item, str):
            yield item
        elif "token" in item:
            logprobs = chat_logprobs([item]) if "logprob" in item else None
            if item.get("reasoning"):
                yield data(chunk(cid, model, {"reasoning_content": item["reasoning"]}))
            if item.get("text") or logprobs:
                yield data(chunk(cid, model, {"content": item.get("text", "")}, logprobs=logprobs))
            for call in item.get("tool_calls", []):
                yield from_call(cid, model, calls, call)
                calls += 1
        else:
            yield data(chunk(cid, model, {}, item.get("finish_reason", "stop")))
            if include_usage:
                yield data({**chunk(cid, model, {}), "choices": [], "usage": usage_of(item).model_dump()})
    yield "data: [DONE]\n\n"


def from_call(cid: str, model: str, index: int, call: dict[str, Any]) -> str:
    """A tool call as OpenAI streams one: its id and name first, then its arguments."""
    head = {"index": index, "id": call_id(), "type": "function", "function": {"name": call["name"], "arguments": ""}}
    arguments = {"index": index, "function": {"arguments": call["arguments"]}}
    return data(chunk(cid, model, {"tool_calls": [head]})) + data(chunk(cid, model, {"tool_calls": [arguments]}))


def data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
