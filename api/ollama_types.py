"""Ollama's wire types (`/api/chat`, `/api/generate`, ...), their translation to the runner's one request shape,
and the NDJSON lines made of the runner's events, streamed or not. Ollama names models `name:tag`; a served model
is `org/name`, and `org/name:latest` means the same."""

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.openai_types import MAX_TOKENS, FunctionDef
from api.streaming import Stream

VERSION = "0.12.6"  # the Ollama API version these endpoints follow (clients check it before using tools, think)
# Ollama's own defaults where a request leaves an option out (its repeat_penalty only when asked: mlx_lm's
# penalty looks back over another window)
DEFAULTS = {"temperature": 0.8, "top_p": 0.9, "top_k": 40}
# options that tune the machine, not the output: accepted and ignored (the instance is placed and loaded already)
MACHINE_OPTIONS = ("numa", "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
                   "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep")  # fmt: skip
# sampling options mlx_lm does not have: accepted only at the value that turns them off
NEUTRAL = {"typical_p": 1.0, "tfs_z": 1.0, "mirostat": 0, "penalize_newline": False}
IGNORED_WITH_DEFAULT = ("repeat_last_n", "mirostat_tau", "mirostat_eta")  # mean nothing unless the above are on


def only(*values: object) -> Any:
    """A field whose other values are refused by a validator (which says why): the schema says which it takes."""
    return Field(default=None, json_schema_extra={"enum": [*values, None]})


def unsupported(kind: str) -> Any:
    """A field taken only empty (a validator says why anything else is refused)."""
    return Field(default=None, json_schema_extra={"maxLength" if kind == "string" else "maxItems": 0})


def served_name(model: str) -> str:
    """`org/name:latest` is `org/name`; any other tag names something shardline does not have."""
    return model.removesuffix(":latest")


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int | None = None
    num_predict: int | None = None
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    temperature: float | None = Field(default=None, ge=0.0)
    repeat_penalty: float | None = Field(default=None, ge=0.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stop: list[str] | None = None
    typical_p: float | None = only(1.0)
    tfs_z: float | None = only(1.0)
    mirostat: int | None = only(0)
    penalize_newline: bool | None = only(False)
    repeat_last_n: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    numa: bool | None = None
    num_ctx: int | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    embedding_only: bool | None = None
    num_thread: int | None = None
    num_keep: int | None = None

    @model_validator(mode="after")
    def _neutral(self) -> "Options":
        for name, off in NEUTRAL.items():
            value = getattr(self, name)
            if value is not None and value != off:
                raise ValueError(f"options.{name}: only {off!r} (off) is supported: mlx_lm samples without it")
        return self

    def sampling(self) -> dict[str, Any]:
        """The runner's sampling fields: Ollama's defaults where left out; num_predict -1 or -2 is as many as the
        context leaves."""
        predict = self.num_predict if self.num_predict is not None and self.num_predict > 0 else MAX_TOKENS
        return {
            "max_tokens": min(predict, MAX_TOKENS),
            "temperature": DEFAULTS["temperature"] if self.temperature is None else self.temperature,
            "top_p": DEFAULTS["top_p"] if self.top_p is None else self.top_p,
            "top_k": DEFAULTS["top_k"] if self.top_k is None else self.top_k,
            "min_p": self.min_p or 0.0,
            "repetition_penalty": self.repeat_penalty or 0.0,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "seed": self.seed,
            "stop": [s for s in self.stop or [] if s],
        }


class Common(BaseModel):
    """What /api/chat and /api/generate share."""

    model_config = ConfigDict(extra="forbid")

    model: str
    stream: bool = True  # Ollama streams unless told not to
    format: Literal["", "json"] | dict[str, Any] | None = None  # "json", or a JSON schema: enforced by the grammar
    options: Options = Field(default_factory=Options)
    keep_alive: float | str | None = None  # instances stay until stopped: a hint about memory, not the output
    think: bool | str | None = None  # True or "low"/"medium"/"high": the template's thinking on; False: off

    @field_validator("format", mode="before")
    @classmethod
    def _format(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("", "json"):
            raise ValueError(f"format {value!r} is not supported: 'json' or a JSON schema")
        return value

    @property
    def served(self) -> str:
        return served_name(self.model)

    def response_format(self) -> dict[str, Any] | None:
        if not self.format:
            return None
        if self.format == "json":
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": self.format}}

    def template_kwargs(self) -> dict[str, Any]:
        return {} if self.think is None else {"enable_thinking": self.think is not False}


class OllamaFunctionCall(BaseModel):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(BaseModel):
    id: str | None = None
    function: OllamaFunctionCall


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None  # earlier reasoning: chat templates drop it
    images: list[str] | None = unsupported("array")
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, value: Any) -> Any:
        if value not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"role {value!r} is not supported: system, user, assistant or tool")
        return value

    @field_validator("images", mode="before")
    @classmethod
    def _images(cls, value: Any) -> Any:
        if value:
            raise ValueError("images are not supported: the served models take text only")
        return value

    def for_template(self, index: int) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id or f"call_{index}_{i}", "type": "function",
                 "function": {"name": c.function.name,
                              "arguments": json.dumps(c.function.arguments, ensure_ascii=False)}}
                for i, c in enumerate(self.tool_calls)
            ]  # fmt: skip
        if self.tool_name:
            out["name"] = self.tool_name
        return out


class OllamaTool(BaseModel):
    """OpenAI's function tool, as Ollama takes it."""

    type: Literal["function"] = "function"
    function: FunctionDef


class OllamaChat(Common):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[OllamaTool] | None = None

    def generate_body(self) -> dict[str, Any]:
        return {
            "messages": [m.for_template(i) for i, m in enumerate(self.messages)],
            **self.options.sampling(),
            "tools": [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None,
            "response_format": self.response_format(),
            "chat_template_kwargs": self.template_kwargs(),
        }


class OllamaGenerate(Common):
    prompt: str = ""
    system: str | None = None
    raw: bool = False  # the prompt as is, no chat template
    suffix: str | None = unsupported("string")
    images: list[str] | None = unsupported("array")
    template: str | None = unsupported("string")
    context: list[int] | None = unsupported("array")

    @field_validator("suffix", "images", "template", "context", mode="before")
    @classmethod
    def _supported(cls, value: Any, info: Any) -> Any:
        if value:
            raise ValueError(
                f"{info.field_name}: not supported (the model's own chat template is used, with text only)"
            )
        return value

    def generate_body(self) -> dict[str, Any]:
        common = {**self.options.sampling(), "response_format": self.response_format()}
        if self.raw:
            return {"prompt": self.prompt, **common}
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": self.prompt})
        return {"messages": messages, **common, "chat_template_kwargs": self.template_kwargs()}


class ModelRef(BaseModel):
    model: str = ""
    name: str = ""  # older clients send `name`

    @property
    def served(self) -> str:
        return served_name(self.model or self.name)


class Pull(ModelRef):
    stream: bool = True
    insecure: bool = False


def tool_call(call: dict[str, Any]) -> dict[str, Any]:
    return {"function": {"name": call["name"], "arguments": json.loads(call["arguments"])}}


def done_reason(final: dict[str, Any]) -> str:
    return "length" if final.get("finish_reason") == "length" else "stop"


class Timing:
    """Ollama's durations (nanoseconds): from the request's start, to the first token, to the end."""

    def __init__(self) -> None:
        self.started, self.first = time.monotonic_ns(), 0

    def saw_token(self) -> None:
        self.first = self.first or time.monotonic_ns()

    def stats(self, final: dict[str, Any]) -> dict[str, Any]:
        end = time.monotonic_ns()
        first = self.first or end
        return {
            "total_duration": end - self.started,
            "load_duration": 0,
            "prompt_eval_count": int(final.get("prompt_tokens", 0)),
            "prompt_eval_duration": first - self.started,
            "eval_count": int(final.get("completion_tokens", 0)),
            "eval_duration": end - first,
        }


def line(payload: dict[str, Any]) -> str:
    return json.dumps(payload) + "\n"


class OllamaStream(Stream):
    """NDJSON: a first line at once (an empty chunk), one line per piece of output, a final line with `done` and
    the counts; the same empty chunk while the runner is quiet; an error as a line `{"error": ...}`."""

    media_type = "application/x-ndjson"

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat, self.timing = model, chat, Timing()

    def chunk(self, text: str = "", thinking: str = "", calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        head: dict[str, Any] = {"model": self.model, "created_at": now_iso()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = [tool_call(c) for c in calls]
            return head | {"message": message, "done": False}
        return head | {"response": text, **({"thinking": thinking} if thinking else {}), "done": False}

    @property
    def keep_alive(self) -> str:  # type: ignore[override]
        return line(self.chunk())

    def opening(self) -> Iterator[str]:
        yield line(self.chunk())

    def frames(self, event: dict[str, Any]) -> Iterator[str]:
        if "token" not in event:
            yield line(self.final(event))
            return
        self.timing.saw_token()
        text, thinking, calls = event.get("text", ""), event.get("reasoning", ""), event.get("tool_calls")
        if text or thinking or calls:
            yield line(self.chunk(text, thinking, calls))

    def final(
        self, event: dict[str, Any], text: str = "", thinking: str = "", calls: list[Any] | None = None
    ) -> dict[str, Any]:
        """The last line (or the whole answer, not streamed): `done`, why, and the counts."""
        ending = {"done": True, "done_reason": done_reason(event), **self.timing.stats(event)}
        return self.chunk(text, thinking, calls) | ending

    def error(self, exc: HTTPException) -> str:
        return line({"error": str(exc.detail)})


def loaded(model: str, chat: bool) -> dict[str, Any]:
    """What Ollama answers a request with nothing to generate (clients send one to load a model)."""
    out: dict[str, Any] = {"model": model, "created_at": now_iso(), "done": True, "done_reason": "load"}
    return out | ({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
