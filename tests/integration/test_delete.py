"""Delete is safe: it removes exactly one model's directory, and never one a running download or instance uses."""

import uuid

import httpx
from temporalio.client import Client, WorkflowFailureError

from shardline.errors import ErrorType, error_type
from shardline.ids import CONTROL_QUEUE
from tests.conftest import CHUNKY, TINY, Cluster
from tests.support.relay import Relay
from tests.support.serving import served
from tests.support.waits import start_download, wait_download, wait_node, wait_progress
from workflows.delete import DeleteInput, DeleteModelWorkflow


async def test_one_part_or_other_case_id_deletes_nothing(
    cluster: Cluster, api: httpx.AsyncClient, node_id: str
) -> None:
    home = cluster.start_node(node_id)
    await wait_node(api, node_id, "online")
    assert (await wait_download(api, await start_download(api, TINY, node_id)))["state"] == "completed"
    model_dir = home / "models" / "test-org" / "tiny"

    org = await api.delete(f"/nodes/{node_id}/models/test-org")  # the org's directory, holding every model of it
    assert org.status_code == 422 and org.json()["error"]["type"] == "bad_input", org.text
    assert "expected 'org/name'" in org.json()["error"]["message"]
    upper = await api.delete(f"/nodes/{node_id}/models/{TINY.upper()}")  # one directory on a case-insensitive disk
    assert upper.status_code == 409 and upper.json()["error"]["type"] == "conflict", upper.text
    assert f"use {TINY}" in upper.json()["error"]["message"]
    assert (model_dir / "config.json").exists()
    assert (await api.delete(f"/nodes/{node_id}/models/{TINY}")).json()["result"]["removed"]


async def test_delete_during_a_download_is_refused_unless_forced(
    cluster: Cluster, client: Client, api: httpx.AsyncClient, slow_link: Relay, node_id: str
) -> None:
    cluster.start_node(node_id, hub=slow_link.endpoint)
    await wait_node(api, node_id, "online")
    with slow_link.capped(2**20):  # ~25 s of transfer: every delete below lands while it runs
        download_id = await start_download(api, CHUNKY, node_id)
        await wait_progress(api, download_id)

        refused = await api.delete(f"/nodes/{node_id}/models/{CHUNKY}")
        assert refused.status_code == 409 and refused.json()["error"]["type"] == "in_use", refused.text
        assert f"in use by {download_id}" in refused.json()["error"]["message"]
        assert (await api.get(f"/downloads/{download_id}")).json()["state"] == "running"

        # started on Temporal directly (as `temporal workflow start` would), past the API: refused too
        direct = await client.start_workflow(
            DeleteModelWorkflow.run,
            DeleteInput(node_id, CHUNKY),
            id=f"delete-direct-{uuid.uuid4().hex[:6]}",
            task_queue=CONTROL_QUEUE,
        )
        try:
            await direct.result()
            raise AssertionError("a delete during a download succeeded")
        except WorkflowFailureError as err:
            assert error_type(err) == ErrorType.IN_USE
            assert f"in use by {download_id}" in str(getattr(err.cause, "message", err.cause))

        forced = await api.delete(f"/nodes/{node_id}/models/{CHUNKY}", params={"force": "true"})
        assert forced.status_code == 200, forced.text
        assert forced.json()["workflow_id"] == f"delete:{node_id}:{CHUNKY}"
        assert (await api.delete(f"/downloads/{download_id}")).status_code in (200, 202)
        assert (await wait_download(api, download_id, timeout=30))["state"] in ("canceled", "failed")


async def test_delete_of_a_served_model_is_refused(cluster: Cluster, api: httpx.AsyncClient) -> None:
    node_id = f"d{uuid.uuid4().hex[:8]}"
    async with served(cluster, TINY, [node_id]) as instance_id:
        refused = await api.delete(f"/nodes/{node_id}/models/{TINY}")
        assert refused.status_code == 409 and refused.json()["error"]["type"] == "in_use", refused.text
        assert f"in use by serve:{instance_id}" in refused.json()["error"]["message"]
        assert (await api.get(f"/instances/{instance_id}")).json()["state"] == "ready"
