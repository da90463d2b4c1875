"""A node whose disk is, or becomes, too small: the download fails at once with the reason, never retried,
and the node carries on."""

from pathlib import Path

import httpx
import pytest
from temporalio.client import Client

from tests.conftest import CHUNKY, TINY, Cluster
from tests.support.disk import can_mount, fill, small_disk
from tests.support.relay import Relay
from tests.support.serving import running_nodes
from tests.support.waits import scheduled_activities, start_download, wait_download, wait_node, wait_progress

WHY_NOT = can_mount()
pytestmark = [pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or ""), pytest.mark.slow(36)]


def models_disk(cluster: Cluster, node_id: str) -> Path:
    return cluster.node_home(node_id) / "models"


async def test_download_larger_than_the_free_disk_fails_at_once(
    cluster: Cluster, client: Client, api: httpx.AsyncClient, node_id: str
) -> None:
    with small_disk(models_disk(cluster, node_id), "16M"):
        async with running_nodes(cluster, api, [node_id]):
            workflow_id = await start_download(api, TINY, node_id)
            d = await wait_download(api, workflow_id, timeout=30)
            assert d["state"] == "failed" and d["error_type"] == "disk_full", d
            assert d["reason"].startswith(f"disk full: {TINY} needs"), d
            assert await scheduled_activities(client, workflow_id) == ["download_model"]
            await wait_node(api, node_id, "online")  # the node worker lives on


async def test_disk_filled_mid_download_fails_at_once_and_a_new_download_resumes(
    cluster: Cluster, client: Client, api: httpx.AsyncClient, slow_link: Relay, node_id: str
) -> None:
    with small_disk(models_disk(cluster, node_id), "128M") as disk:
        async with running_nodes(cluster, api, [node_id], hub=slow_link.endpoint):
            with slow_link.capped(2**20):  # the disk fills well before the transfer would end
                workflow_id = await start_download(api, CHUNKY, node_id)
                await wait_progress(api, workflow_id, files_done=1)
                filler = disk / "filler"
                fill(filler)  # another program takes the rest of the disk
                d = await wait_download(api, workflow_id, timeout=30)
            assert d["state"] == "failed" and d["error_type"] == "disk_full", d
            assert d["reason"] == f"disk full while fetching {CHUNKY}", d
            assert await scheduled_activities(client, workflow_id) == ["download_model"]
            await wait_node(api, node_id, "online")

            filler.unlink()  # space freed: asking again finishes the job without fetching the finished files
            again = await wait_download(api, await start_download(api, CHUNKY, node_id), timeout=90)
            assert again["state"] == "completed", again
            result = again["result"]
            assert 0 < result["bytes_fetched"] < result["bytes_total"], result
