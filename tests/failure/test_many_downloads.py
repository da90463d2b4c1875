"""exo issue 2136 at scale: 120 downloads, a third of them for a node that is SIGKILLed mid-way. Every one ends
in bounded time, the dying node's fail, the live nodes' complete, and no history keeps growing. A file of its
own: the longest drill, it starts first on a worker of its own (tests/conftest.py runs `slow` files first)."""

import asyncio
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from shardline import search
from shardline.states import Kind
from tests.conftest import TINY, Cluster
from tests.support.hub_mirror import HubMirror, publish_model
from tests.support.waits import download, eventually, scheduled_activities, start_download_workflow, wait_node
from workflows.download import DownloadInput

pytestmark = pytest.mark.slow(106)  # seconds in make test: tests/conftest.py starts the longest files first
# per node: 120 downloads in all (300 cost a fifth of the whole suite's CPU: a fetch process and a workflow each)
MODELS = 40


async def activity_completed_at(client: Client, workflow_id: str) -> datetime:
    """When the node reported its download_model done (node_state checks are activities too)."""
    events = (await client.get_workflow_handle(workflow_id).fetch_history()).events
    name = {e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name for e in events}
    (done,) = [
        e
        for e in events
        if e.HasField("activity_task_completed_event_attributes")
        and name[e.activity_task_completed_event_attributes.scheduled_event_id] == "download_model"
    ]
    return done.event_time.ToDatetime(tzinfo=UTC)


@pytest.mark.timeout(900)
async def test_120_downloads_a_third_for_a_dying_node(
    cluster: Cluster, client: Client, api: httpx.AsyncClient, hub: HubMirror, model_dirs: dict[str, Path]
) -> None:
    models = [f"bulk-org/m{i:03d}" for i in range(MODELS)]
    for model in models:
        publish_model(model_dirs[TINY], hub.mirrors_root, model)
    live, doomed = ["bulk-a", "bulk-b"], "bulk-c"
    try:
        await many_downloads(cluster, client, api, models, live, doomed)
    finally:
        for node in [*live, doomed]:
            cluster.stop(f"node-{node}")


async def many_downloads(
    cluster: Cluster, client: Client, api: httpx.AsyncClient, models: list[str], live: list[str], doomed: str
) -> None:
    for node in [*live, doomed]:
        cluster.start_node(node)
    for node in [*live, doomed]:
        await wait_node(api, node, "online")

    async def start(node: str, model: str) -> str:
        # the production heartbeat timeout: 80 transfers starve 2 cores, and short test timeouts
        # then fail live nodes' downloads too (3 s and 10 s both did here)
        inp = DownloadInput(node, model, node_wait_s=60, heartbeat_timeout_s=30)
        return (await start_download_workflow(client, inp)).id

    ids = await asyncio.gather(*(start(node, model) for node in [*live, doomed] for model in models))
    assert len(ids) == 3 * len(models)
    await asyncio.sleep(3)
    cluster.signal(f"node-{doomed}", signal.SIGKILL)
    killed_at, killed_wall = time.monotonic(), datetime.now(UTC)

    async def ended(workflow_id: str) -> tuple[str, WorkflowExecutionStatus | None, int]:
        desc = await client.get_workflow_handle(workflow_id).describe()
        return workflow_id, desc.status, desc.raw_description.workflow_execution_info.history_length

    async def all_ended() -> list[tuple[str, WorkflowExecutionStatus | None, int]] | None:
        states = await asyncio.gather(*(ended(w) for w in ids))
        return None if any(s == WorkflowExecutionStatus.RUNNING for _, s, _ in states) else states

    nodes = ", ".join(f"'{node}'" for node in [*live, doomed])
    running = f"{search.KIND.name} = '{Kind.DOWNLOAD}' AND {search.NODE.name} IN ({nodes})"
    running += " AND ExecutionStatus = 'Running'"

    async def none_running() -> bool:  # one visibility query, not 120 describes, each poll
        return (await client.count_workflows(running)).count == 0

    # 80 real transfers (a fetch process each) share 2 cores with everything else: the bound is generous
    await eventually(none_running, 400, "all 120 downloads end")
    all_took = time.monotonic() - killed_at
    final = await eventually(all_ended, 30, "each of the 120 downloads says it ended")  # visibility may lag
    doomed_states = {w: s for w, s, _ in final if w.startswith(f"download:{doomed}:")}
    finished_in_time = [w for w, s in doomed_states.items() if s == WorkflowExecutionStatus.COMPLETED]
    failed = [w for w, s in doomed_states.items() if s == WorkflowExecutionStatus.FAILED]
    # a 0.5 MB model can finish in the 3 s before the kill (CI saw it): the server must have recorded those by
    # then (slack: a loaded server may record a report sent just before the kill a little later)
    for workflow_id in finished_in_time:
        assert await activity_completed_at(client, workflow_id) < killed_wall + timedelta(seconds=10), workflow_id
    print(f"dying node: {len(finished_in_time)} downloads completed before the kill, {len(failed)} failed")
    assert len(failed) + len(finished_in_time) == len(doomed_states) == len(models)
    assert len(failed) >= len(models) // 2  # the drill is about the ones cut off mid-way
    live_failed = [
        w for w, s, _ in final if not w.startswith(f"download:{doomed}:") and s != WorkflowExecutionStatus.COMPLETED
    ]
    # reported, not hidden: 1-11 of 200 before lost dispatches were tried again; 3-9 of 80 under `make test`'s
    # load before a lost attempt waited for its node to report again (its presence was late under the same load)
    for workflow_id in live_failed:
        reason = (await download(api, workflow_id)).get("reason")
        print("live node download failed:", workflow_id, reason, await scheduled_activities(client, workflow_id))
    assert len(live_failed) <= 2, live_failed
    await asyncio.sleep(3)
    again = await asyncio.gather(*(ended(w) for w in ids))
    assert [n for _, _, n in again] == [n for _, _, n in final]  # every history is final: nothing loops
    # how long a history gets depends on the server's load (timed-out workflow tasks add events); what must
    # hold is that no download tried its node more often than its attempts allow: read the longest ones
    longest = sorted(final, key=lambda e: e[2])[-10:]
    tries = {w: (await scheduled_activities(client, w)).count("download_model") for w, _, _ in longest}
    print(f"{3 * MODELS} downloads: all ended {all_took:.1f} s after the kill; longest histories (events, tries):",
          [(n, tries[w]) for w, _, n in longest])  # fmt: skip
    assert max(tries.values()) <= DownloadInput.attempts, tries
