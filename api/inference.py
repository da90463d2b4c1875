"""One generation on rank 0's runner, whatever wire format asked for it: pick the instance, stream its events,
count them in the metrics, and gather them for a non-streamed answer."""

import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import HTTPException

from api.deps import InstancesDep
from api.metrics import UNSERVED, ChatWatch, Metrics, outcome_of
from api.runners import Events, InFlight, RunnerUnreachable, generate
from workflows.serve import InstanceStatus


async def instance_for(instances: InstancesDep, model: str, in_flight: InFlight) -> InstanceStatus:
    """The ready instance of `model` with the fewest requests in flight from this API."""
    candidates = await instances.for_model(model)
    ready = [i for i in candidates if i.state == "ready" and i.endpoint]
    if ready:
        return in_flight.pick(ready)
    if not candidates:
        raise HTTPException(404, f"model {model!r} is not served: start it with POST /instances or `shardline serve`")
    states = ", ".join(f"{i.instance_id} is {i.state}" + (f" ({i.reason})" if i.reason else "") for i in candidates)
    raise HTTPException(503, f"model {model!r} is not ready: {states}")


def failed(watch: ChatWatch, exc: Exception) -> None:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 404:
        watch.model = UNSERVED
    watch.end(outcome_of(status))


async def watched(lines: Events, watch: ChatWatch) -> Events:
    """The events, passed on as they are and timed on the way."""
    outcome = "cancelled"  # unless the stream is read to its end: the client went away
    async with aclosing(lines):
        try:
            async for event in lines:
                if event is not None:
                    watch.saw(event)
                yield event
            outcome = "ok"
        except Exception as exc:
            failed(watch, exc)
            raise
        finally:
            watch.end(outcome)  # a no-op after failed()


async def runner_events(
    instances: InstancesDep, http: httpx.AsyncClient, model: str, body: dict[str, Any], in_flight: InFlight
) -> Events:
    """One generation's events, from the first on: so a runner that is gone, or a request it refuses, is an
    error before any response starts, not a 200 cut short. A runner that moved (its instance recovered since
    the last lookup) is looked up again, once."""
    instance = await instance_for(instances, model, in_flight)
    try:
        return await first_event(generate(http, instance, body, in_flight))
    except RunnerUnreachable:
        await instances.refresh()
        moved = await instance_for(instances, model, in_flight)
        if moved.endpoint == instance.endpoint:
            in_flight.release(str(moved.endpoint))  # picked, never sent
            raise
        return await first_event(generate(http, moved, body, in_flight))


async def first_event(lines: Events) -> Events:
    """Wait for the runner's first event (or the first keep-alive), then stream everything from there."""
    try:
        first = await anext(lines)
    except StopAsyncIteration:
        return lines
    except BaseException:
        await lines.aclose()
        raise

    async def from_first() -> Events:
        async with aclosing(lines):
            yield first
            async for event in lines:
                yield event

    return from_first()


async def start(
    instances: InstancesDep, http: httpx.AsyncClient, metrics: Metrics, in_flight: InFlight, model: str,
    body: dict[str, Any],
) -> Events:  # fmt: skip
    """The runner's events for `body`, counted in the metrics as they pass."""
    watch = metrics.chat(model)
    try:
        events = await runner_events(instances, http, model, body, in_flight)
    except Exception as exc:
        failed(watch, exc)
        raise
    return watched(events, watch)


@dataclass
class Gathered:
    """A whole generation: its answer, reasoning, tool calls, per-token log-probabilities and final event."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[dict[str, Any]] = field(default_factory=list)  # the token events, when logprobs were asked
    final: dict[str, Any] = field(default_factory=dict)

    @property
    def finish_reason(self) -> str:
        return str(self.final.get("finish_reason", "stop"))


async def gather(lines: Events) -> Gathered:
    out = Gathered()
    async for event in lines:
        if event is None:
            continue
        if "token" in event:
            out.text += event.get("text", "")
            out.reasoning += event.get("reasoning", "")
            out.tool_calls += event.get("tool_calls", [])
            if "logprob" in event:
                out.tokens.append(event)
        else:
            out.final = event
    return out


def call_id(prefix: str = "call_") -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"
