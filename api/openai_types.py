"""OpenAI wire types: what /v1/chat/completions, /v1/completions and /v1/models take and give, streamed or not.

A field OpenAI defines that shardline cannot honour is refused (400 naming it), never ignored:
requests forbid unknown fields, and those that are known but limited say so in their validators.
"""

import math
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from api.errors import openai_error_type
from api.streaming import DONE, Stream, data
from shardline.types import MAX_DRAFT_TOKENS
from workflows.serve import InstanceStatus

MAX_TOKENS = 32768
UNLIKELY = -9999.0


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


TEXT_PARTS = ("text", "input_text", "output_text")


class TextPart(BaseModel):
    """A content part the served models take: text (other keys, such as annotations, change nothing)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "input_text", "output_text"]
    text: str = ""


def part_text(part: dict[str, Any], where: str) -> str:
    kind = part.get("type")
    if kind not in TEXT_PARTS:
        raise ValueError(f"{where} content part type {kind!r} is not supported: this model takes text only")
    text = part.get("text", "")
    if not isinstance(text, str):
        raise ValueError(f"{where} content part's text must be a string")
    return text


def text_parts(value: Any, where: str) -> Any:
    """Content as text or text parts: a part the model cannot take is named before its type is checked."""
    if isinstance(value, list):
        for part in value:
            if isinstance(part, dict):
                part_text(part, where)
    return value


class FunctionCall(BaseModel):
    name: str
    arguments: str = "{}"


class ToolCall(BaseModel):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # a reasoning model's earlier thinking; templates may drop it

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        return text_parts(value, "a message's")

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


class StreamOptions(Strict):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = ""
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class TextFormat(Strict):
    type: Literal["text", "json_object"]


class JsonFormat(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[TextFormat | JsonFormat, Field(discriminator="type")]


def format_dict(value: TextFormat | JsonFormat | None) -> dict[str, Any] | None:
    """The runner's `response_format` (OpenAI's shape)."""
    return None if value is None else value.model_dump(by_alias=True, exclude_none=True)


class NamedFunction(Strict):
    name: str


class NamedChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


NonEmpty = Annotated[str, StringConstraints(min_length=1)]


class FunctionDef(BaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class SamplingOptions(Strict):
    """The sampling options every endpoint shares (OpenAI's names; mlx_lm's meaning)."""

    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: (
        Annotated[
            dict[str, Annotated[float, Field(ge=-100, le=100)]],
            Field(json_schema_extra={"propertyNames": {"pattern": "^[0-9]+$"}}),
        ]
        | None
    ) = None  # token id (as JSON has it: a string of digits) -> bias
    seed: int | None = None
    stop: NonEmpty | Annotated[list[NonEmpty], Field(max_length=4)] | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None  # accepted: it changes nothing in the output
    num_draft_tokens: int | None = Field(
        default=None, ge=0, le=MAX_DRAFT_TOKENS, description="speculative decoding by prompt lookup (mlx_lm.server's "
        "name): draft tokens a step, 0 = off; omitted: the instance's setting"
    )  # fmt: skip
    metadata: dict[str, Any] | None = None  # likewise

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        if len(stops) > 4 or any(s == "" for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias(cls, value: Any) -> Any:
        if isinstance(value, dict):
            if any(not isinstance(k, str) or not k.isascii() or not k.isdigit() for k in value):
                raise ValueError("logit_bias keys must be token ids (digits)")
            if any(isinstance(b, (int, float)) and not -100 <= b <= 100 for b in value.values()):
                raise ValueError("logit_bias values must be between -100 and 100")
        return value

    def runner_sampling(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty or 0.0,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logit_bias": {int(k): b for k, b in (self.logit_bias or {}).items()},
            "seed": self.seed,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop or [],
            "num_draft_tokens": self.num_draft_tokens,
        }


ToolChoice = Literal["auto", "none", "required"] | NamedChoice


def tools_for(tools: list[Tool] | None, choice: ToolChoice | None) -> list[dict[str, Any]] | None:
    """The tools the template shows the model: none for `none`, only the named one for a named choice."""
    if not tools or choice == "none":
        return None
    listed = [t.model_dump(exclude_none=True) for t in tools]
    if isinstance(choice, NamedChoice):
        name = choice.function.name
        listed = [t for t in listed if t["function"]["name"] == name]
        if not listed:
            raise ValueError(f"tool_choice names {name!r}, which is not in tools")
    return listed


def check_tool_choice(choice: Any) -> Any:
    """A choice of another shape is named as such (before its type is checked)."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return choice
    raise ValueError("tool_choice must be auto, none, required or {'type': 'function', 'function': {'name': ...}}")


class ChatRequest(SamplingOptions):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # the model decides how many it makes
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # hints and bookkeeping, accepted and ignored (see the README's list)
    store: bool | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    verbosity: str | None = None
    reasoning_effort: str | None = None  # "none" turns a template's thinking off; the rest are hints
    web_search_options: dict[str, Any] | None = None  # a server tool: the cluster cannot search, the model answers
    modalities: list[Literal["text"]] | None = None

    _tool_choice = field_validator("tool_choice", mode="before")(check_tool_choice)

    @model_validator(mode="after")
    def _consistent(self) -> "ChatRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        tools_for(self.tools, self.tool_choice)
        return self

    def conversation(self) -> str | None:
        """The client's own name for the conversation, which keeps it on one instance (routing.py)."""
        return self.prompt_cache_key or self.user

    def generate_body(self) -> dict[str, Any]:
        """What rank 0's runner takes on /generate."""
        return {
            "messages": [m.for_template() for m in self.messages],
            "max_tokens": self.max_completion_tokens or self.max_tokens or 512,
            **self.runner_sampling(),
            "logprobs": (self.top_logprobs or 0) if self.logprobs else None,
            "tools": tools_for(self.tools, self.tool_choice),
            "tool_required": self.tool_choice == "required" or isinstance(self.tool_choice, NamedChoice),
            "response_format": format_dict(self.response_format),
            "chat_template_kwargs": self.template_kwargs(),
        }

    def template_kwargs(self) -> dict[str, Any]:
        off = {"enable_thinking": False} if self.reasoning_effort == "none" else {}
        return {**off, **(self.chat_template_kwargs or {})}


class CompletionRequest(SamplingOptions):
    model: str
    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int = Field(default=16, ge=1, le=MAX_TOKENS)
    echo: Literal[False] = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=1, le=1)
    suffix: None = None
    response_format: ResponseFormat | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("one prompt per request (a list of several is a batch: send them as separate requests)")
        if value == "" or value == [""]:
            raise ValueError("the prompt is empty")
        return value

    def conversation(self) -> str | None:
        return self.user

    def generate_body(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt if isinstance(self.prompt, str) else self.prompt[0],
            "max_tokens": self.max_tokens,
            **self.runner_sampling(),
            "logprobs": self.logprobs,
            "response_format": format_dict(self.response_format),
        }


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV state came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class Placement(BaseModel):
    instance_id: str
    strategy: str
    shards: list[dict[str, Any]]  # node_id, rank, layer_start, layer_end

    @classmethod
    def of(cls, instance: InstanceStatus) -> "Placement":
        shards = [
            {"node_id": s.node_id, "rank": s.rank, "layer_start": s.layer_start, "layer_end": s.layer_end}
            for s in instance.shards
        ]
        return cls(instance_id=instance.instance_id, strategy=instance.strategy, shards=shards)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "shardline"
    context_length: int | None = None  # tokens the model attends to; None = its config does not say
    placement: list[Placement] = Field(default_factory=list)  # each ready instance and its layers on each node


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    """An id of a response, a message or a tool call: `prefix` says which."""
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def chunk(
    cid: str, model: str, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": now(),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
    }


def completion(
    cid: str, model: str, message: dict[str, Any], finish: str, usage: Usage, logprobs: Any = None
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}],
        "usage": usage.model_dump(),
    }


def finite(logprob: float) -> float:
    """JSON has no -inf or NaN (a token masked out, or logits a penalty near 0 overflowed): OpenAI's -9999.0 for
    a token as unlikely as can be."""
    return logprob if math.isfinite(logprob) else UNLIKELY


def chat_logprobs(events: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's chat `logprobs.content` from the runner's token events."""

    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode())}

    return {
        "content": [
            {
                **entry(e.get("token_text", e.get("text", "")), e["logprob"]),
                "top_logprobs": [entry(t["text"], t["logprob"]) for t in e.get("top_logprobs", [])],
            }
            for e in events
        ]
    }


def text_logprobs(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The legacy completions `logprobs` object."""
    offsets, at = [], 0
    for e in events:
        offsets.append(at)
        at += len(e.get("token_text", ""))
    return {
        "tokens": [e.get("token_text", "") for e in events],
        "token_logprobs": [finite(e["logprob"]) for e in events],
        "top_logprobs": [{t["text"]: finite(t["logprob"]) for t in e.get("top_logprobs", [])} for e in events],
        "text_offset": offsets,
    }


def usage_of(final: dict[str, Any]) -> Usage:
    prompt, done = int(final.get("prompt_tokens", 0)), int(final.get("completion_tokens", 0))
    cached = PromptTokensDetails(cached_tokens=int(final.get("cached_tokens", 0)))
    return Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done, prompt_tokens_details=cached)


def tool_call(call: dict[str, Any]) -> dict[str, Any]:
    function = {"name": call["name"], "arguments": call["arguments"]}
    return {"id": new_id("call_"), "type": "function", "function": function}


def text_completion(cid: str, model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": cid, "object": "text_completion", "created": now(), "model": model, "choices": choices}


class OpenAIStream(Stream):
    """What OpenAI's chat and completions streams share: an error as a data event, `[DONE]` last."""

    def error(self, exc: HTTPException) -> str:
        kind = openai_error_type(exc.status_code)
        return data({"error": {"message": str(exc.detail), "type": kind, "code": exc.status_code}})

    def closing(self) -> Iterator[str]:
        yield DONE


class ChatStream(OpenAIStream):
    """`chat.completion.chunk`s: the role first, then reasoning, text and tool calls as they come."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.cid, self.model, self.include_usage, self.calls = new_id("chatcmpl-"), model, include_usage, 0

    def chunk(self, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
        return data(chunk(self.cid, self.model, delta, finish, logprobs))

    def opening(self) -> Iterator[str]:
        yield self.chunk({"role": "assistant", "content": ""})

    def frames(self, event: dict[str, Any]) -> Iterator[str]:
        if "token" not in event:  # the final event
            yield self.chunk({}, event.get("finish_reason", "stop"))
            if self.include_usage:
                yield data({**chunk(self.cid, self.model, {}), "choices": [], "usage": usage_of(event).model_dump()})
            return
        logprobs = chat_logprobs([event]) if "logprob" in event else None
        if event.get("reasoning"):
            yield self.chunk({"reasoning_content": event["reasoning"]})
        if event.get("text") or logprobs:
            yield self.chunk({"content": event.get("text", "")}, logprobs=logprobs)
        for delta in event.get("tool_call_deltas", []):
            yield from self.tool_call_delta(delta)
        for call in event.get("tool_calls", []):
            if not call.get("streamed"):
                yield from self.tool_call(call)

    def tool_call_delta(self, delta: dict[str, Any]) -> Iterator[str]:
        """A call as it is written: its id and name first, then each piece of its arguments."""
        if "name" in delta:
            self.calls = delta["index"] + 1
            head = {"index": delta["index"], "id": new_id("call_"), "type": "function",
                    "function": {"name": delta["name"], "arguments": ""}}  # fmt: skip
            yield self.chunk({"tool_calls": [head]})
        if delta.get("arguments"):
            yield self.chunk({"tool_calls": [{"index": delta["index"], "function": {"arguments": delta["arguments"]}}]})

    def tool_call(self, call: dict[str, Any]) -> Iterator[str]:
        """A tool call whose format could not be followed as it was written: whole, as OpenAI streams one."""
        index, self.calls = self.calls, self.calls + 1
        yield from self.tool_call_delta({"index": index, "name": call["name"]})
        yield from self.tool_call_delta({"index": index, "arguments": call["arguments"]})


class TextStream(OpenAIStream):
    """`text_completion` chunks of the legacy completions endpoint."""

    def __init__(self, model: str, logprobs: bool, include_usage: bool) -> None:
        self.cid, self.model, self.logprobs, self.include_usage = new_id("cmpl-"), model, logprobs, include_usage

    def choice(self, text: str, logprobs: Any = None, finish: str | None = None) -> str:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return data(text_completion(self.cid, self.model, [choice]))

    def frames(self, event: dict[str, Any]) -> Iterator[str]:
        if "token" not in event:  # the final event
            yield self.choice("", finish=event.get("finish_reason", "stop"))
            if self.include_usage:
                yield data(text_completion(self.cid, self.model, []) | {"usage": usage_of(event).model_dump()})
            return
        logprobs = text_logprobs([event]) if self.logprobs else None
        if event.get("text") or logprobs:
            yield self.choice(event.get("text", ""), logprobs)
