"""Serving through the whole stack: ServingWorkflow, run_shard on node workers, MLX runners, the OpenAI API."""

import asyncio
import itertools
import signal
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from openai import AsyncOpenAI

from tests.conftest import QWEN, TINY, Cluster
from tests.support.waits import eventually, wait_node

MESSAGES = [{"role": "user", "content": "Tell me about the quiet river"}]
MAX_TOKENS = 12


def reference(model_dir: Path, max_tokens: int = MAX_TOKENS) -> str:
    """Plain mlx_lm, one process, greedy: what every served instance must say too."""
    from mlx_lm import generate, load

    model, tokenizer = load(str(model_dir))
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    return str(generate(model, tokenizer, prompt, max_tokens=max_tokens))


def runners(homes: list[Path]) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "shardline.engine.runner" in cmdline and any(str(h) in cmdline for h in homes):
            found.append(proc)
    return found


async def start_nodes(cluster: Cluster, api: httpx.AsyncClient, node_ids: list[str], **env: str) -> list[Path]:
    homes = [cluster.start_node(n, **env) for n in node_ids]
    for n in node_ids:
        await wait_node(api, n, "online")
    return homes


async def serve(api: httpx.AsyncClient, model: str, **body: Any) -> str:
    response = await api.post("/instances", json={"model": model, **body})
    assert response.status_code == 202, response.text
    return str(response.json()["instance_id"])


async def wait_state(
    api: httpx.AsyncClient, instance_id: str, states: set[str], timeout: float = 120
) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        current: dict[str, Any] = (await api.get(f"/instances/{instance_id}")).json()
        return current if current["state"] in states else None

    return await eventually(probe, timeout, f"{instance_id} becomes {states}")


async def greedy(cluster: Cluster, model: str, stream: bool) -> str:
    openai = AsyncOpenAI(base_url=f"{cluster.api}/v1", api_key="unused", max_retries=0)
    if not stream:
        reply = await openai.chat.completions.create(model=model, messages=MESSAGES, temperature=0,  # type: ignore[arg-type]
                                                     max_tokens=MAX_TOKENS)  # fmt: skip
        assert (
            reply.choices[0].finish_reason == "length" and reply.usage and reply.usage.completion_tokens == MAX_TOKENS
        )
        return reply.choices[0].message.content or ""
    parts = []
    finish = None
    async for event in await openai.chat.completions.create(model=model, messages=MESSAGES, temperature=0,  # type: ignore[arg-type]
                                                            max_tokens=MAX_TOKENS, stream=True):  # fmt: skip
        if event.choices:
            parts.append(event.choices[0].delta.content or "")
            finish = event.choices[0].finish_reason or finish
    assert finish == "length"
    return "".join(parts)


async def stop(api: httpx.AsyncClient, instance_id: str, homes: list[Path]) -> None:
    stopped = (await api.delete(f"/instances/{instance_id}")).json()
    assert stopped["state"] == "stopped", stopped
    assert runners(homes) == []


@pytest.mark.parametrize("size", [2, 3])
async def test_pipeline_matches_mlx_lm(
    cluster: Cluster, api: httpx.AsyncClient, model_dirs: dict[str, Path], size: int
) -> None:
    node_ids = [f"p{size}-{i}-{id(api) % 10000}" for i in range(size)]
    homes = await start_nodes(cluster, api, node_ids)
    try:
        instance = await serve(api, QWEN, strategy="pipeline", nodes=node_ids)
        ready = await wait_state(api, instance, {"ready", "failed"})
        assert ready["state"] == "ready", ready
        assert sorted(s["node_id"] for s in ready["shards"]) == sorted(node_ids)
        spans = sorted(tuple(s["layers"]) for s in ready["shards"])
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        expected = reference(model_dirs[QWEN])
        assert await greedy(cluster, QWEN, stream=False) == expected
        assert await greedy(cluster, QWEN, stream=True) == expected
        assert QWEN in [m["id"] for m in (await api.get("/v1/models")).json()["data"]]
        assert len(runners(homes)) == size
        await stop(api, instance, homes)
    finally:
        for n in node_ids:
            cluster.stop(f"node-{n}")


async def test_tensor_parallel_matches_mlx_lm(
    cluster: Cluster, api: httpx.AsyncClient, model_dirs: dict[str, Path]
) -> None:
    node_ids = [f"t2-{i}-{id(api) % 10000}" for i in range(2)]
    homes = await start_nodes(cluster, api, node_ids)
    try:
        instance = await serve(api, TINY, strategy="tensor", nodes=node_ids)
        ready = await wait_state(api, instance, {"ready", "failed"})
        assert ready["state"] == "ready" and ready["strategy"] == "tensor", ready
        assert await greedy(cluster, TINY, stream=True) == reference(model_dirs[TINY])
        await stop(api, instance, homes)
    finally:
        for n in node_ids:
            cluster.stop(f"node-{n}")


async def test_node_killed_instance_heals_on_the_rest(
    cluster: Cluster, api: httpx.AsyncClient, model_dirs: dict[str, Path]
) -> None:
    node_ids = [f"k3-{i}-{id(api) % 10000}" for i in range(3)]
    homes = await start_nodes(cluster, api, node_ids)
    try:
        instance = await serve(api, QWEN, nodes=node_ids)  # on recovery: those of them still online
        assert (await wait_state(api, instance, {"ready", "failed"}))["state"] == "ready"
        victim = node_ids[1]
        cluster.signal(f"node-{victim}", signal.SIGKILL)
        await wait_state(api, instance, {"recovering"}, timeout=30)
        healed = await wait_state(api, instance, {"ready", "failed"}, timeout=120)
        assert healed["state"] == "ready" and healed["recoveries"] == 1, healed
        assert victim not in [s["node_id"] for s in healed["shards"]] and len(healed["shards"]) == 2
        assert await greedy(cluster, QWEN, stream=False) == reference(model_dirs[QWEN])
        await asyncio.sleep(1)
        assert runners([homes[1]]) == []  # the dead node's runner went with it
        await stop(api, instance, homes)
    finally:
        for n in node_ids:
            cluster.stop(f"node-{n}")


async def test_refusals(cluster: Cluster, api: httpx.AsyncClient) -> None:
    node_id = f"small-{id(api) % 10000}"
    await start_nodes(cluster, api, [node_id], SHARDLINE_NODE_MEMORY=str(64 * 1024))
    try:
        instance = await serve(api, QWEN, nodes=[node_id])
        failed = await wait_state(api, instance, {"failed", "ready"}, timeout=60)
        assert failed["state"] == "failed" and "does not fit" in failed["reason"], failed
    finally:
        cluster.stop(f"node-{node_id}")
    missing = await api.post("/v1/chat/completions", json={"model": "org/not-served", "messages": MESSAGES})
    assert missing.status_code == 404 and "not served" in missing.json()["error"]["message"]
    malformed: list[dict[str, Any]] = [
        {"model": QWEN},
        {"model": QWEN, "messages": []},
        {"model": QWEN, "messages": MESSAGES, "temperature": 9},
        {"messages": MESSAGES},
        {"model": QWEN, "messages": [{"role": "wizard", "content": "x"}]},
    ]
    for bad in malformed:
        response = await api.post("/v1/chat/completions", json=bad)
        assert response.status_code == 422, (bad, response.text)
    assert (await api.post("/instances", json={"model": "a/b/c"})).status_code == 422
    assert (await api.post("/instances", json={"model": QWEN, "strategy": "diagonal"})).status_code == 422
