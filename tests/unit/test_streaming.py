"""Server-sent events without a runner: what each wire format sends while the runner is quiet, and how an error
after the response started reaches the client. Served end to end: tests/integration/test_agent_apis.py,
test_batching_api.py (keep-alives of a queued request)."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import HTTPException

from api.anthropic_types import MessageStream
from api.openai_types import ChatStream, TextStream
from api.responses_types import ResponsesRequest, ResponseStream
from api.streaming import DONE, Events, Stream, sse, with_keepalives

TOKEN = {"token": 7, "text": "Hi"}
FINAL = {"finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 1}


async def runner(*events: dict[str, Any] | None, error: HTTPException | None = None) -> Events:
    for event in events:
        yield event
    if error is not None:
        raise error


async def sent(lines: Events, stream: Stream) -> list[str]:
    return [text async for text in sse(lines, stream)]


def streams() -> dict[str, Stream]:
    return {
        "chat": ChatStream("org/m", include_usage=False),
        "completions": TextStream("org/m", logprobs=False, include_usage=False),
        "messages": MessageStream("org/m"),
        "responses": ResponseStream(ResponsesRequest(model="org/m", input="hi")),
    }


async def test_a_quiet_runner_gets_each_formats_keepalive() -> None:
    keepalives = {"chat": ": keep-alive\n\n", "completions": ": keep-alive\n\n", "responses": ": keep-alive\n\n",
                  "messages": 'event: ping\ndata: {"type": "ping"}\n\n'}  # fmt: skip
    for name, stream in streams().items():
        texts = await sent(runner(None, TOKEN, FINAL), stream)
        assert keepalives[name] in texts, name
        assert "Hi" in "".join(texts), name


async def test_an_error_after_the_start_is_an_event_in_each_format() -> None:
    busy = HTTPException(429, "the runner's queue is full")
    for name, stream in streams().items():
        texts = await sent(runner(TOKEN, error=busy), stream)
        if name in ("chat", "completions"):
            assert texts[-1] == DONE, name  # OpenAI's clients wait for it, error or not
            error = json.loads(texts[-2].removeprefix("data: "))["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == 429, name
        elif name == "messages":
            assert texts[-1].startswith("event: error\n"), texts
            assert json.loads(texts[-1].split("data: ", 1)[1])["error"]["type"] == "rate_limit_error"
        else:
            payload = json.loads(texts[-1].split("data: ", 1)[1])
            assert payload["type"] == "error" and payload["code"] == "429", payload
            numbers = [json.loads(t.split("data: ", 1)[1])["sequence_number"] for t in texts]
            assert numbers == list(range(1, len(texts) + 1))  # numbered without a gap, the error too


async def test_keepalives_come_while_nothing_does_and_stop_with_the_source() -> None:
    async def slow() -> AsyncIterator[str]:
        await asyncio.sleep(0.35)
        yield "token"

    items = [item async for item in with_keepalives(slow(), every=0.1)]
    assert items[-1] == "token" and items[:-1] == [None] * (len(items) - 1) and len(items) >= 3


async def test_every_stream_opens_once_the_runner_accepts_before_any_token() -> None:
    """The runner's `accepted` comes before its prefill: the response starts on it, and each format's first events
    go out while the prompt is still being processed (a long prompt never trips a client's idle timeout)."""
    from api.inference import first_event

    firsts = {"chat": '"role": "assistant"', "completions": None, "messages": "event: message_start",
              "responses": "event: response.created"}  # fmt: skip

    async def accepted_then_prefill() -> Events:
        yield {"accepted": True, "prompt_tokens": 5000}
        await asyncio.Event().wait()  # a prefill that never ends
        yield TOKEN

    for name, stream in streams().items():
        lines = await asyncio.wait_for(first_event(accepted_then_prefill(), 5), 1)
        frames = sse(lines, stream)
        if firsts[name] is not None:
            assert firsts[name] in await asyncio.wait_for(anext(frames), 1), name
        await frames.aclose()


def test_logprobs_json_cannot_carry_are_openai_s_floor() -> None:
    """A penalty near 0 overflows the logits: -inf and NaN would make the answer unencodable (a 500, found by
    schemathesis)."""
    from api.openai_types import chat_logprobs, text_logprobs

    top = [{"text": "b", "logprob": float("nan")}]
    events = [{"token": 1, "text": "a", "logprob": float("-inf"), "top_logprobs": top}]
    assert json.dumps(chat_logprobs(events), allow_nan=False) and json.dumps(text_logprobs(events), allow_nan=False)
