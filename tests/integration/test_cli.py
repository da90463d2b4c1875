"""The `shardline` CLI against a real cluster, as a person would type it."""

import subprocess
import sys

import httpx
import pytest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle

from shardline.ids import download_workflow_id, node_workflow_id, serve_workflow_id
from tests.conftest import CHUNKY, TINY, Cluster
from tests.support.relay import Relay
from tests.support.serving import runners, running_nodes, start_instance, wait_state
from tests.support.waits import eventually, start_download, wait_download, wait_node, wait_progress
from workflows.client import start_delete
from workflows.delete import DeleteInput

pytestmark = pytest.mark.slow(25)  # seconds in make test: tests/conftest.py starts the longest files first


def shardline(cluster: Cluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = cluster.env(SHARDLINE_API_URL=cluster.api, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "shardline", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


async def test_cli_download_list_delete(cluster: Cluster, api: httpx.AsyncClient, node_id: str) -> None:
    cluster.start_node(node_id)
    await wait_node(api, node_id, "online")
    listed = shardline(cluster, "nodes")
    assert listed.returncode == 0 and node_id in listed.stdout and "online" in listed.stdout

    done = shardline(cluster, "download", TINY, "--node", node_id, "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"download:{node_id}:{TINY}: completed" in done.stdout

    downloads = shardline(cluster, "downloads", "--node", node_id)
    assert f"download:{node_id}:{TINY}" in downloads.stdout and "completed" in downloads.stdout

    deleted = shardline(cluster, "delete", TINY, "--node", node_id)
    assert deleted.returncode == 0 and "completed" in deleted.stdout

    bad = shardline(cluster, "download", "a/b/c", "--node", node_id)
    assert bad.returncode == 1 and "invalid model id" in bad.stdout


async def test_cli_cancel(cluster: Cluster, api: httpx.AsyncClient, slow_link: Relay, node_id: str) -> None:
    cluster.start_node(node_id, hub=slow_link.endpoint)
    await wait_node(api, node_id, "online")
    with slow_link.capped(2**20):  # ~25 s of transfer: the CLI's start-up and the cancel land well before its end
        workflow_id = await start_download(api, CHUNKY, node_id)
        await wait_progress(api, workflow_id)
        canceled = shardline(cluster, "cancel", workflow_id)
        assert canceled.returncode == 0, canceled.stdout + canceled.stderr
        assert f"{workflow_id}: canceling" in canceled.stdout
        assert (await wait_download(api, workflow_id, timeout=20))["state"] == "canceled"
    again = shardline(cluster, "cancel", workflow_id)  # over already: nothing to cancel, and it says how it ended
    assert again.returncode == 0 and f"{workflow_id}: canceled" in again.stdout


async def test_cli_cancel_stops_an_instance(cluster: Cluster, api: httpx.AsyncClient, node_id: str) -> None:
    async with running_nodes(cluster, api, [node_id]) as homes:
        instance_id = await start_instance(api, TINY, nodes=[node_id])
        assert (await wait_state(api, instance_id, {"ready", "failed"}))["state"] == "ready"
        canceled = shardline(cluster, "cancel", serve_workflow_id(instance_id))
        assert canceled.returncode == 0, canceled.stdout + canceled.stderr
        assert f"{serve_workflow_id(instance_id)}: stopped" in canceled.stdout
        assert runners(homes) == []  # every runner gone, its memory freed
        assert (await api.get(f"/instances/{instance_id}")).json()["state"] == "stopped"


def test_cli_cancel_of_an_unknown_id_says_so(cluster: Cluster) -> None:
    nowhere = shardline(cluster, "cancel", download_workflow_id("nowhere", TINY))
    assert nowhere.returncode == 1 and "no download" in nowhere.stdout, nowhere.stdout
    ghost = shardline(cluster, "cancel", serve_workflow_id("ghost"))
    assert ghost.returncode == 1 and "no instance ghost" in ghost.stdout, ghost.stdout
    nonsense = shardline(cluster, "cancel", "nonsense")
    assert nonsense.returncode == 1 and "invalid workflow id 'nonsense'" in nonsense.stdout, nonsense.stdout
    node = shardline(cluster, "cancel", node_workflow_id("never-joined"))
    assert node.returncode == 1 and "no workflow node:never-joined" in node.stdout, node.stdout
    other = shardline(cluster, "cancel", "build:42")
    assert other.returncode == 1 and "not a shardline workflow" in other.stdout, other.stdout


async def test_cli_cancels_a_delete_waiting_for_its_node(cluster: Cluster, client: Client, node_id: str) -> None:
    """Any workflow by its id, through the API: a delete for a node that never picks it up ends CANCELED."""
    handle = await start_delete(client, DeleteInput(node_id, TINY, node_wait_s=120, force=True))
    canceled = shardline(cluster, "cancel", handle.id)
    assert canceled.returncode == 0, canceled.stdout + canceled.stderr
    assert f"{handle.id}: canceling" in canceled.stdout
    await eventually(lambda: _canceled(handle), 30, "the delete ends canceled")
    again = shardline(cluster, "cancel", handle.id)  # over already: it says how it ended
    assert again.returncode == 0 and f"{handle.id}: canceled" in again.stdout, again.stdout


async def _canceled(handle: WorkflowHandle) -> bool:
    return (await handle.describe()).status == WorkflowExecutionStatus.CANCELED


def test_cli_without_api_says_so(cluster: Cluster) -> None:
    env = cluster.env(SHARDLINE_API_URL="http://127.0.0.1:9")
    out = subprocess.run([sys.executable, "-m", "shardline", "nodes"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "cannot reach the shardline API" in out.stdout
