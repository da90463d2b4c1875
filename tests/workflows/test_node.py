"""NodeWorkflow `node:<id>`: online on the node's first report, offline when it goes silent, departed after the
grace period, online again when it returns in time; presence that fails fast backs off; continue-as-new keeps it."""

import time
from datetime import timedelta

import pytest
from temporalio.client import WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from tests.support.fake_nodes import (
    HEARTBEAT_S,
    NODE_WAIT_S,
    FailingNode,
    FakeCluster,
    details_of,
    state_of,
    until_state,
)
from tests.support.waits import eventually
from workflows.node import BACKOFF_MAX_S, NodeInput, NodeWorkflow, presence_backoff

pytestmark = pytest.mark.slow(20)  # seconds in make test: tests/conftest.py starts the longest files first


def test_backoff_doubles_to_a_cap_and_resets_after_a_healthy_run() -> None:
    delays, delay = [], 0.0
    for _ in range(9):
        delay = presence_backoff(delay, lasted_s=0.01)
        delays.append(delay)
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert presence_backoff(60, lasted_s=3600) == 0  # a healthy run: the next failure starts over
    assert presence_backoff(0, lasted_s=0.5) == 1


async def test_online_after_the_first_report(fake_cluster: FakeCluster) -> None:
    node = await fake_cluster.node(memory=3 << 30)
    handle = await fake_cluster.start_node(NodeInput(node.node_id))  # production: 30 s heartbeat, 600 s grace
    await until_state(handle, "online")
    status = await handle.query(NodeWorkflow.status)
    assert (status.boots, status.resources and status.resources.memory_available) == (1, 3 << 30)
    assert await details_of(handle) == f"host-{node.node_id} cpu"


async def test_a_dead_node_is_offline_after_the_heartbeat_timeout_and_stays_known(fake_cluster: FakeCluster) -> None:
    node = await fake_cluster.node()
    handle = await fake_cluster.start_node(NodeInput(node.node_id, heartbeat_timeout_s=HEARTBEAT_S))  # grace 600 s
    await until_state(handle, "online")
    node.die()
    await until_state(handle, "offline", timeout=HEARTBEAT_S + 5)
    assert await details_of(handle) == f"no heartbeat for {HEARTBEAT_S:g} s"
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING  # within its grace period


async def test_a_node_gone_for_the_grace_period_departs(fake_cluster: FakeCluster) -> None:
    node = await fake_cluster.node()
    handle = await fake_cluster.start_node(NodeInput(node.node_id, HEARTBEAT_S, grace_s=NODE_WAIT_S))
    await until_state(handle, "online")
    died = time.monotonic()
    node.die()
    status = await handle.result()
    assert status.state == "departed"
    assert await state_of(handle) == "departed"
    # a heartbeat timeout, then the grace period (the heartbeat lag of the throttle: at most 0.5 s)
    assert time.monotonic() - died < HEARTBEAT_S + NODE_WAIT_S + 3


async def test_a_node_back_within_the_grace_period_is_online_again(fake_cluster: FakeCluster) -> None:
    node = await fake_cluster.node()
    handle = await fake_cluster.start_node(NodeInput(node.node_id, heartbeat_timeout_s=HEARTBEAT_S))  # grace 600 s
    await until_state(handle, "online")
    node.die()
    await until_state(handle, "offline", timeout=HEARTBEAT_S + 5)
    await node.restart()
    await until_state(handle, "online")
    assert (await handle.query(NodeWorkflow.status)).boots == 2


async def test_fast_failing_presence_backs_off(fake_cluster: FakeCluster) -> None:
    """A presence that fails at once (a disk unplugged) is retried with backoff, not in a tight loop."""
    errors = [ApplicationError("[Errno 5] Input/output error: /data") for _ in range(1000)]
    node = await fake_cluster.node(FailingNode, errors=errors)
    handle = await fake_cluster.start_node(NodeInput(node.node_id))  # production: 30 s heartbeat, 600 s grace
    assert await fake_cluster.env.fast_forward(handle, timedelta(minutes=10))
    attempts = 1000 - len(node.errors)
    # without backoff this loop runs hundreds of times a second; with it: 1+2+4+...+32 s, then every 60 s
    assert 8 <= attempts <= 600 / BACKOFF_MAX_S + 8, attempts
    assert await state_of(handle) == "offline"
    assert "presence failed on the node ([Errno 5] Input/output error: /data); again in" in await details_of(handle)


async def test_continue_as_new_after_leases_keeps_the_node_online(short_history_env: WorkflowEnvironment) -> None:
    async with FakeCluster(short_history_env) as cluster:
        node = await cluster.node(lease_s=0.2)  # each presence lease ends (production: after an hour)
        handle = await cluster.start_node(NodeInput(node.node_id))
        first_run = handle.result_run_id

        async def continued() -> bool:
            return node.presence_runs > 8 and (await handle.describe()).run_id != first_run

        await eventually(continued, 30, f"{handle.id} continued as new")
        first = cluster.client.get_workflow_handle(handle.id, run_id=first_run)
        assert (await first.describe()).status == WorkflowExecutionStatus.CONTINUED_AS_NEW
        latest = cluster.client.get_workflow_handle(handle.id)
        await until_state(latest, "online")
        assert (await latest.describe()).status == WorkflowExecutionStatus.RUNNING
