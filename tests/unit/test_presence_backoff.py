"""A presence activity that fails fast (a disk unplugged) is retried with backoff, not in a tight loop:
NodeWorkflow under Temporal's time skipping, its presence replaced by one that always fails at once."""

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from shardline import search
from shardline.ids import node_queue, node_workflow_id
from shardline.temporal import ensure_search_attributes, temporal_cli
from shardline.types import PresenceInput
from workflows.node import BACKOFF_MAX_S, NodeInput, NodeWorkflow, presence_backoff


def test_backoff_doubles_to_a_cap_and_resets_after_a_healthy_run() -> None:
    delays, delay = [], 0.0
    for _ in range(9):
        delay = presence_backoff(delay, lasted_s=0.01)
        delays.append(delay)
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert presence_backoff(60, lasted_s=3600) == 0  # a healthy run: the next failure starts over
    assert presence_backoff(0, lasted_s=0.5) == 1


@pytest.fixture(scope="module")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    async with await WorkflowEnvironment.start_time_skipping_v2(
        dev_server_existing_path=temporal_cli(),
        dev_server_extra_args=["--dynamic-config-value", "frontend.WorkflowTimeSkippingEnabled=true"],
    ) as started:
        await ensure_search_attributes(started.client, "default")
        yield started


async def test_fast_failing_presence_backs_off(env: WorkflowEnvironment, tmp_path: Path) -> None:
    client: Client = env.client
    node_id, control = f"n{uuid.uuid4().hex[:8]}", f"control-{uuid.uuid4().hex[:8]}"
    attempts: list[float] = []

    @activity.defn(name="node_presence")
    async def failing_presence(inp: PresenceInput) -> None:  # the node's activity, its disk gone
        attempts.append(inp.lease_s)
        raise ApplicationError(f"[Errno 5] Input/output error: {tmp_path}")

    async with (
        Worker(client, task_queue=control, workflows=[NodeWorkflow]),
        Worker(client, task_queue=node_queue(node_id), activities=[failing_presence]),
    ):
        handle = await client.start_workflow(
            NodeWorkflow.run,
            NodeInput(node_id),  # production settings: 30 s heartbeat timeout, 600 s grace
            id=node_workflow_id(node_id),
            task_queue=control,
            search_attributes=search.attributes("node", "starting", node=node_id),
        )
        await env.fast_forward(handle, timedelta(minutes=10))
        status = await handle.query(NodeWorkflow.status)
    # without backoff this loop runs hundreds of times a second; with it: 1+2+4+...+32 s, then every 60 s
    print(f"presence attempts in 10 simulated minutes: {len(attempts)}")
    assert 8 <= len(attempts) <= 600 / BACKOFF_MAX_S + 8, len(attempts)
    assert status.state == "offline"
