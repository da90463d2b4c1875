"""Anthropic Messages wire types, their translation to the runner's one request shape (OpenAI-style chat), and
the messages made of the runner's events, streamed or not."""

import json
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.errors import anthropic_error_type
from api.openai_types import MAX_TOKENS, new_id
from api.streaming import Stream, event

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(Strict):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class AnthropicTool(BaseModel):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    type: str | None = None  # "custom" or absent; server tools are refused below
    cache_control: dict[str, Any] | None = None


class CountRequest(Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _supported(self) -> "CountRequest":
        for tool in self.tools or []:
            if tool.type not in (None, "custom"):
                raise ValueError(f"tool type {tool.type!r} is not supported: only client tools (custom) are")
        kind = (self.tool_choice or {}).get("type")
        if kind not in (None, "auto", "any", "tool", "none"):
            raise ValueError(f"tool_choice type {kind!r} is not supported")
        self.chat()  # every block must translate
        return self

    def chat(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        system = block_text(self.system, "system") if self.system else ""
        if system:
            out.append({"role": "system", "content": system})
        for i, message in enumerate(self.messages):
            out += translate(message, f"messages.{i}")
        return out

    def openai_tools(self) -> list[dict[str, Any]] | None:
        kind = (self.tool_choice or {}).get("type")
        if not self.tools or kind == "none":
            return None
        tools = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description or "", "parameters": t.input_schema},
            }
            for t in self.tools
        ]
        if kind == "tool":
            name = (self.tool_choice or {}).get("name")
            tools = [t for t in tools if t["function"]["name"] == name]
            if not tools:
                raise ValueError(f"tool_choice names {name!r}, which is not in tools")
        return tools

    def template_kwargs(self) -> dict[str, Any]:
        if self.thinking is None:
            return {}
        return {"enable_thinking": self.thinking.get("type") == "enabled"}


class MessagesRequest(CountRequest):
    max_tokens: int = Field(ge=1, le=MAX_TOKENS)
    stream: bool = False
    stop_sequences: list[str] | None = Field(default=None, max_length=4)
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    metadata: dict[str, Any] | None = None  # accepted: it changes nothing in the output
    service_tier: str | None = None  # likewise

    def generate_body(self) -> dict[str, Any]:
        return {
            "messages": self.chat(),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": [s for s in self.stop_sequences or [] if s],
            "tools": self.openai_tools(),
            "chat_template_kwargs": self.template_kwargs(),
        }


def block_text(content: str | list[dict[str, Any]], where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if block.get("type") != "text":
            raise ValueError(f"{where}: block type {block.get('type')!r} is not supported here: only text")
        parts.append(str(block.get("text", "")))
    return "".join(parts)


def translate(message: Message, where: str) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: tool results become `tool` messages, tool uses `tool_calls`."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    text, calls, results = "", [], []
    for block in message.content:
        kind = block.get("type")
        if kind == "text":
            text += str(block.get("text", ""))
        elif kind == "tool_use" and message.role == "assistant":
            arguments = json.dumps(block.get("input", {}), ensure_ascii=False)
            calls.append(
                {"id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": arguments}}
            )
        elif kind == "tool_result" and message.role == "user":
            content = block.get("content", "")
            results.append(
                {"role": "tool", "tool_call_id": block["tool_use_id"], "content": block_text(content, where)}
            )
        elif kind in ("thinking", "redacted_thinking") and message.role == "assistant":
            continue  # earlier reasoning: chat templates drop it too
        else:
            raise ValueError(f"{where}: content block type {kind!r} is not supported in a {message.role} message")
    out: list[dict[str, Any]] = [*results]
    if calls:
        out.append({"role": "assistant", "content": text, "tool_calls": calls})
    elif text or not results:
        out.append({"role": message.role, "content": text})
    return out


def tool_use(call: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": new_id("toolu_"), "name": call["name"], "input": json.loads(call["arguments"])}


def stop_of(final: dict[str, Any]) -> tuple[str, str | None]:
    sequence = final.get("stop_sequence")
    if sequence:
        return "stop_sequence", str(sequence)
    return STOP_REASONS.get(str(final.get("finish_reason", "stop")), "end_turn"), None


def message_head(mid: str, model: str, final: dict[str, Any]) -> dict[str, Any]:
    """A message with no content yet, its usage as far as `final` (the runner's final event) tells it."""
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


class MessageStream(Stream):
    """Anthropic's event sequence: message_start, content blocks, message_delta, message_stop; pings meanwhile."""

    keep_alive = event("ping", {})

    def __init__(self, model: str) -> None:
        self.mid, self.model, self.blocks = new_id("msg_"), model, Blocks()

    def opening(self) -> Iterator[str]:
        yield event("message_start", {"message": message_head(self.mid, self.model, {})})

    def frames(self, item: dict[str, Any]) -> Iterator[str]:
        if "token" not in item:
            yield from self.ending(item)
            return
        if item.get("reasoning"):
            thinking = {"type": "thinking_delta", "thinking": item["reasoning"]}
            yield self.blocks.delta("thinking", thinking, {"type": "thinking", "thinking": ""})
        if item.get("text"):
            yield self.blocks.delta("text", {"type": "text_delta", "text": item["text"]}, {"type": "text", "text": ""})
        for call in item.get("tool_calls", []):
            yield self.blocks.to("tool_use", {**tool_use(call), "input": {}})
            delta = {"type": "input_json_delta", "partial_json": call["arguments"]}
            yield event("content_block_delta", {"index": self.blocks.index, "delta": delta})
            yield self.blocks.close()

    def ending(self, final: dict[str, Any]) -> Iterator[str]:
        if self.blocks.index < 0:  # a message has at least one block
            yield self.blocks.to("text", {"type": "text", "text": ""})
        yield self.blocks.close()
        reason, sequence = stop_of(final)
        usage = {
            "output_tokens": int(final.get("completion_tokens", 0)),
            "input_tokens": int(final.get("prompt_tokens", 0)),
        }
        yield event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": usage})
        yield event("message_stop", {})

    def error(self, exc: HTTPException) -> str:
        return event("error", {"error": {"type": anthropic_error_type(exc.status_code), "message": str(exc.detail)}})
