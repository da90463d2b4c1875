"""One generation on rank 0's runner, whatever wire format asked for it: pick the instance, stream its events,
count them in the metrics, and gather them for a non-streamed answer."""

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import httpx
import structlog
from fastapi import HTTPException
from temporalio.service import RPCError

from api.instances import InstanceCache
from api.metrics import Metrics
from api.routing import Balancer, prefixes
from api.runners import RunnerDropped, RunnerLost, RunnerUnreachable, generate, tokenize
from api.streaming import KEEPALIVE_S, Events
from shardline.settings import Settings
from shardline.states import InstanceState
from workflows import client as workflows
from workflows.serve import InstanceStatus

log = structlog.get_logger(__name__)
WAITING = {429, 503}  # while resuming: a full queue, an instance not ready (yet) or unreachable
RESUME_POLL_S = 0.5
FRESH_S = 0.25  # before answering that no instance is ready, the view is asked again if older than this
TELLING: set[asyncio.Task[None]] = set()  # signals on their way (a task nobody holds may be collected)


@dataclass
class Inference:
    """What a generation needs of the app: its instances, its HTTP client, its metrics and in-flight counts."""

    instances: InstanceCache
    http: httpx.AsyncClient
    metrics: Metrics
    in_flight: Balancer
    settings: Settings

    async def start(self, model: str, body: dict[str, Any], key: str | None = None) -> Events:
        """The runner's events for `body`, counted in the metrics as they pass, resumed on a lost runner. `key`: the
        client's name for the conversation, if it gives one (routing.py)."""
        watch = self.metrics.chat(model)
        try:
            events = await self.runner_events(model, body, key)
        except Exception as exc:
            watch.failed(exc)
            raise
        return watch.passing(self.resuming(model, body, key, events))

    async def resuming(self, model: str, body: dict[str, Any], key: str | None, events: Events) -> Events:
        """`events`, and if their runner is lost, the rest of the generation from wherever the model is ready
        next: the prompt and the tokens already passed on go there, with the same seed, and it goes on from the
        next token (greedy or seeded, the same text as if nothing had happened). None while it waits."""
        body, sent, lost = dict(body), [], 0
        while True:
            try:
                async with aclosing(events):
                    async for event in events:
                        if event is not None and event.get("accepted"):
                            if body.get("seed") is None:  # a sampled request draws on from the same random stream
                                body["seed"] = event.get("seed")
                            if lost:
                                continue  # the client has had its opening
                        elif event is not None and "token" in event:
                            sent.append(int(event["token"]))
                        yield event
                return
            except RunnerLost as exc:
                lost += 1
                if lost > self.settings.resume_attempts:
                    raise RunnerLost(f"{exc.detail} (the generation was resumed {lost - 1} times: given up)") from exc
                log.warning("generation.resuming", model=model, tokens=len(sent), reason=exc.detail, attempt=lost)
                self.metrics.resumed.labels(model).inc()
                if exc.instance_id is not None:
                    self.tell(exc.instance_id)
                resumed = self.resume(model, {**body, "resume": list(sent)}, key, exc)
                async with aclosing(resumed):
                    async for waiting in resumed:
                        if waiting is None:
                            yield None
                        else:
                            events = waiting

    def tell(self, instance_id: str) -> None:
        """The instance's count of carried-over generations, in the background (it may be mid-recovery, or
        Temporal down: the stream does not wait for it, and a lost count only costs a figure)."""
        task = asyncio.create_task(self.signal_carried(instance_id))
        TELLING.add(task)
        task.add_done_callback(TELLING.discard)

    async def signal_carried(self, instance_id: str) -> None:
        try:
            await workflows.carried_over(self.instances.client, instance_id, 1)
        except RPCError as err:
            log.warning("generation.carried_over_unrecorded", instance_id=instance_id, reason=str(err))

    async def resume(
        self, model: str, body: dict[str, Any], key: str | None, lost: RunnerLost
    ) -> AsyncGenerator[Events | None, None]:
        """None while no instance of `model` takes the resumed request (up to SHARDLINE_RESUME_TIMEOUT), then
        its events; an instance that is not coming back (stopped, failed) or the deadline ends it with the reason."""
        deadline = time.monotonic() + self.settings.resume_timeout
        told = time.monotonic()
        while True:
            try:
                yield await self.runner_events(model, body, key, fresh=False)
                return
            except HTTPException as exc:
                if exc.status_code not in WAITING or time.monotonic() >= deadline:
                    waited = f"{self.settings.resume_timeout:.0f} s" if exc.status_code in WAITING else "resuming"
                    status = exc.status_code if exc.status_code < 500 else 503
                    raise HTTPException(status, f"{lost.detail}; after {waited}: {exc.detail}") from exc
            if time.monotonic() - told >= KEEPALIVE_S:
                told = time.monotonic()
                yield None
            await asyncio.sleep(RESUME_POLL_S)  # the instance cache asks Temporal again when it is a second old

    async def count_tokens(self, model: str, request: dict[str, Any]) -> int:
        """How many prompt tokens `request` makes for `model` (a count holds no place in the batch)."""
        return await tokenize(self.http, await self.instance_for(model), request)

    async def instance_for(
        self, model: str, body: dict[str, Any] | None = None, key: str | None = None, fresh: bool = True
    ) -> InstanceStatus:
        """The ready instance of `model` for `body`: the one that was sent its prefix (or conversation `key`) unless
        it is clearly busier, else the one with the fewest requests in flight from this API (routing.py). With a
        `body`, counted in flight from now on (the generation releases it)."""
        ready = await self.ready(model, fresh)
        return self.in_flight.least_busy(ready) if body is None else self.in_flight.pick(ready, prefixes(body), key)

    async def ready(self, model: str, fresh: bool = True) -> list[InstanceStatus]:
        """The ready instances of `model`: at least one, or a 404 (none) or 503 (none ready) saying why. `fresh`:
        before saying so, the view is asked again if older than FRESH_S (a generation being resumed polls instead,
        on the cache's own second)."""
        candidates = await self.instances.for_model(model)
        ready = [i for i in candidates if i.state == InstanceState.READY and i.endpoint]
        if not ready and fresh:  # what the cache last saw may be up to a second old: an instance may have just healed
            candidates = await self.instances.for_model(model, max_age=FRESH_S)
            ready = [i for i in candidates if i.state == InstanceState.READY and i.endpoint]
        if ready:
            return ready
        if not candidates:
            raise HTTPException(
                404, f"model {model!r} is not served: start it with POST /instances or `shardline serve`"
            )
        states = ", ".join(f"{i.instance_id} is {i.state}" + (f" ({i.reason})" if i.reason else "") for i in candidates)
        raise HTTPException(503, f"model {model!r} is not ready: {states}")

    async def runner_events(
        self, model: str, body: dict[str, Any], key: str | None = None, fresh: bool = True
    ) -> Events:
        """One generation's events, from the first on: so a runner that is gone, or a request it refuses, is an
        error before any response starts, not a 200 cut short. A runner that moved (its instance recovered since
        the last lookup) is looked up again, once; a full one (429) gives way to the least busy other instance."""
        instance = await self.instance_for(model, body, key, fresh)
        try:
            return await first_event(self.generate(instance, body), self.settings.runner_silence)
        except RunnerUnreachable:
            await self.instances.refresh()
            moved = await self.instance_for(model, body, key)
            if moved.endpoint == instance.endpoint:
                self.in_flight.release(str(moved.endpoint))  # picked, never sent
                raise
            return await first_event(self.generate(moved, body), self.settings.runner_silence)
        except RunnerDropped as exc:
            # nothing came back yet, so sending it again is safe: once, for a connection the runner closed as it
            # was sent; a runner that is really gone is unreachable the second time (a 503, or resumed elsewhere)
            log.info("generation.sent_again", model=model, reason=exc.detail)
            again = await self.instance_for(model, body, key)
            return await first_event(self.generate(again, body), self.settings.runner_silence)
        except HTTPException as exc:
            others = [i for i in await self.ready(model) if i.endpoint != instance.endpoint]
            if exc.status_code != 429 or not others:
                raise
            other = self.in_flight.hold(self.in_flight.least_busy(others))
            return await first_event(self.generate(other, body), self.settings.runner_silence)

    def generate(self, instance: InstanceStatus, body: dict[str, Any]) -> Events:
        return generate(self.http, instance, body, self.in_flight, self.settings.runner_silence)


async def first_event(lines: Events, within: float) -> Events:
    """Wait for the runner's first event, then stream everything from there. The first is the runner's `accepted`,
    sent at once, before the prefill: the request is valid and queued, so the response starts. A runner that says
    nothing `within` seconds is unreachable (its host froze: the connection opens, nothing answers)."""
    try:
        first = await asyncio.wait_for(anext(lines), within)
    except StopAsyncIteration:
        return lines
    except TimeoutError as exc:
        await lines.aclose()
        raise RunnerUnreachable(f"the model's runner did not answer within {within:.0f} s") from exc
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
