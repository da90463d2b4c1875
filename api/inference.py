"""One generation on rank 0's runner, whatever wire format asked for it: pick the instance, stream its events,
count them in the metrics, and gather them for a non-streamed answer."""

from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import HTTPException

from api.instances import InstanceCache
from api.metrics import Metrics
from api.runners import InFlight, RunnerUnreachable, generate, tokenize
from api.streaming import Events
from shardline.states import InstanceState
from workflows.serve import InstanceStatus


@dataclass
class Inference:
    """What a generation needs of the app: its instances, its HTTP client, its metrics and in-flight counts."""

    instances: InstanceCache
    http: httpx.AsyncClient
    metrics: Metrics
    in_flight: InFlight

    async def start(self, model: str, body: dict[str, Any]) -> Events:
        """The runner's events for `body`, counted in the metrics as they pass."""
        watch = self.metrics.chat(model)
        try:
            events = await self.runner_events(model, body)
        except Exception as exc:
            watch.failed(exc)
            raise
        return watch.passing(events)

    async def count_tokens(self, model: str, request: dict[str, Any]) -> int:
        """How many prompt tokens `request` makes for `model` (a count holds no place in the batch)."""
        return await tokenize(self.http, await self.instance_for(model, hold=False), request)

    async def instance_for(self, model: str, hold: bool = True) -> InstanceStatus:
        """The ready instance of `model` with the fewest requests in flight from this API; with `hold`, counted
        in flight from now on (the generation releases it)."""
        candidates = await self.instances.for_model(model)
        ready = [i for i in candidates if i.state == InstanceState.READY and i.endpoint]
        if ready:
            return self.in_flight.pick(ready) if hold else self.in_flight.least_busy(ready)
        if not candidates:
            raise HTTPException(
                404, f"model {model!r} is not served: start it with POST /instances or `shardline serve`"
            )
        states = ", ".join(f"{i.instance_id} is {i.state}" + (f" ({i.reason})" if i.reason else "") for i in candidates)
        raise HTTPException(503, f"model {model!r} is not ready: {states}")

    async def runner_events(self, model: str, body: dict[str, Any]) -> Events:
        """One generation's events, from the first on: so a runner that is gone, or a request it refuses, is an
        error before any response starts, not a 200 cut short. A runner that moved (its instance recovered since
        the last lookup) is looked up again, once."""
        instance = await self.instance_for(model)
        try:
            return await first_event(generate(self.http, instance, body, self.in_flight))
        except RunnerUnreachable:
            await self.instances.refresh()
            moved = await self.instance_for(model)
            if moved.endpoint == instance.endpoint:
                self.in_flight.release(str(moved.endpoint))  # picked, never sent
                raise
            return await first_event(generate(self.http, moved, body, self.in_flight))


async def first_event(lines: Events) -> Events:
    """Wait for the runner's first event (or the first keep-alive), then stream everything from there. The first is
    the runner's `accepted` (sent before the prefill): the request is valid and queued, so the response starts."""
    try:
        first = await anext(lines)
    except StopAsyncIteration:
        return lines
    except BaseException:
        await lines.aclose()
        raise
    if first is not None and first.get("accepted"):
        return lines

    async def from_first() -> Events:
        async with aclosing(lines):
            yield first
            async for event in lines:
                yield event

    return from_first()


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
