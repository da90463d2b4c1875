"""Downloads onto real node workers from a real hub mirror, driven through the HTTP API."""

import json

import httpx
import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from shardline.ids import delete_workflow_id
from shardline.types import LayerRange
from tests.conftest import CHUNKY, TINY, Cluster
from tests.support.processes import fetch_processes
from tests.support.relay import Relay
from tests.support.waits import (
    eventually,
    node_state,
    start_download,
    start_download_workflow,
    wait_download,
    wait_node,
    wait_progress,
)
from workflows.download import DownloadInput

pytestmark = pytest.mark.slow(16)  # seconds in make test: tests/conftest.py starts the longest files first


async def test_download_completes_and_repeat_fetches_nothing(
    cluster: Cluster, api: httpx.AsyncClient, node_id: str
) -> None:
    home = cluster.start_node(node_id)
    await wait_node(api, node_id, "online")
    workflow_id = await start_download(api, TINY, node_id)
    assert workflow_id == f"download:{node_id}:{TINY}"

    first = await wait_download(api, workflow_id)
    assert first["state"] == "completed", first
    model_dir = home / "models" / "test-org" / "tiny"
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= {p.name for p in model_dir.iterdir()}
    weights = sorted(p.name for p in model_dir.glob("*.safetensors"))
    assert len(weights) == 3 and first["result"]["bytes_fetched"] == first["result"]["bytes_total"] > 0
    mtimes = {p: p.stat().st_mtime_ns for p in model_dir.glob("*.safetensors")}

    again = await wait_download(api, await start_download(api, TINY, node_id))
    assert again["state"] == "completed" and again["result"]["bytes_fetched"] == 0
    assert mtimes == {p: p.stat().st_mtime_ns for p in model_dir.glob("*.safetensors")}

    async def listed() -> bool:
        nodes = (await api.get("/nodes")).json()
        return TINY in next(n for n in nodes if n["node_id"] == node_id)["models"]

    await eventually(listed, 15, "the node reports the model on disk")
    listing = (await api.get("/downloads", params={"node": node_id})).json()
    assert [d["workflow_id"] for d in listing] == [workflow_id, workflow_id]  # two runs, one id


async def test_layer_range_fetches_only_that_range(
    cluster: Cluster, client: Client, api: httpx.AsyncClient, node_id: str
) -> None:
    home = cluster.start_node(node_id)
    await wait_node(api, node_id, "online")
    inp = DownloadInput(node_id, TINY, layers=LayerRange(0, 1), node_wait_s=10, heartbeat_timeout_s=3)
    result = await (await start_download_workflow(client, inp)).result()
    model_dir = home / "models" / "test-org" / "tiny"
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {f for t, f in index.items() if ".layers." not in t or ".layers.0." in t}
    on_disk = {p.name for p in model_dir.glob("*.safetensors")}
    assert on_disk == needed and len(on_disk) < len(set(index.values()))
    assert sorted(f for f in result.files if f.endswith(".safetensors")) == sorted(needed)


async def test_missing_repo_fails_at_once(
    cluster: Cluster, client: Client, api: httpx.AsyncClient, node_id: str
) -> None:
    cluster.start_node(node_id)
    await wait_node(api, node_id, "online")
    workflow_id = await start_download(api, "test-org/no-such-model", node_id)
    d = await wait_download(api, workflow_id, timeout=30)
    assert d["state"] == "failed" and d["error_type"] == "not_found" and "not found" in d["reason"], d
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    started = [e for e in history.events if e.HasField("activity_task_started_event_attributes")]
    assert len(started) == 1 and started[0].activity_task_started_event_attributes.attempt == 1


async def test_bad_input_is_refused_and_starts_nothing(cluster: Cluster, api: httpx.AsyncClient, node_id: str) -> None:
    cluster.start_node(node_id)
    await wait_node(api, node_id, "online")
    for bad in ["..", "org/..", "a//b", "has space/x", "a/b/c", "", "org/-x", "../etc"]:
        response = await api.post("/downloads", json={"model": bad, "node_id": node_id})
        assert response.status_code == 422 and response.json()["error"]["type"] == "bad_input", (bad, response.text)
        assert "invalid model id" in response.json()["error"]["message"]
    unknown = await api.post("/downloads", json={"model": TINY, "node_id": "ghost-node"})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found", unknown.text
    assert "unknown" in unknown.json()["error"]["message"]
    assert (await api.post("/downloads", json={"node_id": node_id})).status_code == 422
    assert (await api.get("/downloads", params={"node": node_id})).json() == []
    assert (await api.get("/downloads/not-a-download")).status_code == 422
    none = await api.get(f"/downloads/download:{node_id}:org/none")
    assert none.status_code == 404 and none.json()["error"]["type"] == "not_found"


async def test_cancel_stops_transfer(cluster: Cluster, api: httpx.AsyncClient, slow_link: Relay, node_id: str) -> None:
    home = cluster.start_node(node_id, hub=slow_link.endpoint)
    await wait_node(api, node_id, "online")
    with slow_link.capped(2**20):  # ~25 s of transfer: the cancel lands well before its end
        workflow_id = await start_download(api, CHUNKY, node_id)
        seen = await wait_progress(api, workflow_id)
        progress = seen["progress"]
        assert progress["bytes_total"] > progress["bytes_done"] > 0 and progress["files_total"] >= 5
        assert fetch_processes(str(home)), "a fetch child is transferring"

        response = await api.delete(f"/downloads/{workflow_id}")
        assert response.status_code == 202
        d = await wait_download(api, workflow_id, timeout=20)
    assert d["state"] == "canceled" and d["status"] == "CANCELED" and d["error_type"] == "canceled"
    assert fetch_processes(str(home)) == []
    assert await node_state(api, node_id) == "online"
    again = await api.delete(f"/downloads/{workflow_id}")
    assert again.status_code == 200 and again.json()["state"] == "canceled"


async def test_delete_twice_and_odd_directory(
    cluster: Cluster, client: Client, api: httpx.AsyncClient, node_id: str
) -> None:
    home = cluster.start_node(node_id)
    await wait_node(api, node_id, "online")
    assert (await wait_download(api, await start_download(api, TINY, node_id)))["state"] == "completed"

    first = (await api.delete(f"/nodes/{node_id}/models/{TINY}")).json()
    assert first["state"] == "completed" and first["result"]["removed"] and first["result"]["bytes_freed"] > 0
    assert not (home / "models" / "test-org" / "tiny").exists()
    second = (await api.delete(f"/nodes/{node_id}/models/{TINY}")).json()
    assert second["state"] == "completed" and second["result"] == {"removed": False, "bytes_freed": 0}

    outside = home.parent / f"{node_id}-elsewhere"
    outside.mkdir()
    (outside / "keep.txt").write_text("not shardline's")
    (home / "models" / "odd").mkdir(parents=True)
    (home / "models" / "odd" / "model").symlink_to(outside)
    odd = await api.delete(f"/nodes/{node_id}/models/odd/model")
    assert odd.status_code == 409 and odd.json()["error"]["type"] == "conflict", odd.text
    assert "refusing to delete" in odd.json()["error"]["message"]
    assert (outside / "keep.txt").exists()
    assert cluster.procs[f"node-{node_id}"].poll() is None
    assert await node_state(api, node_id) == "online"
    status = (await client.get_workflow_handle(delete_workflow_id(node_id, "odd/model")).describe()).status
    assert status == WorkflowExecutionStatus.FAILED
