"""Prometheus metrics of one API app: chat requests as they are relayed, cluster state counted at scrape time."""

import asyncio
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import structlog
from fastapi import HTTPException
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from temporalio.client import Client
from temporalio.service import RPCError

from api.routing import Balancer
from api.streaming import Events
from shardline.states import Kind
from workflows.serve import InstanceStatus
from workflows.state import count_states

UNSERVED = "unserved"  # the model label of requests for a model nobody serves: client input is no label
CLUSTER_TIMEOUT = 5.0  # seconds a scrape waits for Temporal before it answers without the cluster gauges
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
KINDS = {Kind.NODE: "nodes", Kind.DOWNLOAD: "downloads", Kind.SERVE: "instances"}  # ShardlineKind -> gauge
RUNNER_GAUGES = {  # rank 0's /stats field -> what the gauge says
    "requests": "Requests the instance's runner took into its batch since it started",
    "batch": "Requests in the instance's running batch",
    "queue": "Requests waiting to join the batch",
    "cache_bytes": "Bytes of KV state in the prefix cache (rank 0's budget, for the rank with the most layers)",
    "cache_entries": "Token prefixes in the prefix cache",
    "cache_hits": "Requests that reused a cached prefix, since the runner started",
    "cache_lookups": "Requests looked up in the prefix cache, since the runner started",
    "cached_tokens": "Prompt tokens reused from the prefix cache, since the runner started",
    "draft_tokens": "Speculative draft tokens proposed (prompt lookup or a draft model), since the runner started",
    "accepted_draft_tokens": "Speculative draft tokens the model accepted, since the runner started",
    "overlapped_steps": "Decoding steps a pipeline ran with every rank busy on its own micro-batch, since it started",
}
log = structlog.get_logger(__name__)


class Metrics:
    """Every metric of one app, in a registry of its own (several apps, as in tests, never share one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("shardline_chat_requests", "Chat completion requests by model and outcome "
                                "(ok, 4xx, 5xx, cancelled)", ["model", "outcome"], registry=r)  # fmt: skip
        self.prompt_tokens = Counter("shardline_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generated = Counter("shardline_generated_tokens", "Completion tokens generated", ["model"], registry=r)
        self.ttft = Histogram("shardline_time_to_first_token_seconds", "From the request to the first token",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        self.decode = Histogram("shardline_decode_tokens_per_second", "Decode speed of each completion",
                                ["model"], buckets=RATE_BUCKETS, registry=r)  # fmt: skip
        self.cached_tokens = Counter("shardline_prompt_cached_tokens", "Prompt tokens served from the prefix cache",
                                     ["model"], registry=r)  # fmt: skip
        self.resumed = Counter("shardline_resumed_requests", "Generations carried over to another runner (or the same "
                               "one, restarted) after theirs was lost mid-request", ["model"], registry=r)  # fmt: skip
        self.runner = {
            name: Gauge(f"shardline_runner_{name}", help_, ["instance", "model"], registry=r)
            for name, help_ in RUNNER_GAUGES.items()
        }
        self.in_flight = Gauge("shardline_instance_in_flight", "Requests this API has open on each instance",
                               ["instance", "model"], registry=r)  # fmt: skip
        self.temporal_up = Gauge("shardline_temporal_up", "1 if the last scrape read the cluster state", registry=r)
        self.cluster = {
            kind: Gauge(f"shardline_{name}", f"{name.capitalize()} by state", ["state"], registry=r)
            for kind, name in KINDS.items()
        }

    def chat(self, model: str) -> "ChatWatch":
        return ChatWatch(self, model)

    async def read_cluster(self, client: Client) -> bool:
        """Set the cluster gauges from Temporal visibility; without an answer in time, leave them out.
        Whether Temporal answered."""
        kinds = list(self.cluster)
        try:
            counts = await asyncio.wait_for(asyncio.gather(*(count_states(client, k) for k in kinds)), CLUSTER_TIMEOUT)
        except (RPCError, TimeoutError, RuntimeError) as err:  # RuntimeError: a client's first connect failed
            log.warning("metrics.cluster_unread", reason=str(err) or type(err).__name__)
            self.temporal_up.set(0)
            for gauge in self.cluster.values():
                gauge.clear()
            return False
        self.temporal_up.set(1)
        for kind, by_state in zip(kinds, counts, strict=True):
            gauge = self.cluster[kind]
            gauge.clear()  # a state nothing is in any more is gone, not stuck at its last count
            for state, n in by_state.items():
                gauge.labels(state).set(n)
        return True

    def set_runners(self, figures: list[tuple[InstanceStatus, dict[str, Any] | None]], in_flight: Balancer) -> None:
        """Each ready instance's runner figures as read at this scrape; a runner that did not answer is left out."""
        for gauge in (*self.runner.values(), self.in_flight):
            gauge.clear()
        for instance, stats in figures:
            labels = (instance.instance_id, instance.model_id)
            self.in_flight.labels(*labels).set(in_flight.counts.get(str(instance.endpoint), 0))
            for name, gauge in self.runner.items():
                if stats is not None and isinstance(stats.get(name), int | float):
                    gauge.labels(*labels).set(stats[name])


def decode_rate(tokens: int, first: float | None, last: float) -> float | None:
    """Tokens/s after the first: that one came out of the prefill, which time to first token measures."""
    if first is None or tokens < 2 or last <= first:
        return None
    return (tokens - 1) / (last - first)


def outcome_of(status: int) -> str:
    return "ok" if status < 400 else f"{status // 100}xx"


@dataclass
class ChatWatch:
    """One chat request, watched from its start; each metric is recorded once, as soon as it is known."""

    metrics: Metrics
    model: str
    started: float = field(default_factory=time.monotonic)
    first: float | None = None
    texts: int = 0
    final: bool = False
    ended: bool = False

    def saw(self, event: dict[str, Any]) -> None:
        """One of the runner's NDJSON events: a token's text, or the final one with the usage."""
        now = time.monotonic()
        if "text" in event:
            self.texts += 1
            if self.first is None:
                self.first = now
                self.metrics.ttft.labels(self.model).observe(now - self.started)
            return
        self.final = True
        done = int(event.get("completion_tokens", 0))
        self.metrics.prompt_tokens.labels(self.model).inc(int(event.get("prompt_tokens", 0)))
        self.metrics.generated.labels(self.model).inc(done)
        self.metrics.cached_tokens.labels(self.model).inc(int(event.get("cached_tokens", 0)))
        rate = decode_rate(done, self.first, now)
        if rate is not None:
            self.metrics.decode.labels(self.model).observe(rate)

    async def passing(self, lines: Events) -> Events:
        """The events, passed on as they are and recorded on the way."""
        outcome = "cancelled"  # unless the stream is read to its end: the client went away
        async with aclosing(lines):
            try:
                async for event in lines:
                    if event is not None:
                        self.saw(event)
                    yield event
                outcome = "ok"
            except Exception as exc:
                self.failed(exc)
                raise
            finally:
                self.end(outcome)  # a no-op after failed()

    def failed(self, exc: Exception) -> None:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        if status == 404:
            self.model = UNSERVED
        self.end(outcome_of(status))

    def end(self, outcome: str) -> None:
        if self.ended:
            return
        self.ended = True
        if not self.final and self.texts:  # cut short: the tokens made so far were still generated
            self.metrics.generated.labels(self.model).inc(self.texts)
        self.metrics.requests.labels(self.model, outcome).inc()
