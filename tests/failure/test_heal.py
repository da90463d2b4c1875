"""Healing waits instead of failing: an instance whose node worker is killed comes back ready on its own
once the node is back, and an instance pinned to a node never moves off it, even with room elsewhere."""

import asyncio
import signal

import httpx
import pytest

from tests.conftest import TIMEOUTS, TINY, Cluster
from tests.support.serving import greedy, running_nodes, start_instance, wait_state
from tests.support.waits import wait_node

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow(27)]
HEARTBEAT = float(TIMEOUTS["SHARDLINE_HEARTBEAT_TIMEOUT"])


async def test_a_pinned_instance_waits_for_its_node_and_comes_back_ready(cluster: Cluster) -> None:
    pinned, other = "heal-pin", "heal-other"
    async with (
        httpx.AsyncClient(base_url=cluster.api, timeout=60) as api,
        running_nodes(cluster, api, [pinned, other]),
    ):
        instance_id = await start_instance(api, TINY, nodes=[pinned])
        ready = await wait_state(api, instance_id, {"ready", "failed"})
        assert ready["state"] == "ready", ready["reason"]
        cluster.signal(f"node-{pinned}", signal.SIGKILL)  # its runner dies with it
        recovering = await wait_state(api, instance_id, {"recovering", "failed"}, timeout=HEARTBEAT + 30)
        assert recovering["state"] == "recovering", recovering
        await asyncio.sleep(3 * HEARTBEAT)  # long past the heartbeat: the old code failed here, or moved it
        waiting = (await api.get(f"/instances/{instance_id}")).json()
        assert waiting["state"] == "recovering" and "waiting for room" in waiting["reason"], waiting
        assert other not in {s["node_id"] for s in waiting["shards"]}
        cluster.start_node(pinned)  # back as itself
        await wait_node(api, pinned, "online")
        back = await wait_state(api, instance_id, {"ready", "failed"}, timeout=120)
        assert back["state"] == "ready", back
        assert {s["node_id"] for s in back["shards"]} == {pinned} and back["recoveries"] == 1
        assert await greedy(cluster, TINY, stream=False)
        await api.delete(f"/instances/{instance_id}")
