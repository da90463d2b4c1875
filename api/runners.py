"""Talking to rank 0's runner: its NDJSON stream, its /stats, its tokenizer."""

import json
import time
from contextlib import aclosing
from typing import Any

import httpx
from fastapi import HTTPException

from api.routing import Balancer
from api.streaming import KEEPALIVE_S, Events, with_keepalives
from workflows.serve import InstanceStatus

# a runner's host that is gone (partitioned, powered off) is a 503 within seconds, not after the OS gives up
RUNNER_TIMEOUT = httpx.Timeout(None, connect=10.0)
STATS_TIMEOUT = 2.0
LISTEN_S = 1.0  # how often a stream's silence is looked at (runners send an empty line every second)


class RunnerLost(HTTPException):
    """The runner went away, froze or was cut off: a generation can go on elsewhere (a 503 if it cannot).
    `instance_id`: whose runner it was, where known."""

    def __init__(self, detail: str, instance_id: str | None = None) -> None:
        super().__init__(503, detail)
        self.instance_id = instance_id


class RunnerUnreachable(RunnerLost):
    """Not even connected: nothing was sent."""


class RunnerDropped(RunnerLost):
    """The connection broke (reset or closed by the runner's side) before or while it answered."""


def refusal(response: httpx.Response, body: bytes) -> HTTPException:
    """The runner's 4xx/5xx as the API's own: the client's mistakes and a full queue keep their status."""
    try:
        detail = str(json.loads(body)["detail"])
    except (ValueError, KeyError, TypeError):
        detail = body.decode(errors="replace")[:500]
    if response.status_code == 429:
        return HTTPException(429, detail, headers={"Retry-After": response.headers.get("Retry-After", "1")})
    if response.status_code < 500:
        return HTTPException(400, detail)
    return HTTPException(502, f"the model's runner failed: {detail}")


def auth(instance: InstanceStatus) -> dict[str, str]:
    return {"Authorization": f"Bearer {instance.secret}"} if instance.secret else {}


async def generate(
    http: httpx.AsyncClient, instance: InstanceStatus, body: dict[str, Any], in_flight: Balancer, silence: float
) -> Events:
    """The runner's NDJSON events; None while none came for KEEPALIVE_S. An error event ends the stream with an
    HTTPException; a runner that went away, or (if it says it sends heartbeats) sent nothing at all for `silence`
    seconds, with RunnerLost. Closing this generator closes the connection, and the runner drops the request."""
    endpoint = str(instance.endpoint)
    try:  # started at once by its caller, right after `pick`, so the release always runs
        try:
            async with http.stream(
                "POST", f"{endpoint}/generate", json=body, headers=auth(instance), timeout=RUNNER_TIMEOUT
            ) as response:
                if response.status_code != 200:
                    raise refusal(response, await response.aread())
                heard = told = time.monotonic()
                bound: float | None = None  # a runner from before heartbeats is never timed out
                async with aclosing(with_keepalives(response.aiter_lines(), LISTEN_S)) as lines:
                    async for line in lines:
                        now = time.monotonic()
                        if line is not None:
                            heard = now
                        elif bound is not None and now - heard > bound:
                            raise RunnerLost(f"the model's runner at {endpoint} has sent nothing for {now - heard:.0f}"
                                             " s: its node froze or was cut off", instance.instance_id)  # fmt: skip
                        if line and line.strip():
                            event = runner_event(line, instance.instance_id)
                            if event.get("accepted"):
                                bound = silence if event.get("heartbeat_s") else None
                                in_flight.learn(endpoint, event.get("max_batch"))
                            told = now
                            yield event
                        elif now - told >= KEEPALIVE_S:
                            told = now
                            yield None
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise RunnerUnreachable(f"the model's runner is unreachable ({exc}); the instance is recovering") from exc
        except httpx.TransportError as exc:
            detail = f"the model's runner went away ({exc}); the instance is recovering"
            raise RunnerDropped(detail, instance.instance_id) from exc
    finally:
        in_flight.release(endpoint)


def runner_event(line: str, instance_id: str | None = None) -> dict[str, Any]:
    event = json.loads(line)
    if "error" in event:
        status = int(event.get("status", 500))
        if status == 503:  # the runner is shutting down (its instance is being re-placed, or stopped)
            raise RunnerLost(str(event["error"]), instance_id)
        raise HTTPException(status, str(event["error"]))
    return dict(event)


async def runner_stats(http: httpx.AsyncClient, instance: InstanceStatus) -> dict[str, Any] | None:
    """Rank 0's batch, queue and prefix-cache figures; None if it does not answer quickly."""
    try:
        response = await http.get(f"{instance.endpoint}/stats", headers=auth(instance), timeout=STATS_TIMEOUT)
        return dict(response.json()) if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


async def context_length(http: httpx.AsyncClient, instance: InstanceStatus) -> int | None:
    """The longest prompt and answer the runner takes, in tokens; None if it does not say quickly."""
    context = (await runner_stats(http, instance) or {}).get("context")
    return int(context) if isinstance(context, int) else None


async def tokenize(http: httpx.AsyncClient, instance: InstanceStatus, body: dict[str, Any]) -> int:
    """How many tokens the runner's template and tokenizer make of `body`'s prompt."""
    try:
        response = await http.post(f"{instance.endpoint}/tokenize", json=body, headers=auth(instance), timeout=30.0)
    except httpx.TransportError as exc:
        raise RunnerUnreachable(f"the model's runner is unreachable ({exc}); the instance is recovering") from exc
    if response.status_code != 200:
        raise refusal(response, response.content)
    return int(response.json()["prompt_tokens"])
