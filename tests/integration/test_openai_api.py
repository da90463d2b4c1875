"""The OpenAI-compatible API on one served instance: sampling, stop strings, concurrency, disconnects, CLI."""

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI, BadRequestError

from tests.conftest import QWEN, Cluster
from tests.support.serving import MESSAGES, reference, served

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow(22)]


@pytest.fixture(scope="module")
async def instance(cluster: Cluster) -> AsyncIterator[str]:
    """QWEN served as a 2-node pipeline for the whole module."""
    async with served(cluster, QWEN, ["api-a", "api-b"]) as instance_id:
        yield instance_id


def client(cluster: Cluster) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{cluster.api}/v1", api_key="unused", max_retries=0)


async def ask(cluster: Cluster, **kw: Any) -> Any:
    body = {"model": QWEN, "messages": MESSAGES, "max_tokens": 12, **kw}
    return await client(cluster).chat.completions.create(**body)


async def test_stop_string_ends_early(cluster: Cluster, instance: str, model_dirs: dict[str, Path]) -> None:
    full = reference(model_dirs[QWEN])
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), "the reference text has a usable middle"
    reply = await ask(cluster, temperature=0, stop=[stop])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == full[: full.index(stop)]


async def test_seed_makes_sampling_repeatable(cluster: Cluster, instance: str) -> None:
    first = await ask(cluster, temperature=1.0, top_p=0.9, seed=1234)
    second = await ask(cluster, temperature=1.0, top_p=0.9, seed=1234)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.usage.prompt_tokens > 0 and first.usage.total_tokens == first.usage.prompt_tokens + 12


async def test_64_concurrent_requests_are_not_mixed_up(
    cluster: Cluster, instance: str, model_dirs: dict[str, Path]
) -> None:
    expected = reference(model_dirs[QWEN])
    short = reference(model_dirs[QWEN], max_tokens=5)
    replies = await asyncio.gather(*(ask(cluster, temperature=0, max_tokens=12 if i % 2 else 5) for i in range(64)))
    for i, reply in enumerate(replies):
        assert reply.choices[0].message.content == (expected if i % 2 else short), i


async def test_disconnected_client_frees_the_instance(
    cluster: Cluster, instance: str, model_dirs: dict[str, Path]
) -> None:
    body = {"model": QWEN, "messages": MESSAGES, "max_tokens": 4000, "temperature": 0, "stream": True}
    async with (
        httpx.AsyncClient(base_url=cluster.api, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        chunks = 0
        async for line in response.aiter_lines():
            chunks += line.startswith("data: ")
            if chunks >= 3:
                break  # hang up with ~4000 tokens still to go
    reply = await ask(cluster, temperature=0)
    assert reply.choices[0].message.content == reference(model_dirs[QWEN])
    (rank0_log,) = cluster.root.glob(f"nodes/*/runs/{instance}/rank0-*.log")
    done = [json.loads(line) for line in rank0_log.read_text().splitlines() if '"request.done"' in line]
    cancelled = [d for d in done if d["finish_reason"] == "cancelled"]
    assert len(cancelled) == 1 and cancelled[0]["completion_tokens"] < 1000, cancelled


async def test_sse_wire_format_and_usage(cluster: Cluster, instance: str) -> None:
    body = {"model": QWEN, "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    async with httpx.AsyncClient(base_url=cluster.api, timeout=60) as http:
        response = await http.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert '"usage": {"prompt_tokens"' in events[-2] and '"completion_tokens": 6' in events[-2]
    assert '"finish_reason": "length"' in events[-3]


async def test_second_turn_reuses_the_first_on_every_rank(
    cluster: Cluster, instance: str, model_dirs: dict[str, Path]
) -> None:
    system = {"role": "system", "content": " ".join(["A cluster keeps its state in durable workflows."] * 20)}
    first_turn = [system, {"role": "user", "content": "Hello there!"}]
    one = await ask(cluster, messages=first_turn, temperature=0)
    conversation = [*first_turn, {"role": "assistant", "content": one.choices[0].message.content},
                    {"role": "user", "content": "And then?"}]  # fmt: skip
    two = await ask(cluster, messages=conversation, temperature=0)
    assert two.usage.prompt_tokens_details.cached_tokens >= one.usage.prompt_tokens
    # the same text as plain mlx_lm computing the whole conversation
    assert two.choices[0].message.content == reference(model_dirs[QWEN], messages=conversation)


async def test_a_prompt_past_the_context_is_refused_and_the_instance_serves_on(
    cluster: Cluster, instance: str, model_dirs: dict[str, Path]
) -> None:
    with pytest.raises(BadRequestError) as refused:
        await ask(cluster, messages=[{"role": "user", "content": "river " * 5000}])
    assert "context is 4096" in str(refused.value)
    reply = await ask(cluster, temperature=0)
    assert reply.choices[0].message.content == reference(model_dirs[QWEN])
    async with httpx.AsyncClient(base_url=cluster.api, timeout=60) as http:
        status = (await http.get(f"/instances/{instance}")).json()
    assert status["state"] == "ready" and status["recoveries"] == 0


async def test_cli_serve_lists_chats_and_stops(cluster: Cluster, instance: str, model_dirs: dict[str, Path]) -> None:
    env = cluster.env(SHARDLINE_API_URL=cluster.api, COLUMNS="200")

    def shardline(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shardline", *args], env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip

    listed = shardline("instances")
    assert instance in listed.stdout and "ready" in listed.stdout
    chat = shardline("chat", QWEN, MESSAGES[0]["content"], "--max-tokens", "12")
    assert chat.returncode == 0 and chat.stdout.strip() == reference(model_dirs[QWEN]).strip()
    missing = shardline("chat", "org/not-served", "hi")
    assert missing.returncode == 1 and "not served" in missing.stdout
