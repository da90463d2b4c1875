"""Anthropic Messages wire types, their translation to the runner's one request shape (OpenAI-style chat), and
the messages made of the runner's events, streamed or not."""

import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.errors import anthropic_error_type
from api.openai_types import MAX_TOKENS, new_id
from api.streaming import Stream, event

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Anthropic's server tools run on Anthropic's servers; the cluster cannot run them, so the model is not shown them
SERVER_TOOLS = ("web_search_", "web_fetch_", "code_execution_", "tool_search_tool_")


class Hinted(BaseModel):
    """A block whose other keys (`cache_control`, `citations`, `signature`...) are hints: they change nothing."""

    model_config = ConfigDict(extra="allow")


class TextBlock(Hinted):
    type: Literal["text"]
    text: str


class TextSource(Hinted):
    type: Literal["text"]
    data: str


class DocumentBlock(Hinted):
    type: Literal["document"]
    source: TextSource  # a plain-text document; the served models take text only


class ToolUseBlock(Hinted):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


TextLike = Annotated[TextBlock | DocumentBlock, Field(discriminator="type")]


class ToolResultBlock(Hinted):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextLike] = ""


class ThinkingBlock(Hinted):  # earlier reasoning: chat templates drop it too
    type: Literal["thinking", "redacted_thinking"]


class UserMessage(Strict):
    role: Literal["user"]
    content: str | list[Annotated[TextBlock | DocumentBlock | ToolResultBlock, Field(discriminator="type")]]


class AssistantMessage(Strict):
    role: Literal["assistant"]
    content: (
        str | list[Annotated[TextBlock | DocumentBlock | ToolUseBlock | ThinkingBlock, Field(discriminator="type")]]
    )


class SystemMessage(Strict):  # Claude Code's mid-conversation system messages
    role: Literal["system"]
    content: str | list[TextLike]


Message = Annotated[UserMessage | AssistantMessage | SystemMessage, Field(discriminator="role")]
SERVER_TOOL = "^(?:" + "|".join(SERVER_TOOLS) + ")"


class AnthropicTool(BaseModel):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    # "custom" or absent; server tools are dropped (the model is not shown them), any other type is refused
    type: Literal["custom"] | Annotated[str, Field(pattern=SERVER_TOOL)] | None = None
    cache_control: dict[str, Any] | None = None  # a caching hint: the prefix cache works without it

    @property
    def server_side(self) -> bool:
        return (self.type or "").startswith(SERVER_TOOLS)


class AutoChoice(Hinted):  # disable_parallel_tool_use: the model decides how many calls it makes
    type: Literal["auto", "any", "none"]


class NamedChoice(Hinted):
    type: Literal["tool"]
    name: str


class Thinking(Hinted):  # budget_tokens: a hint
    type: Literal["enabled", "disabled", "adaptive"]


class OutputFormat(Hinted):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Hinted):  # effort: a hint
    format: OutputFormat | None = None


class CountRequest(Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextLike] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: Annotated[AutoChoice | NamedChoice, Field(discriminator="type")] | None = None
    thinking: Thinking | None = None
    context_management: dict[str, Any] | None = None  # server-side context editing: nothing is stored to edit
    output_config: OutputConfig | None = None  # `format` (a JSON schema) is enforced

    @model_validator(mode="before")
    @classmethod
    def _supported(cls, data: Any) -> Any:
        """Say which tool is refused, and why, before the types are checked."""
        tools = data.get("tools") if isinstance(data, dict) else None
        for tool in tools if isinstance(tools, list) else []:
            kind = tool.get("type") if isinstance(tool, dict) else None
            if isinstance(kind, str) and kind != "custom" and not kind.startswith(SERVER_TOOLS):
                raise ValueError(f"tool type {kind!r} is not supported: only client tools (custom) are")
        return data

    @model_validator(mode="after")
    def _translates(self) -> "CountRequest":
        self.chat()  # every block must translate
        return self

    def chat(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        system = block_text(dumped(self.system), "system") if self.system else ""
        if system:
            out.append({"role": "system", "content": system})
        for i, message in enumerate(self.messages):
            out += translate(message, f"messages.{i}")
        return out

    def openai_tools(self) -> list[dict[str, Any]] | None:
        kind = self.tool_choice.type if self.tool_choice else None
        client_tools = [t for t in self.tools or [] if not t.server_side]
        if not client_tools or kind == "none":
            return None
        tools = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description or "", "parameters": t.input_schema},
            }
            for t in client_tools
        ]
        if isinstance(self.tool_choice, NamedChoice):
            name = self.tool_choice.name
            tools = [t for t in tools if t["function"]["name"] == name]
            if not tools:
                raise ValueError(f"tool_choice names {name!r}, which is not in tools")
        return tools

    def template_kwargs(self) -> dict[str, Any]:
        """`enabled` and `disabled` switch a template's thinking; `adaptive` (Claude Code's) leaves the template's
        default."""
        kind = self.thinking.type if self.thinking else None
        return {"enable_thinking": kind == "enabled"} if kind in ("enabled", "disabled") else {}

    def response_format(self) -> dict[str, Any] | None:
        fmt = self.output_config.format if self.output_config else None
        if fmt is None:
            return None
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.schema_}}


class MessagesRequest(CountRequest):
    max_tokens: int = Field(ge=1, le=MAX_TOKENS)
    stream: bool = False
    stop_sequences: list[str] | None = Field(default=None, max_length=4)
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    metadata: dict[str, Any] | None = None  # accepted: it changes nothing in the output
    service_tier: str | None = None  # likewise

    def conversation(self) -> str | None:
        """Claude Code names its session in `metadata.user_id`."""
        user = (self.metadata or {}).get("user_id")
        return str(user) if user else None

    def generate_body(self) -> dict[str, Any]:
        return {
            "messages": self.chat(),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": [s for s in self.stop_sequences or [] if s],
            "tools": self.openai_tools(),
            "tool_required": self.tool_choice is not None and self.tool_choice.type in ("any", "tool"),
            "chat_template_kwargs": self.template_kwargs(),
            "response_format": self.response_format(),
        }


def dumped(content: str | list[Any]) -> str | list[dict[str, Any]]:
    return content if isinstance(content, str) else [block.model_dump(by_alias=True) for block in content]


def block_text(content: str | list[dict[str, Any]], where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        text = text_of(block)
        if text is None:
            raise ValueError(f"{where}: block type {block.get('type')!r} is not supported here: only text")
        parts.append(text)
    return "".join(parts)


def text_of(block: dict[str, Any]) -> str | None:
    """A text block's text, or a plain-text document's; None for any other block. `cache_control` and
    `citations` are hints and ignored."""
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text", ""))
    source = block.get("source") or {}
    if kind == "document" and source.get("type") == "text":
        return str(source.get("data", ""))
    return None


def translate(message: UserMessage | AssistantMessage | SystemMessage, where: str) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: tool results become `tool` messages, tool uses `tool_calls`."""
    content = dumped(message.content)
    if isinstance(content, str) or message.role == "system":
        return [{"role": message.role, "content": block_text(content, where)}]
    text, calls, results = "", [], []
    for block in content:
        kind = block.get("type")
        if text_of(block) is not None:
            text += str(text_of(block))
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
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage_of(final),
    }


def usage_of(final: dict[str, Any]) -> dict[str, int]:
    """Anthropic's usage: `input_tokens` are those computed for this request; the prompt tokens the prefix cache
    held are `cache_read_input_tokens` (the prompt is their sum, as Claude Code counts its context)."""
    cached = int(final.get("cached_tokens", 0))
    return {
        "input_tokens": int(final.get("prompt_tokens", 0)) - cached,
        "output_tokens": int(final.get("completion_tokens", 0)),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
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
        for piece in item.get("tool_call_deltas", []):
            if "name" in piece:
                block = {"type": "tool_use", "id": new_id("toolu_"), "name": piece["name"], "input": {}}
                yield self.blocks.to("tool_use", block)
            if piece.get("arguments"):
                delta = {"type": "input_json_delta", "partial_json": piece["arguments"]}
                yield event("content_block_delta", {"index": self.blocks.index, "delta": delta})
        for call in item.get("tool_calls", []):
            if not call.get("streamed"):
                yield self.blocks.to("tool_use", {**tool_use(call), "input": {}})
                delta = {"type": "input_json_delta", "partial_json": call["arguments"]}
                yield event("content_block_delta", {"index": self.blocks.index, "delta": delta})
            yield self.blocks.close()

    def ending(self, final: dict[str, Any]) -> Iterator[str]:
        if self.blocks.index < 0:  # a message has at least one block
            yield self.blocks.to("text", {"type": "text", "text": ""})
        yield self.blocks.close()
        reason, sequence = stop_of(final)
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        yield event("message_delta", {"delta": delta, "usage": usage_of(final)})
        yield event("message_stop", {})

    def error(self, exc: HTTPException) -> str:
        return event("error", {"error": {"type": anthropic_error_type(exc.status_code), "message": str(exc.detail)}})
