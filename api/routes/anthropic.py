"""Anthropic Messages: `POST /v1/messages` (streamed and not) and `/v1/messages/count_tokens`, for Claude Code and
Anthropic's clients. Translated to the runner's one request shape; the runner parses tool calls and reasoning."""

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from api.anthropic_types import CountRequest, MessagesRequest, MessageStream, message_head, stop_of, tool_use
from api.deps import InferenceDep
from api.inference import gather
from api.openai_types import new_id
from api.schemas import INFERENCE_STATUSES, AnthropicErrorOut, error_responses, streamed
from api.streaming import sse_response

router = APIRouter(prefix="/v1", tags=["anthropic"], responses=error_responses(AnthropicErrorOut, INFERENCE_STATUSES))


@router.post("/messages", response_model=None, responses=streamed("text/event-stream"))
async def messages(body: MessagesRequest, inference: InferenceDep) -> StreamingResponse | JSONResponse:
    lines = await inference.start(body.model, body.generate_body(), body.conversation())
    if body.stream:
        return sse_response(lines, MessageStream(body.model))
    done = await gather(lines)
    content: list[dict[str, Any]] = []
    if done.reasoning:
        content.append({"type": "thinking", "thinking": done.reasoning, "signature": ""})
    if done.text or not done.tool_calls:
        content.append({"type": "text", "text": done.text})
    content += [tool_use(c) for c in done.tool_calls]
    reason, sequence = stop_of(done.final)
    message = message_head(new_id("msg_"), body.model, done.final)
    message |= {"content": content, "stop_reason": reason, "stop_sequence": sequence}
    return JSONResponse(message)


@router.post("/messages/count_tokens")
async def count_tokens(body: CountRequest, inference: InferenceDep) -> dict[str, int]:
    request = {"messages": body.chat(), "tools": body.openai_tools(), "chat_template_kwargs": body.template_kwargs()}
    return {"input_tokens": await inference.count_tokens(body.model, request)}
