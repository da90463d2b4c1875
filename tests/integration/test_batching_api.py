"""Admission and routing through the API: two instances of one model on a node that batches one request at
a time and queues two more. Requests spread over both, a full instance answers 429 with Retry-After, a
queued stream gets keep-alive comments, and the metrics and /nodes show the batch and the prefix cache."""

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TINY, Cluster
from tests.support.serving import MESSAGES, metric, running_nodes, start_instance, wait_state
from tests.support.waits import eventually

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow(33)]
NODE = "batch-a"
LONG = 300  # tokens: long enough that the requests overlap


@pytest.fixture(scope="module")
async def pair(cluster: Cluster) -> AsyncIterator[list[dict[str, Any]]]:
    async with (
        httpx.AsyncClient(base_url=cluster.api, timeout=60) as api,
        running_nodes(cluster, api, [NODE], SHARDLINE_MAX_BATCH="1", SHARDLINE_MAX_QUEUE="2"),
    ):
        ids = [await start_instance(api, TINY, nodes=[NODE]) for _ in range(2)]
        ready = [await wait_state(api, i, {"ready", "failed"}) for i in ids]
        assert all(r["state"] == "ready" for r in ready), ready
        yield ready
        for i in ids:
            await api.delete(f"/instances/{i}")

        async def cache_freed() -> bool:
            nodes = (await api.get("/nodes")).json()
            return any(n["node_id"] == NODE and n["prompt_cache_bytes"] == 0 for n in nodes)

        await eventually(cache_freed, 30, "the stopped instances' prefix caches are freed")


async def chat(http: httpx.AsyncClient, max_tokens: int = LONG) -> httpx.Response:
    body = {"model": TINY, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0}
    return await http.post("/v1/chat/completions", json=body)


async def test_requests_spread_over_the_instances(cluster: Cluster, pair: list[dict[str, Any]]) -> None:
    ids = [i["instance_id"] for i in pair]
    async with httpx.AsyncClient(base_url=cluster.api, timeout=120) as http:
        before = await metric(http, "shardline_runner_requests")
        replies = await asyncio.gather(*(chat(http) for _ in range(4)))
        after = await metric(http, "shardline_runner_requests")
    assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
    added = [after[i] - before[i] for i in ids]
    assert sum(added) == 4 and min(added) >= 1, added  # both instances took a share


async def test_runners_answer_only_their_api(pair: list[dict[str, Any]]) -> None:
    body = {"messages": MESSAGES, "max_tokens": 4}
    async with httpx.AsyncClient(base_url=str(pair[0]["endpoint"]), timeout=30) as runner:
        anyone = await runner.post("/generate", json=body)
        guessed = await runner.post("/generate", json=body, headers={"Authorization": "Bearer guess"})
        stats = await runner.get("/stats")
        health = await runner.get("/health")
    assert anyone.status_code == guessed.status_code == stats.status_code == 401
    assert health.status_code == 200  # liveness stays open
    assert "secret" not in json.dumps(pair)  # the API never shows it


async def test_a_full_instance_answers_429_with_retry_after(cluster: Cluster, pair: list[dict[str, Any]]) -> None:
    endless = {"model": TINY, "messages": MESSAGES, "max_tokens": 32768, "temperature": 0, "stream": True}
    async with httpx.AsyncClient(base_url=cluster.api, timeout=120) as http, contextlib.AsyncExitStack() as stack:
        readers = []
        for _ in pair:  # one endless request fills each instance's batch, for as long as the test needs
            blocker = await stack.enter_async_context(http.stream("POST", "/v1/chat/completions", json=endless))
            busy = asyncio.Event()
            readers.append((asyncio.create_task(read_on(blocker, busy)), blocker))
            await asyncio.wait_for(busy.wait(), 60)
        burst = [asyncio.create_task(chat(http, 4)) for _ in range(8)]  # room for 2 x 2 queued
        first, _ = await asyncio.wait(burst, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        for reader, blocker in readers:  # hang up on the endless ones: the queued ones run
            reader.cancel()
            await blocker.aclose()
        replies = await asyncio.gather(*burst)
        refused = [r for r in replies if r.status_code == 429]
        assert first and all(r.result().status_code == 429 for r in first), "refused at once, while the rest wait"
        assert refused, [r.status_code for r in replies]
        assert all(r.status_code in (200, 429) for r in replies), [r.text for r in replies]
        assert refused[0].headers["Retry-After"] == "1"
        assert refused[0].json()["error"]["type"] == "rate_limit_error"
        assert "waiting" in refused[0].json()["error"]["message"]
        assert (await chat(http, 4)).status_code == 200  # and it serves again as soon as there is room


async def test_a_queued_stream_gets_keepalive_comments(cluster: Cluster, pair: list[dict[str, Any]]) -> None:
    """While a request waits its turn in the queue the stream carries an SSE comment every few seconds, so that
    proxies and clients do not give up; then the answer comes."""
    endless = {"model": TINY, "messages": MESSAGES, "max_tokens": 32768, "temperature": 0, "stream": True}
    lines: list[str] = []
    async with httpx.AsyncClient(base_url=cluster.api, timeout=60) as http, contextlib.AsyncExitStack() as stack:
        readers = []
        for _ in pair:  # one endless request fills each instance's batch
            blocker = await stack.enter_async_context(http.stream("POST", "/v1/chat/completions", json=endless))
            busy = asyncio.Event()
            readers.append((asyncio.create_task(read_on(blocker, busy)), blocker))
            await asyncio.wait_for(busy.wait(), 60)
        waiting = await stack.enter_async_context(
            http.stream("POST", "/v1/chat/completions", json={**endless, "max_tokens": 12})
        )
        async for line in waiting.aiter_lines():
            lines.append(line)
            if line.startswith(": keep-alive"):
                for reader, blocker in readers:  # hang up on the endless ones: the queued one runs
                    reader.cancel()
                    await blocker.aclose()
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]
    finish = [d["choices"][0]["finish_reason"] for d in data if d["choices"] and d["choices"][0]["finish_reason"]]
    assert any(line.startswith(": keep-alive") for line in lines), lines
    assert finish == ["length"] and [line for line in lines if line][-1] == "data: [DONE]", lines


async def read_on(stream: httpx.Response, busy: asyncio.Event) -> None:
    """Read a stream to its end (leaving its lines unread would hang up); `busy` once tokens flow."""
    chunks = 0
    async for line in stream.aiter_lines():
        chunks += line.startswith("data: ")
        if chunks >= 3:
            busy.set()


async def test_metrics_and_nodes_show_batches_and_the_prefix_cache(
    cluster: Cluster, pair: list[dict[str, Any]]
) -> None:
    async with httpx.AsyncClient(base_url=cluster.api, timeout=60) as http:
        first = await chat(http, 8)
        second = await chat(http, 8)  # the same conversation: its prompt is cached now
        assert first.status_code == second.status_code == 200
        assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        families = {f.name: f for f in text_string_to_metric_families((await http.get("/metrics")).text)}

        async def cache_on_node() -> int | None:
            nodes = (await http.get("/nodes")).json()
            return next((n["prompt_cache_bytes"] for n in nodes if n["node_id"] == NODE and n["prompt_cache_bytes"]),
                        None)  # fmt: skip

        assert await eventually(cache_on_node, 30, f"{NODE} reports its runners' prefix caches") > 0
    instances = {i["instance_id"] for i in pair}
    for name in ("shardline_runner_batch", "shardline_runner_queue", "shardline_runner_cache_bytes"):
        assert {s.labels["instance"] for s in families[name].samples} >= instances, name
    assert sum(s.value for s in families["shardline_runner_cache_hits"].samples) >= 1
    cached = families["shardline_prompt_cached_tokens"].samples
    assert any(s.labels["model"] == TINY and s.value > 0 for s in cached), cached


async def test_routing_survives_a_control_worker_restart(cluster: Cluster, pair: list[dict[str, Any]]) -> None:
    """Temporal is the control plane only: with no worker to answer the instances' status queries, chats
    still go to the runners last known ready."""
    async with httpx.AsyncClient(base_url=cluster.api, timeout=60) as http:
        assert (await chat(http, 4)).status_code == 200  # the API has seen them ready (whatever ran before)
        cluster.signal("control", signal.SIGKILL)
        try:
            for _ in range(3):  # across several refreshes of the API's instance cache (1 s each)
                reply = await chat(http, 4)
                assert reply.status_code == 200, reply.text
                await asyncio.sleep(1.5)
        finally:
            cluster.start_control()
            for instance in pair:  # the cluster as the next test expects it: every instance answering ready
                assert (await wait_state(http, instance["instance_id"], {"ready", "failed"}))["state"] == "ready"
