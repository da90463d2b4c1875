"""Serving through the whole stack: ServingWorkflow, run_shard on node workers, MLX runners, the OpenAI API."""

import asyncio
import itertools
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import QWEN, TINY, Cluster
from tests.support.hub_mirror import HubMirror, publish_model
from tests.support.model_factory import make_tiny_model
from tests.support.serving import (
    MESSAGES,
    greedy,
    metric,
    reference,
    runners,
    running_nodes,
    start_instance,
    start_nodes,
    stop,
    wait_state,
)
from tests.support.waits import eventually

pytestmark = pytest.mark.slow(54)  # seconds in make test: tests/conftest.py starts the longest files first


@pytest.mark.parametrize("size", [2, 3])
async def test_pipeline_matches_mlx_lm(
    cluster: Cluster, api: httpx.AsyncClient, model_dirs: dict[str, Path], size: int
) -> None:
    node_ids = [f"p{size}-{i}-{id(api) % 10000}" for i in range(size)]
    # speculative decoding for every request, the same greedy text: on 2 nodes, drafts by a draft model (another
    # model with the same tokenizer, downloaded whole onto rank 0's node as any model); on 3, by prompt lookup
    speculative = {"method": "prompt_lookup", "num_draft_tokens": 4}
    if size == 2:
        speculative |= {"method": "draft_model", "draft_model": TINY}
    async with running_nodes(cluster, api, node_ids) as homes:
        if size == 2:  # the preview counts the draft model's weights on rank 0's node
            asked = {"model": QWEN, "strategy": "pipeline", "nodes": node_ids}
            plain, drafting = [(await api.post("/instances/preview", json=body)).json()
                               for body in (asked, {**asked, "speculative": speculative})]  # fmt: skip
            extra = [b["bytes"] - a["bytes"] for a, b in zip(plain["shards"], drafting["shards"], strict=True)]
            assert extra[0] > 0 and extra[1:] == [0] and "draft model" in drafting["reason"], drafting
        instance = await start_instance(api, QWEN, strategy="pipeline", nodes=node_ids, speculative=speculative)
        ready = await wait_state(api, instance, {"ready", "failed"})
        assert ready["state"] == "ready", ready["reason"]
        assert ready["speculative"] == {**speculative, "max_batch": 4}  # 4: the default
        if size == 2:
            first = next(s["node_id"] for s in ready["shards"] if s["rank"] == 0)
            held = {n["node_id"]: n["models"] for n in (await api.get("/nodes")).json()}
            assert TINY in held[first] and not any(TINY in held[n] for n in node_ids if n != first), held
            refused = await api.delete(f"/nodes/{first}/models/{TINY}")  # the instance drafts with it there
            assert refused.status_code == 409 and f"in use by serve:{instance}" in refused.text, refused.text
        assert sorted(s["node_id"] for s in ready["shards"]) == sorted(node_ids)
        spans = sorted(tuple(s["layers"]) for s in ready["shards"])
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        expected = reference(model_dirs[QWEN])
        assert await greedy(cluster, QWEN, stream=False) == expected
        assert await greedy(cluster, QWEN, stream=True) == expected
        # an unrelated draft model's drafts are offered and checked, rarely accepted; prompt lookup's are
        counted = "shardline_runner_draft_tokens" if size == 2 else "shardline_runner_accepted_draft_tokens"
        assert (await metric(api, counted))[instance] > 0
        assert QWEN in [m["id"] for m in (await api.get("/v1/models")).json()["data"]]
        assert len(runners(homes)) == size
        await stop(api, instance, homes)


async def test_tensor_parallel_matches_mlx_lm(
    cluster: Cluster, api: httpx.AsyncClient, model_dirs: dict[str, Path]
) -> None:
    node_ids = [f"t2-{i}-{id(api) % 10000}" for i in range(2)]
    async with running_nodes(cluster, api, node_ids) as homes:
        instance = await start_instance(api, TINY, strategy="tensor", nodes=node_ids)
        ready = await wait_state(api, instance, {"ready", "failed"})
        assert ready["state"] == "ready" and ready["strategy"] == "tensor", ready
        assert await greedy(cluster, TINY, stream=True) == reference(model_dirs[TINY])
        await stop(api, instance, homes)


async def test_node_killed_instance_heals_on_the_rest(
    cluster: Cluster, api: httpx.AsyncClient, model_dirs: dict[str, Path]
) -> None:
    node_ids = [f"k3-{i}-{id(api) % 10000}" for i in range(3)]
    async with running_nodes(cluster, api, node_ids) as homes:
        instance = await start_instance(api, QWEN, nodes=node_ids)  # on recovery: those of them still online
        assert (await wait_state(api, instance, {"ready", "failed"}))["state"] == "ready"
        victim = node_ids[1]
        cluster.signal(f"node-{victim}", signal.SIGKILL)
        await wait_state(api, instance, {"recovering"}, timeout=30)
        healed = await wait_state(api, instance, {"ready", "failed"}, timeout=120)
        incidents = healed["incidents"]
        assert healed["state"] == "ready" and f"node {victim} unavailable" in incidents[0], incidents
        # never placed on the dead node again; a second recovery for another reason was seen once in CI on
        # 2 busy cores, before incidents were recorded (ring ports then overlapped the ephemeral range)
        assert not any(victim in i for i in incidents[1:]), incidents
        print("recoveries:", incidents)
        assert victim not in [s["node_id"] for s in healed["shards"]] and len(healed["shards"]) == 2
        assert await greedy(cluster, QWEN, stream=False) == reference(model_dirs[QWEN])
        await asyncio.sleep(1)
        assert runners([homes[1]]) == []  # the dead node's runner went with it
        await stop(api, instance, homes)


async def test_refusals(cluster: Cluster, api: httpx.AsyncClient) -> None:
    node_id = f"small-{id(api) % 10000}"
    async with running_nodes(cluster, api, [node_id], SHARDLINE_NODE_MEMORY=str(64 * 1024)):
        instance = await start_instance(api, QWEN, nodes=[node_id])
        failed = await wait_state(api, instance, {"failed", "ready"}, timeout=60)
        assert failed["state"] == "failed" and failed["error_type"] == "placement", failed
        assert "does not fit" in failed["reason"], failed
    missing = await api.post("/v1/chat/completions", json={"model": "org/not-served", "messages": MESSAGES})
    assert missing.status_code == 404 and "not served" in missing.json()["error"]["message"]
    malformed: list[dict[str, Any]] = [
        {"model": QWEN},
        {"model": QWEN, "messages": []},
        {"model": QWEN, "messages": MESSAGES, "temperature": 9},
        {"messages": MESSAGES},
        {"model": QWEN, "messages": [{"role": "wizard", "content": "x"}]},
    ]
    for bad in malformed:  # OpenAI's status for a request it cannot take is 400, and so is ours under /v1
        response = await api.post("/v1/chat/completions", json=bad)
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert (await api.post("/instances", json={"model": "a/b/c"})).status_code == 422
    assert (await api.post("/instances", json={"model": QWEN, "strategy": "diagonal"})).status_code == 422
    for speculative in (
        {"method": "draft_model"},
        {"draft_model": TINY},
        {"method": "draft_model", "draft_model": "x"},
    ):
        response = await api.post("/instances", json={"model": QWEN, "speculative": speculative})
        assert response.status_code == 422 and "draft_model" in response.text, (speculative, response.text)


async def test_runner_crash_is_a_503_then_heals_on_the_same_node(
    cluster: Cluster, api: httpx.AsyncClient, model_dirs: dict[str, Path], node_id: str
) -> None:
    (home,) = await start_nodes(cluster, api, [node_id])
    instance = await start_instance(api, TINY, nodes=[node_id])
    ready = await wait_state(api, instance, {"ready", "failed"})
    assert ready["state"] == "ready", ready["reason"]
    (runner,) = runners([home])
    cluster.signal(f"node-{node_id}", signal.SIGSTOP)  # so that, for a moment, nobody has told Temporal yet
    try:
        runner.kill()  # a zombie until its stopped parent reaps it, but its sockets are closed
        await asyncio.sleep(0.2)  # short: the frozen node's activity heartbeat (every 2 s, 3 s timeout) must not lapse
        for stream in (True, False):  # streamed too: refused with a status, not a 200 cut short
            body = {"model": TINY, "messages": MESSAGES, "stream": stream}
            response = await api.post("/v1/chat/completions", json=body)
            assert response.status_code == 503 and "unreachable" in response.text, response.text
    finally:
        cluster.signal(f"node-{node_id}", signal.SIGCONT)

    async def recovered() -> dict[str, Any] | None:  # until then it may still say ready: nobody has told it
        current: dict[str, Any] = (await api.get(f"/instances/{instance}")).json()
        return current if current["recoveries"] and current["state"] in ("ready", "failed") else None

    healed = await eventually(recovered, 120, f"{instance} recovers")
    assert healed["state"] == "ready" and healed["recoveries"] == 1, healed["incidents"]
    assert "runner 0" in healed["incidents"][0] and "exited" in healed["incidents"][0], healed["incidents"]
    assert await greedy(cluster, TINY, stream=True) == reference(model_dirs[TINY])
    await stop(api, instance, [home])


async def test_a_model_mlx_refuses_fails_at_once(
    cluster: Cluster, api: httpx.AsyncClient, hub: HubMirror, tmp_path: Path, node_id: str
) -> None:
    # head_dim 9: it loads, and MLX's RoPE refuses to run it (so does transformers' config check, later)
    odd = make_tiny_model(tmp_path / "odd", hidden_size=36, num_heads=4, num_kv_heads=2, num_files=2)
    publish_model(odd, hub.mirrors_root, "test-org/odd-heads")
    (home,) = await start_nodes(cluster, api, [node_id])
    started = time.monotonic()
    instance = await start_instance(api, "test-org/odd-heads", nodes=[node_id])
    failed = await wait_state(api, instance, {"failed", "ready"}, timeout=60)
    took = time.monotonic() - started
    print(f"failed after {took:.1f} s")
    assert failed["state"] == "failed" and failed["error_type"] == "bad_input", failed
    assert "[rope] dims must be even" in failed["reason"] and node_id in failed["reason"], failed["reason"]
    assert failed["recoveries"] == 0 and failed["incidents"] == [], failed
    assert took < 60, took  # it was 3 recoveries, about 100 s (40 s seen beside a full suite)
    assert runners([home]) == []
    # a draft model that cannot draft for the model (another tokenizer) fails likewise, naming it
    other = make_tiny_model(tmp_path / "other-vocabulary", vocab_size=300, num_layers=1, num_files=1)
    publish_model(other, hub.mirrors_root, "test-org/other-vocabulary")
    speculative = {"method": "draft_model", "draft_model": "test-org/other-vocabulary"}
    instance = await start_instance(api, TINY, nodes=[node_id], speculative=speculative)
    failed = await wait_state(api, instance, {"failed", "ready"}, timeout=60)
    assert failed["state"] == "failed" and failed["error_type"] == "bad_input", failed
    assert "draft model" in failed["reason"] and "another vocabulary" in failed["reason"], failed["reason"]
    assert failed["recoveries"] == 0 and runners([home]) == []
