"""Metrics without a cluster: request timings, /metrics with Temporal unreachable, the per-app registry,
the key on /metrics, and the ports `shardline up` gives the workers' SDK metrics. The cluster gauges
against a live cluster: tests/integration/test_metrics.py."""

import asyncio
import socket
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from temporalio.client import Client

from api import metrics as api_metrics
from api.metrics import ChatWatch, Metrics, decode_rate, outcome_of
from shardline.settings import Settings
from shardline.states import closed_state
from shardline.supervisor import piece_env
from shardline.temporal import metrics_runtime
from tests.support.offline_app import offline_app
from tests.support.processes import free_port

MODEL = "org/m"


@pytest.fixture(scope="module")
def unreachable() -> Client:
    """A real Temporal client for a port nobody listens on: every call fails as it would with the server down."""
    return asyncio.run(Client.connect(f"127.0.0.1:{free_port()}", lazy=True))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """time.monotonic() as the metrics see it: each call takes the next value."""
    ticks: list[float] = []
    values = iter(ticks)
    monkeypatch.setattr(api_metrics.time, "monotonic", lambda: next(values))
    yield ticks


def test_pure_helpers() -> None:
    assert decode_rate(11, first=1.0, last=3.0) == 5.0  # ten tokens after the first, in two seconds
    assert decode_rate(1, first=1.0, last=3.0) is None and decode_rate(5, first=None, last=3.0) is None
    assert [outcome_of(s) for s in (200, 404, 422, 502, 503)] == ["ok", "4xx", "4xx", "5xx", "5xx"]
    assert closed_state("download", "TimedOut") == "failed" and closed_state("download", "Completed") == "completed"
    assert closed_state("node", "Completed") == "departed" and closed_state("serve", "Canceled") == "stopped"
    assert closed_state("serve", "ContinuedAsNew") is None  # the same instance, carrying on


def test_a_request_is_timed_and_counted(clock: list[float]) -> None:
    clock += [10.5, 10.6, 11.5]  # first token, second token, final event
    metrics = Metrics()
    watch = ChatWatch(metrics, MODEL, started=10.0)
    watch.saw({"text": "He", "token": 1})
    watch.saw({"text": "llo", "token": 2})
    watch.saw({"finish_reason": "length", "prompt_tokens": 7, "completion_tokens": 10})
    watch.end("ok")
    watch.end("cancelled")  # ended once only
    value = metrics.registry.get_sample_value
    assert value("shardline_chat_requests_total", {"model": MODEL, "outcome": "ok"}) == 1
    assert value("shardline_chat_requests_total", {"model": MODEL, "outcome": "cancelled"}) is None
    assert value("shardline_generated_tokens_total", {"model": MODEL}) == 10
    assert value("shardline_prompt_tokens_total", {"model": MODEL}) == 7
    assert value("shardline_time_to_first_token_seconds_sum", {"model": MODEL}) == pytest.approx(0.5)
    assert value("shardline_decode_tokens_per_second_sum", {"model": MODEL}) == pytest.approx(9 / 1.0)
    assert Metrics().registry.get_sample_value("shardline_generated_tokens_total", {"model": MODEL}) is None


def test_a_cut_short_stream_counts_the_tokens_it_made(clock: list[float]) -> None:
    clock += [1.0] * 3
    metrics = Metrics()
    watch = metrics.chat(MODEL)
    for _ in range(3):
        watch.saw({"text": "x", "token": 1})
    watch.end("cancelled")
    value = metrics.registry.get_sample_value
    assert value("shardline_chat_requests_total", {"model": MODEL, "outcome": "cancelled"}) == 1
    assert value("shardline_generated_tokens_total", {"model": MODEL}) == 3
    assert value("shardline_decode_tokens_per_second_count", {"model": MODEL}) is None


def test_metrics_without_temporal_still_answer(unreachable: Client) -> None:
    http = offline_app(unreachable)
    response = http.get("/metrics")
    assert response.status_code == 200
    got = samples(response.text)
    assert got[("shardline_temporal_up", ())] == 0
    assert not any(name == "shardline_nodes" for name, _ in got)


def test_each_app_has_its_own_registry(unreachable: Client) -> None:
    first, second = offline_app(unreachable), offline_app(unreachable)
    first.app.state.metrics.chat(MODEL).end("ok")  # type: ignore[attr-defined]
    assert 'shardline_chat_requests_total{model="org/m",outcome="ok"} 1.0' in first.get("/metrics").text
    assert "org/m" not in second.get("/metrics").text


def test_metrics_want_the_api_key(unreachable: Client) -> None:
    http = offline_app(unreachable, api_key=SecretStr("s3cret"))
    assert http.get("/metrics").status_code == 401
    assert http.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_up_gives_each_worker_its_own_metrics_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHARDLINE_METRICS_PORT", raising=False)
    assert "SHARDLINE_METRICS_PORT" not in piece_env("node", Settings())
    settings = Settings(metrics_port=9400)
    assert piece_env("control", settings)["SHARDLINE_METRICS_PORT"] == "9400"
    assert piece_env("node", settings)["SHARDLINE_METRICS_PORT"] == "9401"
    assert "SHARDLINE_METRICS_PORT" not in piece_env("api", settings)


def test_a_taken_metrics_port_is_a_readable_error() -> None:
    assert metrics_runtime(Settings()) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port} \\(SHARDLINE_METRICS_PORT\\)"):
            metrics_runtime(Settings(metrics_port=port))
