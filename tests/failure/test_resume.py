"""No generation lost to a failure: a stream whose runner is lost (killed, its node killed or frozen) goes on
where the instance is ready next, and its client sees one stream equal to an undisturbed run."""

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import psutil
import pytest
from anthropic import AsyncAnthropic
from ollama import AsyncClient as Ollama
from openai import APIError, AsyncOpenAI

from tests.conftest import QWEN, TINY, Cluster
from tests.support.processes import free_port, wait_http
from tests.support.serving import MESSAGES, runners, running_nodes, start_instance, stop, wait_state
from tests.support.streams import CUT_AT, LONG, REQUESTS, Streamed, same, stream, streams
from tests.support.waits import eventually

pytestmark = pytest.mark.slow(89)


async def anthropic_stream(cluster: Cluster, model: str, at: asyncio.Barrier | None, tokens: int) -> Streamed:
    client = AsyncAnthropic(base_url=cluster.api, api_key="unused", max_retries=0, timeout=300)
    out = Streamed()
    async with client.messages.stream(
        model=model, max_tokens=LONG, messages=MESSAGES, extra_body={"temperature": 0}
    ) as events:  # type: ignore[arg-type]
        async for text in events.text_stream:
            out.text += text
            out.chunks += 1
            if at is not None and out.chunks == CUT_AT:
                await at.wait()
        final = await events.get_final_message()
    out.ids, out.finish, out.completion_tokens = {final.id}, final.stop_reason, final.usage.output_tokens
    return out


async def ollama_stream(cluster: Cluster, model: str, at: asyncio.Barrier | None, tokens: int) -> Streamed:
    out = Streamed()
    async for part in await Ollama(host=cluster.api).chat(
        model=model, messages=MESSAGES, stream=True, options={"temperature": 0, "num_predict": tokens}
    ):
        out.text += part.message.content or ""
        out.chunks += 1
        if part.done:
            out.ids, out.finish, out.completion_tokens = {"ollama"}, part.done_reason, part.eval_count or 0
        if at is not None and out.chunks == CUT_AT:
            await at.wait()
    return out


async def unstreamed(cluster: Cluster, model: str, tokens: int) -> Streamed:
    openai = AsyncOpenAI(base_url=f"{cluster.api}/v1", api_key="unused", max_retries=0, timeout=300)
    reply = await openai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=tokens, temperature=0)  # type: ignore[arg-type]
    usage = reply.usage.completion_tokens if reply.usage else 0
    return Streamed(reply.choices[0].message.content or "", 0, {reply.id}, reply.choices[0].finish_reason, usage)


async def every_api(cluster: Cluster, model: str, at: asyncio.Barrier | None = None) -> list[Streamed]:
    tokens = 2 * LONG  # a small model on one rank is quick: longer streams, for the kill to land mid-stream
    """REQUESTS through OpenAI's chat streams, and one request each through Anthropic's and Ollama's streams and a
    non-streamed chat (it is on its way when the others have CUT_AT chunks)."""
    return list(await asyncio.gather(
        *(stream(cluster, model, at, tokens, **r) for r in REQUESTS), anthropic_stream(cluster, model, at, tokens),
        ollama_stream(cluster, model, at, tokens), unstreamed(cluster, model, tokens),
    ))  # fmt: skip


def resumed_count(text: str, model: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'shardline_resumed_requests_total{{model="{model}"}}'):
            return float(line.split()[-1])
    return 0.0


async def carried_over(api: httpx.AsyncClient, instance: str, count: int) -> dict[str, Any]:
    """The instance once it says it had `count` generations carried over (the API tells it in the background)."""

    async def told() -> dict[str, Any] | None:
        now: dict[str, Any] = (await api.get(f"/instances/{instance}")).json()
        return now if now["carried_over"] >= count else None

    found = await eventually(told, 30, f"{instance} counts {count} carried over")
    assert found["carried_over"] == count, found
    return found


def freeze(proc: psutil.Process, sig: signal.Signals) -> list[psutil.Process]:
    """`sig` to a node worker and every process under it (its runners): the whole node, frozen or thawed."""
    family = [proc, *proc.children(recursive=True)]
    for p in family:
        p.send_signal(sig)
    return family


async def test_streams_outlive_a_runner_killed_mid_stream(cluster: Cluster, api: httpx.AsyncClient) -> None:
    node_id = f"resume-one-{id(api) % 10000}"
    async with running_nodes(cluster, api, [node_id]) as homes:
        instance = await start_instance(api, TINY, nodes=[node_id])
        assert (await wait_state(api, instance, {"ready", "failed"}))["state"] == "ready"
        expected = await every_api(cluster, TINY)
        before = resumed_count((await api.get("/metrics")).text, TINY)

        (runner,) = runners(homes)  # found first: a scan of every process after the barrier can take a second
        at = asyncio.Barrier(len(REQUESTS) + 3)
        running = asyncio.create_task(every_api(cluster, TINY, at))
        await at.wait()
        runner.kill()
        same(await running, expected)

        healed = await carried_over(api, instance, len(expected))
        assert healed["state"] == "ready" and healed["recoveries"] == 1, healed
        assert resumed_count((await api.get("/metrics")).text, TINY) - before == len(expected)
        await stop(api, instance, homes)


@pytest.mark.parametrize("failure", ["kill", "freeze"])
async def test_streams_outlive_a_pipeline_node(cluster: Cluster, api: httpx.AsyncClient, failure: str) -> None:
    node_ids = [f"resume-{failure}-{i}-{id(api) % 10000}" for i in range(2)]
    async with running_nodes(cluster, api, node_ids) as homes:
        instance = await start_instance(api, QWEN, strategy="pipeline", nodes=node_ids)
        ready = await wait_state(api, instance, {"ready", "failed"})
        assert ready["state"] == "ready" and len(ready["shards"]) == 2, ready
        expected = await streams(cluster, QWEN)

        # killed: the node that does not face the API (rank 0's runner loses its ring peer); frozen: the one that
        # does (the API hears nothing from it, not even its heartbeat)
        by_rank = {s["rank"]: s["node_id"] for s in ready["shards"]}
        victim = by_rank[1] if failure == "kill" else by_rank[0]
        at = asyncio.Barrier(len(REQUESTS) + 1)
        running = asyncio.gather(*(stream(cluster, QWEN, at, **r) for r in REQUESTS))
        await at.wait()
        worker = psutil.Process(cluster.procs[f"node-{victim}"].pid)
        frozen = freeze(worker, signal.SIGKILL if failure == "kill" else signal.SIGSTOP)
        try:
            same(await running, expected)
        finally:
            for p in frozen:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
        healed = await carried_over(api, instance, len(REQUESTS))
        assert healed["state"] == "ready" and victim not in [s["node_id"] for s in healed["shards"]], healed
        await stop(api, instance, [h for n, h in zip(node_ids, homes, strict=True) if n != victim])


async def test_a_resume_gives_up_after_its_bound_and_says_why(cluster: Cluster, api: httpx.AsyncClient) -> None:
    """An API that resumes a generation once: a runner killed twice under one stream. One that waits 5 s for a ready
    instance: a node that does not come back."""
    node_id = f"resume-bound-{id(api) % 10000}"
    async with (
        strict_api(cluster, "once", SHARDLINE_RESUME_ATTEMPTS="1") as once,
        strict_api(cluster, "impatient", SHARDLINE_RESUME_TIMEOUT="5") as impatient,
        running_nodes(cluster, api, [node_id]) as homes,
    ):
        instance = await start_instance(api, TINY, nodes=[node_id])
        assert (await wait_state(api, instance, {"ready", "failed"}))["state"] == "ready"

        async def read(url: str, chunks: list[str], due: Callable[[], None] = lambda: None) -> APIError:
            openai = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
            with pytest.raises(APIError) as failed:
                async for event in await openai.chat.completions.create(
                    model=TINY,
                    messages=MESSAGES,
                    max_tokens=3000,
                    temperature=0,
                    stream=True,  # type: ignore[arg-type]
                ):
                    chunks += [c.delta.content or "" for c in event.choices]
                    due()
            return failed.value

        async def past(chunks: list[str], n: int) -> bool | None:
            return len(chunks) > n or None

        # the runner serving now, and how many chunks had been read when it was first seen: the reader kills it
        # itself once it has CUT_AT chunks more (a tiny model streams 3000 tokens in seconds: a kill from a poll
        # could come after the stream had ended)
        chunks: list[str] = []
        killed: list[int] = []
        serving: dict[str, int] = {}

        async def watch() -> None:
            while True:
                found = [p.pid for p in runners(homes) if p.pid not in killed]
                if found and serving.get("pid") != found[0]:
                    serving.update(pid=found[0], since=len(chunks))
                await asyncio.sleep(0.1)

        def kill_when_due() -> None:
            pid = serving.get("pid")
            if len(killed) < 2 and pid is not None and pid not in killed and len(chunks) >= serving["since"] + CUT_AT:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        async def runner_seen() -> bool | None:
            return bool(serving) or None

        watching = asyncio.create_task(watch())
        try:
            await eventually(runner_seen, 60, "the runner seen")
            failed = await read(once, chunks, kill_when_due)
        finally:
            watching.cancel()
        assert len(killed) == 2 and "was resumed 1 times: given up" in failed.message, (killed, failed.message)

        async def healed_twice() -> bool | None:
            now = (await api.get(f"/instances/{instance}")).json()
            return (now["state"] == "ready" and now["recoveries"] == 2) or None

        await eventually(healed_twice, 120, "ready again")
        node_killed: list[str] = []

        def kill_node_when_due() -> None:  # its runner dies with it; nothing else can serve
            if not node_killed and len(again) >= CUT_AT:
                cluster.signal(f"node-{node_id}", signal.SIGKILL)
                node_killed.append(node_id)

        again: list[str] = []
        failed = await read(impatient, again, kill_node_when_due)
        assert node_killed, "the stream ended before its node was killed"
        assert "after 5 s" in failed.message and "not ready" in failed.message, failed.message
        # stopping it waits out its dead node's runner (seen: over 60 s on 2 busy cores)
        await api.delete(f"/instances/{instance}", timeout=300)


@asynccontextmanager
async def strict_api(cluster: Cluster, name: str, **env: str) -> AsyncIterator[str]:
    """Another API process on the same cluster, with settings of its own."""
    port = free_port()
    cluster.spawn(f"api-{name}", [sys.executable, "-m", "shardline", "api"], SHARDLINE_API_PORT=str(port), **env)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        yield f"http://127.0.0.1:{port}"
    finally:
        cluster.stop(f"api-{name}")
