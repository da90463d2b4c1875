"""OpenAI-compatible inference: the request goes to rank 0's runner; tokens never pass through Temporal."""

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import HttpDep, InferenceDep, InstancesDep
from api.inference import gather
from api.openai_types import (
    ChatRequest,
    ChatStream,
    CompletionRequest,
    ModelCard,
    ModelList,
    Placement,
    TextStream,
    chat_logprobs,
    completion,
    new_id,
    now,
    text_completion,
    text_logprobs,
    tool_call,
    usage_of,
)
from api.runners import context_length
from api.schemas import INFERENCE_STATUSES, ErrorOut, error_responses, streamed
from api.streaming import sse_response
from shardline.states import InstanceState

router = APIRouter(prefix="/v1", tags=["openai"], responses=error_responses(ErrorOut, INFERENCE_STATUSES))


@router.get("/models", response_model=ModelList)
async def list_models(instances: InstancesDep, http: HttpDep) -> ModelList:
    ready = [i for i in await instances.all() if i.state == InstanceState.READY]
    contexts = await asyncio.gather(*(context_length(http, i) for i in ready))
    cards: dict[str, ModelCard] = {}
    for instance, context in sorted(zip(ready, contexts, strict=True), key=lambda p: p[0].model_id):
        card = cards.setdefault(instance.model_id, ModelCard(id=instance.model_id, created=now()))
        card.context_length = card.context_length or context
        card.placement.append(Placement.of(instance))
    return ModelList(data=list(cards.values()))


@router.post("/chat/completions", response_model=None, responses=streamed("text/event-stream"))
async def chat_completions(body: ChatRequest, inference: InferenceDep) -> StreamingResponse | JSONResponse:
    lines = await inference.start(body.model, body.generate_body(), body.conversation())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(lines, ChatStream(body.model, include_usage))
    done = await gather(lines)
    message: dict[str, Any] = {"role": "assistant", "content": done.text}
    if done.reasoning:
        message["reasoning_content"] = done.reasoning
    if done.tool_calls:
        message["tool_calls"] = [tool_call(c) for c in done.tool_calls]
        message["content"] = done.text or None
    logprobs = chat_logprobs(done.tokens) if body.logprobs else None
    return JSONResponse(completion(new_id("chatcmpl-"), body.model, message, done.finish_reason, usage_of(done.final),
                                   logprobs))  # fmt: skip


@router.post("/completions", response_model=None, responses=streamed("text/event-stream"))
async def completions(body: CompletionRequest, inference: InferenceDep) -> StreamingResponse | JSONResponse:
    """A raw prompt, no chat template: what editors' code completion sends."""
    lines = await inference.start(body.model, body.generate_body(), body.conversation())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(lines, TextStream(body.model, body.logprobs is not None, include_usage))
    done = await gather(lines)
    logprobs = text_logprobs(done.tokens) if body.logprobs is not None else None
    choice = {"index": 0, "text": done.text, "logprobs": logprobs, "finish_reason": done.finish_reason}
    usage = {"usage": usage_of(done.final).model_dump()}
    return JSONResponse(text_completion(new_id("cmpl-"), body.model, [choice]) | usage)
