"""A node cut off from the network: its own network namespace, joined by a veth pair whose link is set down
while it downloads and while it serves. The same outcomes as a killed node; once the link is back up the
node (still running all along) returns as itself and is used again."""

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import CHUNKY, QWEN, TIMEOUTS, Cluster
from tests.support.hub_mirror import HubMirror
from tests.support.netns import Link, can_make_namespaces, separate_network
from tests.support.relay import Relay
from tests.support.serving import greedy, reference, runners, start_instance, start_nodes, stop, wait_state
from tests.support.streams import REQUESTS, same, streams
from tests.support.waits import download, eventually, start_download, wait_download, wait_node, wait_progress

WHY_NOT = can_make_namespaces()
pytestmark = [pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or ""), pytest.mark.slow(73)]  # s in make test

HEARTBEAT = float(TIMEOUTS["SHARDLINE_HEARTBEAT_TIMEOUT"])
NODE_WAIT = float(TIMEOUTS["SHARDLINE_NODE_WAIT"])
GRACE = float(TIMEOUTS["SHARDLINE_NODE_GRACE"])
SLACK = 10.0
# back on the link, a node's gRPC connection may need the client's keepalive (30 s + 15 s) to notice that
# its old connection is dead and open a new one
RETURN_WITHIN = 90.0


@dataclass
class Remote:
    """Where a node on the far side of `link` finds the cluster: relays on this side's address."""

    link: Link
    temporal: Relay
    hub: Relay

    def start_node(self, cluster: Cluster, node_id: str) -> Path:
        return cluster.start_node(
            node_id,
            launcher=self.link.command([]),
            SHARDLINE_TEMPORAL_ADDRESS=self.temporal.address,
            HF_ENDPOINT=self.hub.endpoint,
            SHARDLINE_NODE_HOST=self.link.node_ip,
        )


@pytest.fixture
def remote(cluster: Cluster, hub: HubMirror) -> Iterator[Remote]:
    with separate_network() as link:
        temporal = Relay(cluster.temporal_port, host=link.host_ip).start()
        mirror = Relay(int(hub.endpoint.rsplit(":", 1)[1]), host=link.host_ip).start()
        try:
            yield Remote(link, temporal, mirror)
        finally:
            temporal.stop()
            mirror.stop()


def fetch_children(node: psutil.Process) -> list[psutil.Process]:
    return [p for p in node.children(recursive=True) if "activities.fetch" in " ".join(p.cmdline())]


async def test_cut_off_while_downloading(
    cluster: Cluster, api: httpx.AsyncClient, remote: Remote, node_id: str
) -> None:
    remote.hub.bytes_per_s = 4 * 2**20  # slow enough to cut the link mid-download
    remote.start_node(cluster, node_id)
    worker = psutil.Process(cluster.procs[f"node-{node_id}"].pid)
    await wait_node(api, node_id, "online")
    workflow_id = await start_download(api, CHUNKY, node_id)
    await wait_progress(api, workflow_id)

    remote.link.cut()
    cut_at = time.monotonic()
    d = await wait_download(api, workflow_id, timeout=HEARTBEAT + NODE_WAIT + SLACK + 10)
    detected = time.monotonic() - cut_at
    assert d["state"] == "failed" and f"node {node_id} unavailable" in d["reason"], d
    assert detected <= HEARTBEAT + NODE_WAIT + SLACK, f"took {detected:.1f} s"
    await wait_node(api, node_id, "departed", timeout=GRACE + HEARTBEAT + SLACK)
    assert worker.is_running(), "cut off, the node itself lives on"

    remote.link.mend()
    mended_at = time.monotonic()
    await wait_node(api, node_id, "online", timeout=RETURN_WITHIN)
    returned = time.monotonic() - mended_at

    async def fetch_stopped() -> bool | None:
        return not fetch_children(worker) or None

    await eventually(fetch_stopped, 60, "the stranded transfer stops")
    assert (await download(api, workflow_id))["state"] == "failed"  # its late work did not revive it

    remote.hub.bytes_per_s = None
    again = await start_download(api, CHUNKY, node_id)
    done = await wait_download(api, again, timeout=120)
    assert done["state"] == "completed", done
    print(f"partition while downloading: failed {detected:.1f} s after the cut; back online {returned:.1f} s "
          f"after the link came back; the same node then downloaded {done['result']['bytes_total']} bytes")  # fmt: skip


async def test_cut_off_while_serving(
    cluster: Cluster, api: httpx.AsyncClient, remote: Remote, model_dirs: dict[str, Path]
) -> None:
    suffix = random.randint(0, 99999)
    here, away = [f"near{i}-{suffix}" for i in range(2)], f"far-{suffix}"
    # the nodes on this side listen on the link's address too, so that a ring can span the link
    homes = await start_nodes(cluster, api, here, SHARDLINE_NODE_HOST=remote.link.host_ip)
    away_home = remote.start_node(cluster, away)
    try:
        await wait_node(api, away, "online")
        expected = reference(model_dirs[QWEN])
        instance = await start_instance(api, QWEN, nodes=[*here, away])
        ready = await wait_state(api, instance, {"ready", "failed"})
        assert ready["state"] == "ready" and len(ready["shards"]) == 3, ready
        undisturbed = await streams(cluster, QWEN)
        at = asyncio.Barrier(len(REQUESTS) + 1)
        running = asyncio.ensure_future(streams(cluster, QWEN, at))
        await at.wait()  # every stream is under way

        remote.link.cut()
        cut_at = time.monotonic()
        await wait_state(api, instance, {"recovering"}, timeout=30)
        detected = time.monotonic() - cut_at
        healed = await wait_state(api, instance, {"ready", "failed"}, timeout=120)
        recovered = time.monotonic() - cut_at
        assert healed["state"] == "ready", healed
        assert sorted(s["node_id"] for s in healed["shards"]) == sorted(here), healed
        assert f"node {away} unavailable" in healed["incidents"][0], healed["incidents"]
        assert await greedy(cluster, QWEN, stream=False) == expected
        same(await running, undisturbed)  # the streams open at the cut went on where the instance healed

        remote.link.mend()
        mended_at = time.monotonic()
        await wait_node(api, away, "online", timeout=RETURN_WITHIN)
        returned = time.monotonic() - mended_at

        async def runner_stopped() -> bool | None:
            return runners([away_home]) == [] or None

        await eventually(runner_stopped, 60, "the stranded runner stops")
        await stop(api, instance, homes)

        again = await start_instance(api, QWEN, nodes=[away])  # back, it is used again
        alone = await wait_state(api, again, {"ready", "failed"})
        assert alone["state"] == "ready" and [s["node_id"] for s in alone["shards"]] == [away], alone
        assert await greedy(cluster, QWEN, stream=True) == expected
        await stop(api, again, [away_home])
        print(f"partition while serving: recovering {detected:.1f} s and ready again on the rest {recovered:.1f} s "
              f"after the cut; back online {returned:.1f} s after the link came back, then served alone")  # fmt: skip
    finally:
        for node in [*here, away]:
            cluster.stop(f"node-{node}")
