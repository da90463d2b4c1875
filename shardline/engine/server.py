"""Rank 0's HTTP face: `GET /health`, `GET /stats`, and `POST /generate` streaming NDJSON.

Routes only tokenize, check and queue a Job; the MLX thread (generation.Scheduler) does the rest.
"""

import asyncio
import json
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from queue import Queue
from typing import Any, Self

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from mlx_lm.tokenizer_utils import TokenizerWrapper
from pydantic import BaseModel, Field, model_validator

from shardline.engine.generation import Job, random_seed
from shardline.engine.grammar import Grammars, grammar_for
from shardline.engine.protocol import Sampling
from shardline.engine.tool_grammars import forced_call
from shardline.types import MAX_DRAFT_TOKENS

MAX_SEED = 2**64
RETRY_AFTER_S = 1
HEARTBEAT_S = 1.0  # an empty line this often while a stream has nothing to say


@dataclass(frozen=True)
class Limits:
    context: int | None  # tokens the model attends to (max_position_embeddings); None = unknown
    max_queue: int  # requests waiting for the batch before 429
    secret: str = ""  # the instance's; "" = no check
    max_batch: int = 0  # requests decoded together (told to the API, which routes by it); 0 = not said
    draft_tokens: int = 0  # the instance's speculative decoding (requests may say otherwise); 0 = off


def bearer_check(secret: str) -> Callable[..., None]:
    def check(authorization: str | None = Header(default=None)) -> None:
        if secret and not secrets.compare_digest((authorization or "").encode(), f"Bearer {secret}".encode()):
            raise HTTPException(status_code=401, detail="this runner serves only its instance's API")

    return check


class GenerateBody(BaseModel):
    messages: list[dict[str, Any]] | None = None  # chat, rendered with the tokenizer's chat template
    prompt: str | None = None
    max_tokens: int = Field(default=256, ge=1, lt=2**31)  # int32 on the ring
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None  # None = a fresh random seed
    stop: list[str] = Field(default_factory=list)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=0.0, ge=0.0)  # 0 = off
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] = Field(default_factory=dict)
    logprobs: int | None = Field(default=None, ge=0, le=20)  # None = none; n = the token's and the n likeliest
    response_format: dict[str, Any] | None = None  # OpenAI's: json_object / json_schema are enforced
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools, for the chat template and the parser
    tool_required: bool = False  # the answer must call one of `tools` (tool_choice required, or a named one)
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    # the API's, resuming a generation whose runner was lost: the tokens its client already has (with the same
    # seed, the rest is what the lost runner would have made)
    resume: list[int] = Field(default_factory=list)
    # speculative decoding by prompt lookup: up to this many draft tokens a step; None = the instance's setting
    num_draft_tokens: int | None = Field(default=None, ge=0, le=MAX_DRAFT_TOKENS)

    @model_validator(mode="after")
    def one_input(self) -> Self:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages or prompt")
        return self


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat templates want a tool call's arguments as an object (OpenAI sends a JSON string); arguments that are
    not JSON (a call the model once wrote wrong) stay the text they are, as the model wrote them."""
    out = []
    for message in messages:
        calls = [
            {**call, "function": {**call["function"], "arguments": as_object(call["function"]["arguments"])}}
            if isinstance(call.get("function", {}).get("arguments"), str)
            else call
            for call in message.get("tool_calls") or []
        ]
        out.append({**message, "tool_calls": calls} if calls else message)
    return out


def as_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def hoist_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every system message joined into one at the start: for a template that takes a system message only there
    (agents send them mid-conversation: Claude Code's reminders, Codex's developer messages)."""
    system = [m for m in messages if m.get("role") == "system"]
    if not system or all(m.get("role") == "system" for m in messages[: len(system)]):
        return messages
    joined = {"role": "system", "content": "\n\n".join(str(m.get("content") or "") for m in system)}
    return [joined, *(m for m in messages if m.get("role") != "system")]


def prompt_tokens(tokenizer: TokenizerWrapper, body: GenerateBody) -> list[int]:
    if body.messages is not None:
        if not tokenizer.has_chat_template:
            raise ValueError("this model has no chat template; send a prompt instead")
        if body.tools and not tokenizer.has_tool_calling:
            raise ValueError("this model's chat template does not call tools: send the request without tools")
        kwargs = {**body.chat_template_kwargs, **({"tools": body.tools} if body.tools else {})}
        messages = template_messages(body.messages)
        try:
            return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs))
        except Exception:
            hoisted = hoist_system(messages)
            if hoisted == messages:
                raise
            return list(tokenizer.apply_chat_template(hoisted, add_generation_prompt=True, **kwargs))
    # The same rule as mlx_lm's stream_generate, so results match it exactly.
    bos = tokenizer.bos_token
    return tokenizer.encode(body.prompt, add_special_tokens=bos is None or not body.prompt.startswith(bos))


def make_job(
    tokenizer: TokenizerWrapper, body: GenerateBody, lines: asyncio.Queue, limits: Limits, grammars: Grammars
) -> Job:
    try:
        tokens = prompt_tokens(tokenizer, body)
    except Exception as error:  # a template or tokenizer failure is the client's input
        raise HTTPException(status_code=400, detail=f"cannot tokenize the request: {error}") from error
    if not tokens:
        raise HTTPException(status_code=400, detail="the prompt is empty")
    max_tokens = body.max_tokens
    if limits.context is not None:
        if len(tokens) >= limits.context:
            raise HTTPException(
                status_code=400,
                detail=f"the prompt is {len(tokens)} tokens but the model's context is {limits.context}: shorten it",
            )
        max_tokens = min(max_tokens, limits.context - len(tokens))  # ends with finish_reason "length"
    thinking = in_thinking(tokenizer, tokens)
    try:
        grammar = grammar_for(body.response_format) if body.response_format else ""
        if body.tool_required and body.tools and body.messages is not None:
            grammar = forced_call(tokenizer, body.tools, thinking)
        if grammar:
            grammars.check(grammar)  # a format this vocabulary cannot start fails before anything is generated
    except ValueError as error:
        raise HTTPException(status_code=400, detail=str(error)) from error
    if any(not 0 <= t < len(tokenizer.get_vocab()) for t in body.logit_bias):
        raise HTTPException(status_code=400, detail="logit_bias names a token id outside the model's vocabulary")
    seed = random_seed() if body.seed is None else body.seed % MAX_SEED
    vocab = len(tokenizer.get_vocab())
    top_k = body.top_k if body.top_k < vocab else 0  # the whole vocabulary is no top-k (and fits the ring's int32)
    sampling = Sampling(
        max_tokens - len(body.resume), body.temperature, body.top_p, seed, top_k=top_k, min_p=body.min_p,
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, logit_bias=tuple(sorted(body.logit_bias.items())), grammar=grammar,
        resumed=len(body.resume),
        draft_tokens=limits.draft_tokens if body.num_draft_tokens is None else body.num_draft_tokens,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    return Job(
        tokens + body.resume, sampling, body.stop, emit=lambda item: loop.call_soon_threadsafe(lines.put_nowait, item),
        tools=body.tools if body.messages is not None else None, thinking=thinking, logprobs=body.logprobs,
        resumed=list(body.resume),
    )  # fmt: skip


def resumed_to_the_end(job: Job, eos: set[int]) -> str | None:
    """How a resumed generation had already ended (at its end-of-sequence token, or at max_tokens), or None."""
    if job.resumed and job.resumed[-1] in eos:
        return "stop"
    return "length" if job.sampling.max_tokens <= 0 else None


def in_thinking(tokenizer: TokenizerWrapper, tokens: list[int]) -> bool:
    """The prompt opened the model's reasoning and did not close it (a template that starts it thinking)."""
    if not tokenizer.has_thinking:
        return False
    return bool(tokenizer.rfind_think_start(tokens) > tokenizer.rfind_think_end(tokens))


async def stream_lines(job: Job, lines: asyncio.Queue) -> AsyncIterator[str]:
    try:
        while True:
            try:
                item = await asyncio.wait_for(lines.get(), HEARTBEAT_S)
            except TimeoutError:
                yield "\n"  # alive, only busy (a long prefill, a full batch): the API tells it from a frozen host
                continue
            yield json.dumps(item) + "\n"
            if "finish_reason" in item or "error" in item:
                return
    finally:
        # Also reached when the client goes away (the stream is cancelled): generation stops at once.
        job.cancelled.set()


def create_app(
    tokenizer: TokenizerWrapper, jobs: "Queue[Job]", limits: Limits, stats: Callable[[], dict[str, Any]]
) -> FastAPI:
    app = FastAPI(title="shardline runner")
    grammars = Grammars(tokenizer)  # rank 0's own, to check a format before the request is queued
    # what the model's template and vocabulary can do, as Ollama's /api/show names it
    capabilities = ["completion"] + ["tools"] * tokenizer.has_tool_calling + ["thinking"] * tokenizer.has_thinking
    authorized = [Depends(bearer_check(limits.secret))]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats", dependencies=authorized)
    async def get_stats() -> dict[str, Any]:
        return {**stats(), "queue": jobs.qsize(), "capabilities": capabilities}

    @app.post("/generate", response_model=None, dependencies=authorized)
    async def generate(body: GenerateBody) -> StreamingResponse | JSONResponse:
        if jobs.qsize() >= limits.max_queue:
            return JSONResponse(
                {"detail": f"{jobs.qsize()} requests are already waiting for this instance: retry shortly"},
                status_code=429,
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        lines: asyncio.Queue = asyncio.Queue()
        job = make_job(tokenizer, body, lines, limits, grammars)
        # the first line at once, before the prefill: the API opens its client's stream on it (an agent with an
        # idle timeout must not wait out a long prompt in silence)
        # with the seed, so that the API can resume a sampled request the same way; the heartbeat it can expect; and
        # how many requests this instance decodes together, so that it is not sent more than that for its cache
        lines.put_nowait({"accepted": True, "prompt_tokens": job.prompt_tokens, "seed": job.sampling.seed,
                          "heartbeat_s": HEARTBEAT_S, "max_batch": limits.max_batch})  # fmt: skip
        finished = resumed_to_the_end(job, tokenizer.eos_token_ids)
        if finished:  # the lost runner had made every token: only the stream's end was lost
            lines.put_nowait({"finish_reason": finished, "prompt_tokens": job.prompt_tokens,
                              "completion_tokens": len(job.resumed)})  # fmt: skip
        else:
            # queued here, in the same turn of the event loop as the check above: a burst of requests cannot all
            # pass the check before any of them is queued (they would, queued when their responses start)
            jobs.put_nowait(job)
        return StreamingResponse(stream_lines(job, lines), media_type="application/x-ndjson")

    @app.post("/tokenize", dependencies=authorized)
    async def tokenize(body: GenerateBody) -> dict[str, int]:
        """How many tokens the request's prompt is (Anthropic's count_tokens), without generating."""
        try:
            return {"prompt_tokens": len(prompt_tokens(tokenizer, body))}
        except Exception as error:  # a template or tokenizer failure is the client's input
            raise HTTPException(status_code=400, detail=f"cannot tokenize the request: {error}") from error

    return app


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


# longer than the API keeps an idle connection (api.app.RUNNER_POOL_EXPIRY_S): were both 5 s (each library's default),
# the runner could close one just as the API sends a request on it, and that request would fail with a reset
KEEP_ALIVE_S = 75


def start_http(app: FastAPI, sock: socket.socket, timeout: float = 30.0) -> uvicorn.Server:
    """Serve `app` on `sock` from a daemon thread; returns once it accepts connections."""
    config = uvicorn.Config(
        app, log_config=None, access_log=False, timeout_graceful_shutdown=1, timeout_keep_alive=KEEP_ALIVE_S
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="http")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.01)
    return server
