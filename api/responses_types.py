"""OpenAI Responses wire types (`POST /v1/responses`), translated to the runner's one request shape, and the
response made of the runner's events, streamed or not."""

from collections.abc import Generator, Iterator
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.openai_types import MAX_TOKENS, check_tool_choice, new_id, now, part_text
from api.streaming import Stream, event


class FunctionTool(BaseModel):
    type: str
    name: str = ""
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # the model decides how many it makes
    max_output_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    store: bool | None = None  # nothing is stored either way: previous_response_id is refused
    metadata: dict[str, Any] | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _supported(self) -> "ResponsesRequest":
        for tool in self.tools or []:
            if tool.type != "function":
                raise ValueError(f"tools: type {tool.type!r} is not supported: only function tools are")
        check_tool_choice(
            self.tool_choice if not isinstance(self.tool_choice, dict) else {"type": "function", **self.tool_choice}
        )
        self.chat()
        return self

    def chat(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return [*out, {"role": "user", "content": self.input}]
        for i, item in enumerate(self.input):
            out.append(translate(item, f"input.{i}", out))
        return [m for m in out if m]

    def openai_tools(self) -> list[dict[str, Any]] | None:
        if not self.tools or self.tool_choice == "none":
            return None
        tools = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description or "", "parameters": t.parameters},
            }
            for t in self.tools
        ]
        if isinstance(self.tool_choice, dict):
            tools = [t for t in tools if t["function"]["name"] == self.tool_choice.get("name")]
        return tools

    def response_format(self) -> dict[str, Any] | None:
        fmt = (self.text or {}).get("format")
        if not fmt or fmt.get("type") == "text":
            return None
        if fmt.get("type") == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": fmt.get("name", ""), "schema": fmt.get("schema")}}
        return {"type": fmt.get("type")}

    def generate_body(self) -> dict[str, Any]:
        return {
            "messages": self.chat(),
            "max_tokens": self.max_output_tokens or 512,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "tools": self.openai_tools(),
            "response_format": self.response_format(),
        }


def translate(item: dict[str, Any], where: str, so_far: list[dict[str, Any]]) -> dict[str, Any]:
    """One input item as a chat message; a function call joins the assistant message before it (returns {})."""
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise ValueError(f"{where}: role {role!r} is not supported")
        content = item.get("content", "")
        text = content if isinstance(content, str) else "".join(part_text(p, where) for p in content)
        return {"role": "system" if role == "developer" else role, "content": text}
    if kind == "function_call":
        call = {
            "id": item.get("call_id", ""),
            "type": "function",
            "function": {"name": item["name"], "arguments": item.get("arguments", "{}")},
        }
        if so_far and so_far[-1].get("role") == "assistant":
            so_far[-1].setdefault("tool_calls", []).append(call)
            return {}
        return {"role": "assistant", "content": "", "tool_calls": [call]}
    if kind == "function_call_output":
        output = item.get("output", "")
        text = output if isinstance(output, str) else "".join(part_text(p, where) for p in output)
        return {"role": "tool", "tool_call_id": item.get("call_id", ""), "content": text}
    if kind == "reasoning":
        return {}  # earlier reasoning: chat templates drop it too
    raise ValueError(f"{where}: item type {kind!r} is not supported")


def message_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": new_id("msg_"),
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def call_item(call: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": new_id("fc_"),
        "call_id": new_id("call_"),
        "name": call["name"],
        "arguments": call["arguments"],
        "status": "completed",
    }


def reasoning_item(text: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": new_id("rs_"),
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def response(rid: str, body: ResponsesRequest, output: list[dict[str, Any]], final: dict[str, Any]) -> dict[str, Any]:
    """The response object; `final` is the runner's final event ({} while it is in progress)."""
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


class ResponseStream(Stream):
    """The Responses API's events, numbered: created, in progress, output items as they come, completed."""

    def __init__(self, body: ResponsesRequest) -> None:
        self.rid, self.body, self.number = new_id("resp_"), body, 0
        self.output: list[dict[str, Any]] = []
        self.text: dict[str, Any] | None = None  # the message item being streamed

    def emit(self, name: str, payload: dict[str, Any]) -> str:
        self.number += 1
        return event(name, {"sequence_number": self.number, **payload})

    def opening(self) -> Iterator[str]:
        yield self.emit("response.created", {"response": response(self.rid, self.body, [], {})})
        yield self.emit("response.in_progress", {"response": response(self.rid, self.body, [], {})})

    def frames(self, item: dict[str, Any]) -> Iterator[str]:
        if "token" not in item:  # the final event
            yield from self.close_text()
            yield self.emit("response.completed", {"response": response(self.rid, self.body, self.output, item)})
            return
        if item.get("text"):
            text = yield from self.open_text()
            text["content"][0]["text"] += item["text"]
            where = {"output_index": len(self.output) - 1, "item_id": text["id"], "content_index": 0}
            yield self.emit("response.output_text.delta", {**where, "delta": item["text"]})
        for call in item.get("tool_calls", []):
            yield from self.close_text()
            yield from self.call(call)

    def open_text(self) -> Generator[str, None, dict[str, Any]]:
        """The message item being streamed, added (and announced) if there is none yet."""
        if self.text is not None:
            return self.text
        self.text = message_item("", "in_progress")
        self.output.append(self.text)
        at = len(self.output) - 1
        yield self.emit("response.output_item.added", {"output_index": at, "item": self.text})
        part = {"type": "output_text", "text": "", "annotations": []}
        yield self.emit("response.content_part.added",
                        {"output_index": at, "item_id": self.text["id"], "content_index": 0, "part": part})  # fmt: skip
        return self.text

    def close_text(self) -> Iterator[str]:
        if self.text is None:
            return
        text, self.text = self.text, None
        text["status"] = "completed"
        part, at = text["content"][0], self.output.index(text)
        where = {"output_index": at, "item_id": text["id"], "content_index": 0}
        yield self.emit("response.output_text.done", {**where, "text": part["text"]})
        yield self.emit("response.content_part.done", {**where, "part": part})
        yield self.emit("response.output_item.done", {"output_index": at, "item": text})

    def call(self, call: dict[str, Any]) -> Iterator[str]:
        done = call_item(call)
        self.output.append(done)
        at = len(self.output) - 1
        yield self.emit("response.output_item.added",
                        {"output_index": at, "item": {**done, "arguments": "", "status": "in_progress"}})  # fmt: skip
        where = {"output_index": at, "item_id": done["id"]}
        yield self.emit("response.function_call_arguments.delta", {**where, "delta": call["arguments"]})
        yield self.emit("response.function_call_arguments.done", {**where, "arguments": call["arguments"]})
        yield self.emit("response.output_item.done", {"output_index": at, "item": done})

    def error(self, exc: HTTPException) -> str:
        return self.emit("error", {"code": str(exc.status_code), "message": str(exc.detail), "param": None})
