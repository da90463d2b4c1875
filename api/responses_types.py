"""OpenAI Responses wire types (`POST /v1/responses`), translated to the runner's one request shape, and the
response made of the runner's events, streamed or not."""

import json
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from api.openai_types import MAX_TOKENS, TextPart, check_tool_choice, new_id, now, part_text, text_parts
from api.streaming import Stream, event

# tools that run on OpenAI's servers: the cluster cannot run them, so the model is not shown them
SERVER_TOOLS = ("web_search", "web_search_preview", "file_search", "image_generation", "code_interpreter",
                "computer_use_preview", "mcp")  # fmt: skip
NO_PARAMETERS = {"type": "object", "properties": {}}
# a custom (freeform) tool takes text: the model writes it as the one argument of a function
CUSTOM_PARAMETERS = {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}


SERVER_TOOL = "^(?:" + "|".join(SERVER_TOOLS) + ")"


class FunctionTool(BaseModel):
    """A function, a custom (freeform) tool, a namespace of them (Codex's multi_agent_v1), or a server tool (left
    out: the cluster cannot run it); any other type is refused."""

    type: Literal["function", "custom", "namespace"] | Annotated[str, Field(pattern=SERVER_TOOL)]
    name: str = ""
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    tools: list["FunctionTool"] | None = None  # a namespace's
    format: dict[str, Any] | None = None  # a custom tool's input grammar: not enforced, the model writes text

    @property
    def server_side(self) -> bool:
        return self.type.startswith(SERVER_TOOLS)


class Item(BaseModel):
    """An input item; its other keys (id, status...) are bookkeeping."""

    model_config = ConfigDict(extra="allow")


class MessageItem(Item):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextPart] = ""

    _text = field_validator("content", mode="before")(lambda value: text_parts(value, "input"))


class CallItem(Item):
    type: Literal["function_call"]
    name: str
    arguments: str = "{}"
    call_id: str = ""


class CustomCallItem(Item):
    type: Literal["custom_tool_call"]
    name: str
    input: str = ""
    call_id: str = ""


class OutputItem(Item):
    type: Literal["function_call_output", "custom_tool_call_output"]
    call_id: str = ""
    output: str | list[TextPart] = ""

    _text = field_validator("output", mode="before")(lambda value: text_parts(value, "input"))


class SkippedItem(Item):  # earlier reasoning (chat templates drop it too); a server tool's call never ran here
    type: Literal["reasoning", "web_search_call"]


def item_type(value: Any) -> str | None:
    """An input item's type (a message may leave it out)."""
    return value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[CallItem, Tag("function_call")]
    | Annotated[CustomCallItem, Tag("custom_tool_call")]
    | Annotated[OutputItem, Tag("function_call_output")]
    | Annotated[OutputItem, Tag("custom_tool_call_output")]
    | Annotated[SkippedItem, Tag("reasoning")]
    | Annotated[SkippedItem, Tag("web_search_call")],
    Discriminator(item_type),
]


class NamedChoice(BaseModel):
    type: Literal["function", "custom"] = "function"
    name: str


class PlainFormat(BaseModel):
    type: Literal["text", "json_object"]


class SchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)  # strict, description: hints
    type: Literal["json_schema"]
    name: str = ""
    schema_: dict[str, Any] = Field(alias="schema")


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="allow")  # verbosity: a hint
    format: Annotated[PlainFormat | SchemaFormat, Field(discriminator="type")] | None = None


class Reasoning(BaseModel):
    model_config = ConfigDict(extra="allow")  # summary: bookkeeping
    effort: str | None = None  # "none" turns a template's thinking off; the rest are hints


@dataclass(frozen=True)
class ToolView:
    """A tool as the model sees it (a function) and as the client named it."""

    name: str
    kind: str  # "function" or "custom"
    namespace: str | None = None
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: NO_PARAMETERS)


def callables(tools: list[FunctionTool], where: str = "tools") -> list[ToolView]:
    """The client's tools as functions: a namespace's tools each on their own, a custom tool as a function of
    its text, server tools left out."""
    out: list[ToolView] = []
    for i, tool in enumerate(tools):
        if tool.type == "function":
            out.append(ToolView(tool.name, "function", None, tool.description or "", tool.parameters or NO_PARAMETERS))
        elif tool.type == "custom":
            out.append(ToolView(tool.name, "custom", None, tool.description or "", CUSTOM_PARAMETERS))
        elif tool.type == "namespace":
            out += [replace(c, namespace=tool.name) for c in callables(tool.tools or [], f"{where}.{i}.tools")]
        elif not tool.server_side:
            raise ValueError(f"{where}.{i}: type {tool.type!r} is not supported: function, custom and namespace "
                             "tools are (server tools such as web_search are left out)")  # fmt: skip
    return out


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedChoice | None = None
    parallel_tool_calls: bool | None = None  # the model decides how many it makes
    max_output_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    text: TextOptions | None = None
    # hints and bookkeeping, accepted and ignored: nothing is stored either way (previous_response_id is
    # refused), the prefix cache needs no key, and encrypted reasoning is never produced
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    include: list[str] | None = None
    prompt_cache_key: str | None = None
    client_metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    truncation: str | None = None
    stream_options: dict[str, Any] | None = None
    reasoning: Reasoning | None = None

    @model_validator(mode="before")
    @classmethod
    def _named(cls, data: Any) -> Any:
        """Say which tool or choice is refused, and why, before the types are checked."""
        if isinstance(data, dict):
            choice = data.get("tool_choice")
            if not isinstance(choice, dict):
                check_tool_choice(choice)
            tools = data.get("tools")
            for i, tool in enumerate(tools if isinstance(tools, list) else []):
                kind = tool.get("type") if isinstance(tool, dict) else None
                known = kind in ("function", "custom", "namespace") or str(kind).startswith(SERVER_TOOLS)
                if isinstance(kind, str) and not known:
                    raise ValueError(f"tools.{i}: type {kind!r} is not supported: function, custom and namespace "
                                         "tools are (server tools such as web_search are left out)")  # fmt: skip
        return data

    @model_validator(mode="after")
    def _supported(self) -> "ResponsesRequest":
        names = [c.name for c in self.callables()]
        if isinstance(self.tool_choice, NamedChoice) and self.tool_choice.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.name!r}, which is not in tools")
        self.chat()
        return self

    def callables(self) -> list[ToolView]:
        return callables(self.tools or [])

    def tool_views(self) -> dict[str, ToolView]:
        return {c.name: c for c in self.callables()}

    def chat(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return [*out, {"role": "user", "content": self.input}]
        for i, item in enumerate(self.input):
            out.append(translate(item.model_dump(by_alias=True), f"input.{i}", out))
        return [m for m in out if m]

    def openai_tools(self) -> list[dict[str, Any]] | None:
        shown = self.callables()
        if isinstance(self.tool_choice, NamedChoice):
            shown = [c for c in shown if c.name == self.tool_choice.name]
        if not shown or self.tool_choice == "none":
            return None
        return [
            {"type": "function", "function": {"name": c.name, "description": c.description, "parameters": c.parameters}}
            for c in shown
        ]

    def template_kwargs(self) -> dict[str, Any]:
        return {"enable_thinking": False} if self.reasoning and self.reasoning.effort == "none" else {}

    def response_format(self) -> dict[str, Any] | None:
        fmt = self.text.format if self.text else None
        if fmt is None or fmt.type == "text":
            return None
        if isinstance(fmt, SchemaFormat):
            return {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema_}}
        return {"type": fmt.type}

    def conversation(self) -> str | None:
        """The client's own name for the conversation (Codex sends its session as `prompt_cache_key`)."""
        return self.prompt_cache_key or self.user

    def generate_body(self) -> dict[str, Any]:
        return {
            "messages": self.chat(),
            "max_tokens": self.max_output_tokens or 512,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "tools": self.openai_tools(),
            "tool_required": self.tool_choice == "required" or isinstance(self.tool_choice, NamedChoice),
            "response_format": self.response_format(),
            "chat_template_kwargs": self.template_kwargs(),
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
    if kind == "custom_tool_call":
        arguments = json.dumps({"input": item.get("input", "")}, ensure_ascii=False)
        return translate({**item, "type": "function_call", "arguments": arguments}, where, so_far)
    if kind in ("function_call_output", "custom_tool_call_output"):
        output = item.get("output", "")
        text = output if isinstance(output, str) else "".join(part_text(p, where) for p in output)
        return {"role": "tool", "tool_call_id": item.get("call_id", ""), "content": text}
    if kind in ("reasoning", "web_search_call"):
        return {}  # earlier reasoning: chat templates drop it too; a server tool's call never ran here
    raise ValueError(f"{where}: item type {kind!r} is not supported")


def dumped(value: BaseModel | str | None) -> dict[str, Any] | str | None:
    """A request's part as the response echoes it (as JSON has it)."""
    return value.model_dump(by_alias=True, exclude_none=True) if isinstance(value, BaseModel) else value


def message_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": new_id("msg_"),
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def call_item(call: dict[str, Any], tools: dict[str, ToolView]) -> dict[str, Any]:
    """The model's call as the client's tool takes it: a function call (with its namespace), or a custom tool's
    call with the text it was given."""
    tool = tools.get(call["name"])
    head = {"id": new_id("fc_" if tool is None or tool.kind == "function" else "ctc_"), "call_id": new_id("call_")}
    if tool is not None and tool.kind == "custom":
        return {"type": "custom_tool_call", **head, "name": call["name"], "input": custom_input(call["arguments"]),
                "status": "completed"}  # fmt: skip
    item = {"type": "function_call", **head, "name": call["name"], "arguments": call["arguments"]}
    item["status"] = "completed"
    if tool is not None and tool.namespace:
        item["namespace"] = tool.namespace
    return item


def custom_input(arguments: str) -> str:
    try:
        return str(json.loads(arguments)["input"])
    except (ValueError, KeyError, TypeError):
        return arguments  # the model wrote the text itself


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
        "tool_choice": dumped(body.tool_choice) or "auto",
        "parallel_tool_calls": True,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "text": dumped(body.text) or {"format": {"type": "text"}},
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
        self.rid, self.body, self.number, self.tools = new_id("resp_"), body, 0, body.tool_views()
        self.output: list[dict[str, Any]] = []
        self.text: dict[str, Any] | None = None  # the message item being streamed
        self.calling: dict[str, Any] | None = None  # the function call item being streamed

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
        for piece in item.get("tool_call_deltas", []):
            yield from self.call_delta(piece)
        for call in item.get("tool_calls", []):
            yield from self.close_text()
            if call.get("streamed") and self.calling is not None:
                yield from self.call_done(call)
            else:
                yield from self.call(call)

    def call_delta(self, piece: dict[str, Any]) -> Iterator[str]:
        """A function call as it is written (a custom tool's text comes whole, at its end)."""
        if "name" in piece:
            tool = self.tools.get(piece["name"])
            self.calling = None
            if tool is not None and tool.kind == "custom":
                return
            yield from self.close_text()
            self.calling = call_item({"name": piece["name"], "arguments": ""}, self.tools)
            self.output.append(self.calling)
            added = {**self.calling, "status": "in_progress"}
            yield self.emit("response.output_item.added", {"output_index": len(self.output) - 1, "item": added})
        if piece.get("arguments") and self.calling is not None:
            self.calling["arguments"] += piece["arguments"]
            where = {"output_index": self.output.index(self.calling), "item_id": self.calling["id"]}
            yield self.emit("response.function_call_arguments.delta", {**where, "delta": piece["arguments"]})

    def call_done(self, call: dict[str, Any]) -> Iterator[str]:
        done, self.calling = self.calling, None
        if done is None:
            return
        done["arguments"] = call["arguments"]
        where = {"output_index": self.output.index(done), "item_id": done["id"]}
        yield self.emit("response.function_call_arguments.done", {**where, "arguments": done["arguments"]})
        yield self.emit("response.output_item.done", {"output_index": where["output_index"], "item": done})

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
        done = call_item(call, self.tools)
        self.output.append(done)
        at = len(self.output) - 1
        field, events = ("input", "custom_tool_call_input") if done["type"] == "custom_tool_call" else (
            "arguments", "function_call_arguments")  # fmt: skip
        yield self.emit("response.output_item.added",
                        {"output_index": at, "item": {**done, field: "", "status": "in_progress"}})  # fmt: skip
        where = {"output_index": at, "item_id": done["id"]}
        yield self.emit(f"response.{events}.delta", {**where, "delta": done[field]})
        yield self.emit(f"response.{events}.done", {**where, field: done[field]})
        yield self.emit("response.output_item.done", {"output_index": at, "item": done})

    def error(self, exc: HTTPException) -> str:
        return self.emit("error", {"code": str(exc.status_code), "message": str(exc.detail), "param": None})
