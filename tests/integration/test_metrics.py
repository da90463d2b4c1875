"""GET /metrics on a live cluster: chat requests timed and counted, cluster state by kind; SDK metrics of a worker."""

from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import QWEN, Cluster
from tests.support.processes import free_port
from tests.support.serving import MESSAGES, served
from tests.support.waits import eventually, wait_node

pytestmark = pytest.mark.asyncio(loop_scope="session")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
async def instance(cluster: Cluster) -> AsyncIterator[str]:
    """QWEN served on one node for the whole module."""
    async with served(cluster, QWEN, ["metrics-a"]) as instance_id:
        yield instance_id


async def scrape(api: httpx.AsyncClient) -> Samples:
    response = await api.get("/metrics")
    assert response.status_code == 200, response.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_chat_requests_move_the_request_metrics(api: httpx.AsyncClient, instance: str) -> None:
    before = await scrape(api)
    body = {"model": QWEN, "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    assert (await api.post("/v1/chat/completions", json=body)).status_code == 200
    streamed = await api.post("/v1/chat/completions", json={**body, "stream": True})
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    assert (await api.post("/v1/chat/completions", json={**body, "model": "org/not-served"})).status_code == 404
    after = await scrape(api)
    assert moved(before, after, "shardline_chat_requests_total", model=QWEN, outcome="ok") == 2
    assert moved(before, after, "shardline_chat_requests_total", model="unserved", outcome="4xx") == 1
    assert moved(before, after, "shardline_generated_tokens_total", model=QWEN) == 24
    assert moved(before, after, "shardline_prompt_tokens_total", model=QWEN) > 0
    assert moved(before, after, "shardline_time_to_first_token_seconds_count", model=QWEN) == 2
    assert 0 < moved(before, after, "shardline_time_to_first_token_seconds_sum", model=QWEN) < 60
    assert moved(before, after, "shardline_decode_tokens_per_second_count", model=QWEN) == 2
    assert moved(before, after, "shardline_decode_tokens_per_second_sum", model=QWEN) > 0
    assert not any(name.startswith("shardline_") and "org/not-served" in str(labels) for name, labels in after)


async def test_a_client_hanging_up_counts_as_cancelled(cluster: Cluster, api: httpx.AsyncClient, instance: str) -> None:
    before = await scrape(api)
    body = {"model": QWEN, "messages": MESSAGES, "max_tokens": 4000, "temperature": 0, "stream": True}
    async with (
        httpx.AsyncClient(base_url=cluster.api, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        chunks = 0
        async for line in response.aiter_lines():
            chunks += line.startswith("data: ")
            if chunks >= 3:
                break  # hang up with ~4000 tokens still to go

    requests = "shardline_chat_requests_total"

    async def counted() -> Samples | None:
        after = await scrape(api)
        return after if moved(before, after, requests, model=QWEN, outcome="cancelled") == 1 else None

    after = await eventually(counted, 30, "the hung-up request counted as cancelled")
    assert moved(before, after, requests, model=QWEN, outcome="ok") == 0
    made = moved(before, after, "shardline_generated_tokens_total", model=QWEN)
    assert 2 <= made < 1000  # the tokens it streamed before the hang-up, not the 4000 asked for


async def test_cluster_gauges_show_nodes_instances_downloads(api: httpx.AsyncClient, instance: str) -> None:
    samples = await scrape(api)
    assert value(samples, "shardline_temporal_up") == 1
    assert value(samples, "shardline_nodes", state="online") >= 1
    assert value(samples, "shardline_instances", state="ready") >= 1
    assert value(samples, "shardline_downloads", state="completed") >= 1  # the files metrics-a serves from


async def test_cluster_gauges_agree_with_the_lists(api: httpx.AsyncClient, instance: str) -> None:
    """Every state the API lists, the gauges count the same (nodes once each, departed ones too)."""

    async def listed() -> dict[str, Counter[str]]:
        nodes = (await api.get("/nodes", params={"departed": "true"})).json()
        assert len({n["node_id"] for n in nodes}) == len(nodes), "a node is listed once"
        downloads = (await api.get("/downloads")).json()
        instances = (await api.get("/instances", params={"all": "true"})).json()
        return {"shardline_nodes": Counter(n["state"] for n in nodes),
                "shardline_downloads": Counter(d["state"] for d in downloads),
                "shardline_instances": Counter(i["state"] for i in instances)}  # fmt: skip

    async def agree() -> bool | None:
        before, samples, after = await listed(), await scrape(api), await listed()
        if before != after:
            return None  # something changed meanwhile: look again
        counted = {name: Counter({dict(labels)["state"]: int(v) for (n, labels), v in samples.items() if n == name})
                   for name in before}  # fmt: skip
        return counted == before or None

    await eventually(agree, 30, "the gauges agree with GET /nodes, /downloads and /instances")


async def test_node_worker_serves_temporal_sdk_metrics(cluster: Cluster, api: httpx.AsyncClient, node_id: str) -> None:
    port = free_port()
    cluster.start_node(node_id, SHARDLINE_METRICS_PORT=str(port))
    await wait_node(api, node_id, "online")

    async def sdk_metrics() -> str | None:
        try:
            text = (await api.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
        except httpx.TransportError:
            return None
        return text if f'task_queue="shardline-node-{node_id}"' in text else None

    text = await eventually(sdk_metrics, 30, f"SDK metrics of {node_id} on port {port}")
    names = {family.name for family in text_string_to_metric_families(text)}
    assert "temporal_request" in names and any(n.startswith("temporal_worker_") for n in names), names
