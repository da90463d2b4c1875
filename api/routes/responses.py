"""OpenAI Responses: `POST /v1/responses`, streamed and not, for Codex and the Agents SDK. Stateless: nothing is
stored, so a request carries its whole conversation (previous_response_id is refused)."""

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import HttpDep, InFlightDep, InstancesDep, MetricsDep
from api.inference import Gathered, call_id, gather, start
from api.openai_types import now
from api.responses_types import ResponsesRequest
from api.runners import Events

router = APIRouter(prefix="/v1", tags=["responses"])


@router.post("/responses", response_model=None)
async def responses(
    body: ResponsesRequest, instances: InstancesDep, http: HttpDep, metrics: MetricsDep, in_flight: InFlightDep
) -> StreamingResponse | JSONResponse:
    lines = await start(instances, http, metrics, in_flight, body.model, body.generate_body())
    rid = call_id("resp_")
    if body.stream:
        return StreamingResponse(stream(lines, rid, body), media_type="text/event-stream")
    done = await gather(lines)
    return JSONResponse(response(rid, body, output_of(done), done.final))


def message_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": call_id("msg_"),
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def call_item(call: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": call_id("fc_"),
        "call_id": call_id(),
        "name": call["name"],
        "arguments": call["arguments"],
        "status": "completed",
    }


def reasoning_item(text: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": call_id("rs_"),
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def output_of(done: Gathered) -> list[dict[str, Any]]:
    out = [reasoning_item(done.reasoning)] if done.reasoning else []
    if done.text or not done.tool_calls:
        out.append(message_item(done.text))
    return out + [call_item(c) for c in done.tool_calls]


def response(rid: str, body: ResponsesRequest, output: list[dict[str, Any]], final: dict[str, Any]) -> dict[str, Any]:
    prompt, made = int(final.get("prompt_tokens", 0)), int(final.get("completion_tokens", 0))
    incomplete = final.get("finish_reason") == "length"
    return {
        "id": rid,
        "object": "response",
        "created_at": now(),
        "model": body.model,
        "status": "incomplete" if incomplete else ("completed" if final else "in_progress"),
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "error": None,
        "instructions": body.instructions,
        "output": output,
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
        "tool_choice": body.tool_choice or "auto",
        "parallel_tool_calls": True,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "text": body.text or {"format": {"type": "text"}},
        "usage": {
            "input_tokens": prompt,
            "output_tokens": made,
            "total_tokens": prompt + made,
            "input_tokens_details": {"cached_tokens": int(final.get("cached_tokens", 0))},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


class Events_:
    """Numbered SSE events of one response."""

    def __init__(self) -> None:
        self.number = 0

    def __call__(self, name: str, payload: dict[str, Any]) -> str:
        self.number += 1
        return f"event: {name}\ndata: {json.dumps({'type': name, 'sequence_number': self.number, **payload})}\n\n"


async def stream(lines: Events, rid: str, body: ResponsesRequest) -> AsyncIterator[str]:
    emit, output = Events_(), []
    text: dict[str, Any] | None = None  # the message item being streamed
    yield emit("response.created", {"response": response(rid, body, [], {})})
    yield emit("response.in_progress", {"response": response(rid, body, [], {})})
    try:
        async for item in lines:
            if item is None or "token" not in item:
                if item is not None:  # the final event
                    if text is not None:
                        yield close_text(emit, text, len(output) - 1)
                    yield emit("response.completed", {"response": response(rid, body, output, item)})
                continue
            if item.get("text"):
                if text is None:
                    text = message_item("", "in_progress")
                    output.append(text)
                    yield emit("response.output_item.added", {"output_index": len(output) - 1, "item": text})
                    yield emit(
                        "response.content_part.added",
                        {
                            "output_index": len(output) - 1,
                            "item_id": text["id"],
                            "content_index": 0,
                            "part": {"type": "output_text", "text": "", "annotations": []},
                        },
                    )
                text["content"][0]["text"] += item["text"]
                yield emit(
                    "response.output_text.delta",
                    {"output_index": len(output) - 1, "item_id": text["id"], "content_index": 0, "delta": item["text"]},
                )
            for call in item.get("tool_calls", []):
                if text is not None:
                    yield close_text(emit, text, len(output) - 1)
                    text = None
                done = call_item(call)
                output.append(done)
                at = len(output) - 1
                yield emit(
                    "response.output_item.added",
                    {"output_index": at, "item": {**done, "arguments": "", "status": "in_progress"}},
                )
                yield emit(
                    "response.function_call_arguments.delta",
                    {"output_index": at, "item_id": done["id"], "delta": call["arguments"]},
                )
                yield emit(
                    "response.function_call_arguments.done",
                    {"output_index": at, "item_id": done["id"], "arguments": call["arguments"]},
                )
                yield emit("response.output_item.done", {"output_index": at, "item": done})
    except HTTPException as exc:  # the response has started: the error goes to this client as an event
        yield emit("error", {"code": str(exc.status_code), "message": str(exc.detail), "param": None})


def close_text(emit: Events_, text: dict[str, Any], at: int) -> str:
    text["status"] = "completed"
    part = text["content"][0]
    return (
        emit(
            "response.output_text.done",
            {"output_index": at, "item_id": text["id"], "content_index": 0, "text": part["text"]},
        )
        + emit(
            "response.content_part.done", {"output_index": at, "item_id": text["id"], "content_index": 0, "part": part}
        )
        + emit("response.output_item.done", {"output_index": at, "item": text})
    )
