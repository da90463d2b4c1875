"""Serving and downloads cooperate, and a hub that stalls or vanishes bounds every attempt: real node workers,
a real hub mirror behind a relay that can slow down, stall or disappear."""

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from temporalio.client import Client

from shardline.ids import download_workflow_id, serve_workflow_id
from shardline.model_files import COMPLETE_MARKER
from shardline.types import DownloadResult, LayerRange
from tests.conftest import CHUNKY, TINY, Cluster
from tests.support.hub_mirror import HubMirror
from tests.support.relay import Relay
from tests.support.serving import start_instance, stop, wait_state
from tests.support.waits import (
    eventually,
    scheduled_activities,
    start_download,
    start_download_workflow,
    wait_download,
    wait_node,
    wait_progress,
)
from workflows.download import DownloadInput

HUB_TIMEOUT = 2

pytestmark = pytest.mark.slow(130)  # seconds in make test: tests/conftest.py starts the longest files first


@pytest.fixture
def link(hub: HubMirror) -> Iterator[Relay]:
    """This test's own way to the hub: it may be slowed, stalled or cut without touching other tests."""
    relay = Relay(int(hub.endpoint.rsplit(":", 1)[1])).start()
    yield relay
    if relay.running:
        relay.stop()


async def models_listed(api: httpx.AsyncClient, node_id: str) -> list[str]:
    nodes = (await api.get("/nodes")).json()
    return list(next(n for n in nodes if n["node_id"] == node_id)["models"])


async def test_stalled_transfer_ends_the_attempt_and_the_next_resumes(
    cluster: Cluster, api: httpx.AsyncClient, link: Relay, node_id: str
) -> None:
    env = {"SHARDLINE_HUB_TIMEOUT": str(HUB_TIMEOUT), "SHARDLINE_DOWNLOAD_ATTEMPTS": "1"}
    cluster.start_node(node_id, hub=link.endpoint, **env)
    await wait_node(api, node_id, "online")
    with link.capped(2**20):
        workflow_id = await start_download(api, CHUNKY, node_id)
        await wait_progress(api, workflow_id)
        with link.stall():  # the hub keeps every connection open and sends nothing more
            stalled_at = time.monotonic()
            failed = await wait_download(api, workflow_id, timeout=90)
            took = time.monotonic() - stalled_at
    print(f"stalled transfer ended its attempt after {took:.1f} s (hub timeout {HUB_TIMEOUT} s)")
    assert failed["state"] == "failed" and "Timeout" in failed["reason"], failed
    assert took < 60, took  # huggingface_hub resumes a stalled file 5 times, each bounded by the timeout
    again = await wait_download(api, await start_download(api, CHUNKY, node_id), timeout=60)
    result = again["result"]
    assert again["state"] == "completed" and 0 < result["bytes_fetched"] < result["bytes_total"], again


async def test_hub_that_never_answers_ends_the_attempt(
    cluster: Cluster, client: Client, api: httpx.AsyncClient, link: Relay, node_id: str
) -> None:
    cluster.start_node(node_id, hub=link.endpoint, SHARDLINE_HUB_TIMEOUT=str(HUB_TIMEOUT))
    await wait_node(api, node_id, "online")
    with link.stall():
        started = time.monotonic()
        inp = DownloadInput(node_id, TINY, node_wait_s=10, heartbeat_timeout_s=3, attempts=1)
        handle = await start_download_workflow(client, inp)
        failed = await wait_download(api, handle.id, timeout=30)
        took = time.monotonic() - started
    print(f"a hub that accepts and never answers ended the attempt after {took:.1f} s")
    assert failed["state"] == "failed" and "Timeout" in failed["reason"], failed
    await wait_node(api, node_id, "online")  # presence never starved


async def test_range_then_full_download(cluster: Cluster, client: Client, api: httpx.AsyncClient, node_id: str) -> None:
    home = cluster.start_node(node_id)
    await wait_node(api, node_id, "online")
    inp = DownloadInput(node_id, TINY, layers=LayerRange(0, 1), node_wait_s=10, heartbeat_timeout_s=3)
    ranged = await (await start_download_workflow(client, inp)).result()
    marker = json.loads((home / "models" / "test-org" / "tiny" / COMPLETE_MARKER).read_text())
    assert marker["full"] is False and sorted(marker["complete"]) == sorted(ranged.files), marker
    await wait_node(api, node_id, "online")
    assert TINY not in await models_listed(api, node_id)  # a layer range is not the model

    full = await wait_download(api, await start_download(api, TINY, node_id))
    result = full["result"]
    assert full["state"] == "completed" and set(ranged.files) < set(result["files"]), full
    assert 0 < result["bytes_fetched"] < result["bytes_total"]  # only the rest crossed the network

    async def listed() -> bool:
        return TINY in await models_listed(api, node_id)

    await eventually(listed, 15, "the node reports the whole model on disk")


async def test_a_whole_model_request_widens_a_running_range_download(
    cluster: Cluster, client: Client, api: httpx.AsyncClient, link: Relay, node_id: str
) -> None:
    cluster.start_node(node_id, hub=link.endpoint)
    await wait_node(api, node_id, "online")
    with link.capped(2**20):  # the range's files take seconds: the whole-model request meets it running
        inp = DownloadInput(node_id, CHUNKY, layers=LayerRange(0, 1), node_wait_s=10, heartbeat_timeout_s=3)
        ranged = await start_download_workflow(client, inp)
        await wait_progress(api, ranged.id)
        assert await start_download(api, CHUNKY, node_id) == ranged.id  # the same workflow, now widened
        done = await wait_download(api, ranged.id, timeout=180)
    assert done["state"] == "completed", done
    fetched = [a for a in await scheduled_activities(client, ranged.id) if a == "download_model"]
    assert len(fetched) == 2  # the range, then the rest
    files = set(done["result"]["files"])
    assert {f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)} <= files, files

    async def listed() -> bool:
        return CHUNKY in await models_listed(api, node_id)

    await eventually(listed, 15, "the node reports the whole model on disk")


async def test_serve_waits_for_a_running_download_of_the_same_model(
    cluster: Cluster, client: Client, api: httpx.AsyncClient, link: Relay, node_id: str
) -> None:
    home = cluster.start_node(node_id, hub=link.endpoint)
    await wait_node(api, node_id, "online")
    with link.capped(2**20):  # ~25 s of transfer
        download_id = await start_download(api, CHUNKY, node_id)
        await wait_progress(api, download_id)
        instance = await start_instance(api, CHUNKY, nodes=[node_id])
        ready = await wait_state(api, instance, {"ready", "failed"}, timeout=180)
    assert ready["state"] == "ready", ready
    assert "wait_workflow_end" in await scheduled_activities(client, serve_workflow_id(instance))
    ours = await client.get_workflow_handle(download_id, result_type=DownloadResult).result()  # the serve's own run
    assert ours.bytes_fetched == 0, ours
    await stop(api, instance, [home])


async def test_serve_uses_complete_files_when_the_hub_is_unreachable(
    cluster: Cluster, api: httpx.AsyncClient, link: Relay, node_id: str
) -> None:
    home = cluster.start_node(node_id, hub=link.endpoint)
    await wait_node(api, node_id, "online")
    assert (await wait_download(api, await start_download(api, TINY, node_id)))["state"] == "completed"
    link.stop()  # the node's way to the hub is gone: connections refused
    instance = await start_instance(api, TINY, nodes=[node_id])
    ready = await wait_state(api, instance, {"ready", "failed"}, timeout=120)
    assert ready["state"] == "ready", ready
    offline = await wait_download(api, download_workflow_id(node_id, TINY))
    assert offline["state"] == "completed" and offline["result"]["bytes_fetched"] == 0, offline
    await stop(api, instance, [home])
