"""Serving helpers the tests share: start nodes, serve a model, wait for a state, ask it, compare with mlx_lm."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import Cluster
from tests.support.waits import eventually, wait_node

MESSAGES = [{"role": "user", "content": "Tell me about the quiet river"}]
MAX_TOKENS = 12


def reference(model_dir: Path, max_tokens: int = MAX_TOKENS, messages: list[dict[str, Any]] | None = None) -> str:
    """Plain mlx_lm, one process, greedy: what every served instance must say too."""
    from mlx_lm import generate, load

    model, tokenizer = load(str(model_dir))
    prompt = tokenizer.apply_chat_template(messages or MESSAGES, add_generation_prompt=True)
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


@asynccontextmanager
async def running_nodes(
    cluster: Cluster, api: httpx.AsyncClient, node_ids: list[str], **env: str
) -> AsyncIterator[list[Path]]:
    """Node workers for `node_ids`, online, and their homes; stopped when the block ends, however it ends."""
    try:
        yield await start_nodes(cluster, api, node_ids, **env)
    finally:
        for n in node_ids:
            cluster.stop(f"node-{n}")


async def start_instance(api: httpx.AsyncClient, model: str, **body: Any) -> str:
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


@asynccontextmanager
async def served(cluster: Cluster, model: str, node_ids: list[str]) -> AsyncIterator[str]:
    """`model` served on freshly started `node_ids` while the block runs; then stopped, and the nodes too."""
    async with httpx.AsyncClient(base_url=cluster.api, timeout=60) as api, running_nodes(cluster, api, node_ids):
        instance_id = await start_instance(api, model, nodes=node_ids)
        ready = await wait_state(api, instance_id, {"ready", "failed"})
        assert ready["state"] == "ready", ready["reason"]
        yield instance_id
        await api.delete(f"/instances/{instance_id}")


async def metric(http: httpx.AsyncClient, name: str) -> dict[str, float]:
    """One gauge of /metrics, by instance."""
    families = {f.name: f for f in text_string_to_metric_families((await http.get("/metrics")).text)}
    return {s.labels["instance"]: s.value for s in families[name].samples}
