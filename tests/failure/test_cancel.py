"""A cancel asked for always ends CANCELED, whatever the node did about it, and says what that was."""

import asyncio
import signal
import time

import httpx
from temporalio.client import Client, WorkflowExecutionStatus

from tests.conftest import CHUNKY, TIMEOUTS, Cluster
from tests.support.processes import fetch_processes
from tests.support.relay import Relay
from tests.support.waits import eventually, start_download, wait_download, wait_node, wait_progress

HEARTBEAT = float(TIMEOUTS["SHARDLINE_HEARTBEAT_TIMEOUT"])
SLACK = 10.0  # scheduling and polling on a busy 2-core machine


async def test_cancel_of_a_frozen_nodes_download_ends_canceled(
    cluster: Cluster, client: Client, api: httpx.AsyncClient, slow_link: Relay, node_id: str
) -> None:
    home = cluster.start_node(node_id, hub=slow_link.endpoint)
    await wait_node(api, node_id, "online")
    with slow_link.capped(2**20):  # ~25 s of transfer: the freeze and the cancel land well before its end
        workflow_id = await start_download(api, CHUNKY, node_id)
        await wait_progress(api, workflow_id)
        cluster.signal(f"node-{node_id}", signal.SIGSTOP)
        try:
            await asyncio.sleep(1)
            response = await api.delete(f"/downloads/{workflow_id}")
            assert response.status_code == 202, response.text
            asked = time.monotonic()
            d = await wait_download(api, workflow_id, timeout=HEARTBEAT + SLACK + 10)
            took = time.monotonic() - asked
        finally:
            cluster.signal(f"node-{node_id}", signal.SIGCONT)
        assert d["state"] == "canceled" and d["status"] == "CANCELED", d
        assert d["reason"] == f"canceled; node {node_id} did not confirm (no heartbeat for {HEARTBEAT:g} s)", d
        assert took <= HEARTBEAT + SLACK, f"took {took:.1f} s"
        desc = await client.get_workflow_handle(workflow_id).describe()
        assert desc.status == WorkflowExecutionStatus.CANCELED

        # thawed, the node learns its work is gone and stops the transfer
        async def stopped() -> bool:
            return fetch_processes(str(home)) == []

        await eventually(stopped, 30, "the thawed node stops its transfer")
    await wait_node(api, node_id, "online")


async def test_cancel_of_a_live_nodes_download_says_the_node_stopped(
    cluster: Cluster, api: httpx.AsyncClient, slow_link: Relay, node_id: str
) -> None:
    home = cluster.start_node(node_id, hub=slow_link.endpoint)
    await wait_node(api, node_id, "online")
    with slow_link.capped(2**20):
        workflow_id = await start_download(api, CHUNKY, node_id)
        await wait_progress(api, workflow_id)
        assert (await api.delete(f"/downloads/{workflow_id}")).status_code == 202
        d = await wait_download(api, workflow_id, timeout=20)
    assert d["state"] == "canceled" and d["status"] == "CANCELED", d
    assert d["reason"] == f"canceled; node {node_id} stopped the work", d
    assert fetch_processes(str(home)) == []
