"""Anthropic Messages: `POST /v1/messages` (streamed and not) and `/v1/messages/count_tokens`, for Claude Code and
Anthropic's clients. Translated to the runner's one request shape; the runner parses tool calls and reasoning."""

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse

from api.anthropic_types import CountRequest, MessagesRequest
from api.deps import HttpDep, InFlightDep, InstancesDep, MetricsDep
from api.errors import anthropic_error_type
from api.inference import call_id, gather, instance_for, start
from api.runners import Events, tokenize

router = APIRouter(prefix="/v1", tags=["anthropic"])
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


@router.post("/messages", response_model=None)
async def messages(
    body: MessagesRequest, instances: InstancesDep, http: HttpDep, metrics: MetricsDep, in_flight: InFlightDep
) -> StreamingResponse | JSONResponse:
    lines = await start(instances, http, metrics, in_flight, body.model, body.generate_body())
    mid = call_id("msg_")
    if body.stream:
        return StreamingResponse(stream(lines, mid, body.model), media_type="text/event-stream")
    done = await gather(lines)
    content: list[dict[str, Any]] = []
    if done.reasoning:
        content.append({"type": "thinking", "thinking": done.reasoning, "signature": ""})
    if done.text or not done.tool_calls:
        content.append({"type": "text", "text": done.text})
    content += [tool_use(c) for c in done.tool_calls]
    reason, sequence = stop_of(done.final)
    message = head(mid, body.model, done.final) | {"content": content, "stop_reason": reason, "stop_sequence": sequence}
    message["usage"]["output_tokens"] = int(done.final.get("completion_tokens", 0))
    return JSONResponse(message)


@router.post("/messages/count_tokens")
async def count_tokens(
    body: CountRequest, instances: InstancesDep, http: HttpDep, in_flight: InFlightDep
) -> dict[str, int]:
    instance = await instance_for(instances, body.model, in_flight)
    in_flight.release(str(instance.endpoint))  # a count holds no place in the batch
    request = {"messages": body.chat(), "tools": body.openai_tools(), "chat_template_kwargs": body.template_kwargs()}
    return {"input_tokens": await tokenize(http, instance, request)}


def tool_use(call: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id("toolu_"), "name": call["name"], "input": json.loads(call["arguments"])}


def stop_of(final: dict[str, Any]) -> tuple[str, str | None]:
    sequence = final.get("stop_sequence")
    if sequence:
        return "stop_sequence", str(sequence)
    return STOP_REASONS.get(str(final.get("finish_reason", "stop")), "end_turn"), None


def head(mid: str, model: str, final: dict[str, Any]) -> dict[str, Any]:
    usage = {
        "input_tokens": int(final.get("prompt_tokens", 0)),
        "output_tokens": 0,
        "cache_read_input_tokens": int(final.get("cached_tokens", 0)),
        "cache_creation_input_tokens": 0,
    }
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }


def event(name: str, payload: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **payload})}\n\n"


class Blocks:
    """The content blocks of a streamed message: one open at a time, each started, filled and stopped."""

    def __init__(self) -> None:
        self.index, self.kind = -1, ""

    def to(self, kind: str, block: dict[str, Any]) -> str:
        out = self.close()
        self.index, self.kind = self.index + 1, kind
        return out + event("content_block_start", {"index": self.index, "content_block": block})

    def delta(self, kind: str, delta: dict[str, Any], block: dict[str, Any]) -> str:
        start = self.to(kind, block) if self.kind != kind else ""
        return start + event("content_block_delta", {"index": self.index, "delta": delta})

    def close(self) -> str:
        if not self.kind:
            return ""
        self.kind = ""
        return event("content_block_stop", {"index": self.index})


async def stream(lines: Events, mid: str, model: str) -> AsyncIterator[str]:
    """Anthropic's event sequence: message_start, content blocks, message_delta, message_stop."""
    blocks, started = Blocks(), False
    try:
        async for item in lines:
            if not started:
                started = True
                yield event("message_start", {"message": head(mid, model, {})})
            if item is None:
                yield event("ping", {})
            elif "token" in item:
                if item.get("reasoning"):
                    yield blocks.delta(
                        "thinking",
                        {"type": "thinking_delta", "thinking": item["reasoning"]},
                        {"type": "thinking", "thinking": ""},
                    )
                if item.get("text"):
                    yield blocks.delta(
                        "text", {"type": "text_delta", "text": item["text"]}, {"type": "text", "text": ""}
                    )
                for call in item.get("tool_calls", []):
                    use = tool_use(call)
                    yield blocks.to("tool_use", {**use, "input": {}})
                    yield event(
                        "content_block_delta",
                        {
                            "index": blocks.index,
                            "delta": {"type": "input_json_delta", "partial_json": call["arguments"]},
                        },
                    )
                    yield blocks.close()
            else:
                if blocks.index < 0:
                    yield blocks.to("text", {"type": "text", "text": ""})
                yield blocks.close()
                reason, sequence = stop_of(item)
                usage = {
                    "output_tokens": int(item.get("completion_tokens", 0)),
                    "input_tokens": int(item.get("prompt_tokens", 0)),
                }
                yield event(
                    "message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": usage}
                )
                yield event("message_stop", {})
    except HTTPException as exc:  # the response has started: the error goes to this client as an event
        yield event("error", {"error": {"type": anthropic_error_type(exc.status_code), "message": str(exc.detail)}})
