"""DownloadWorkflow `download:<node>:<model>`: completes; a dead node ends it within the node wait and heartbeat
timeout, with a reason a person can read; a transient failure is retried, what a retry cannot fix is not; a cancel
ends it CANCELED saying what the node did; a request for the whole model widens a layer range's download."""

import time
from datetime import timedelta

import pytest
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError, CancelledError

from shardline.errors import ErrorType, error
from shardline.types import DownloadResult, LayerRange
from tests.support.fake_nodes import (
    HEARTBEAT_S,
    NODE_WAIT_S,
    THROTTLE,
    FailingNode,
    FakeCluster,
    FakeNode,
    LostDispatchNode,
    details_of,
    model_files,
    new_id,
    new_model,
    state_of,
    workflow_clock,
)
from tests.support.waits import eventually
from workflows.download import DownloadInput, DownloadWorkflow

pytestmark = pytest.mark.slow(35)  # seconds in make test: tests/conftest.py starts the longest files first

LAG = THROTTLE.total_seconds() + 1.5  # a heartbeat sent late by the throttle, and the workers' round trips


async def failure(handle: WorkflowHandle[DownloadWorkflow, DownloadResult], kind: ErrorType) -> str:
    """The message a failed download gives, once it is known to fail with this type (what the API maps)."""
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()
    assert isinstance(failed.value.cause, ApplicationError), failed.value.cause
    assert failed.value.cause.type == kind, failed.value.cause
    return failed.value.cause.message


async def downloading(node: FakeNode) -> None:
    async def started() -> bool:
        return bool(node.downloads)

    await eventually(started, 10, f"a download on {node.node_id}")


async def test_completes(fake_cluster: FakeCluster) -> None:
    node, model = await fake_cluster.node(), new_model()
    handle = await fake_cluster.start_download(DownloadInput(node.node_id, model))  # production timeouts
    result = await handle.result()
    assert result.files == model_files(node.layers)
    assert await state_of(handle) == "completed"
    assert await details_of(handle) == f"{model} on {node.node_id}: {len(result.files)} files"
    assert model in node.models


async def test_a_node_that_never_takes_the_work_ends_it_after_the_node_wait(fake_cluster: FakeCluster) -> None:
    node_id = new_id()  # no worker polls its queue: the machine is off
    handle = await fake_cluster.start_download(DownloadInput(node_id, new_model(), node_wait_s=NODE_WAIT_S))
    message = await failure(handle, ErrorType.NODE_UNAVAILABLE)
    assert message == f"node {node_id} unavailable: it did not pick the work up within {NODE_WAIT_S:g} s"
    assert await state_of(handle) == "failed"
    assert await workflow_clock(handle) < timedelta(seconds=NODE_WAIT_S + LAG)  # one attempt: retrying only waits


class SwampedNode(FakeNode):
    """Online (its presence heartbeats) but too busy to poll its queue: 200 transfers starving its cores."""

    @property
    def alive(self) -> bool:
        return True


async def test_an_online_node_that_does_not_take_the_work_gets_each_attempt_then_it_ends(
    fake_cluster: FakeCluster,
) -> None:
    node = await fake_cluster.node(SwampedNode, start=False)
    inp = DownloadInput(node.node_id, new_model(), node_wait_s=NODE_WAIT_S, attempts=3)
    handle = await fake_cluster.start_download(inp)
    message = await failure(handle, ErrorType.NODE_UNAVAILABLE)
    assert message == f"node {node.node_id} unavailable: it did not pick the work up within {NODE_WAIT_S:g} s"
    clock = await workflow_clock(handle)  # three waits and two back-offs (1 s, 2 s): bounded, and not looping
    assert timedelta(seconds=3 * NODE_WAIT_S + 1 + 2) <= clock < timedelta(seconds=3 * NODE_WAIT_S + 3 + 3 * LAG)


async def test_a_node_dead_mid_way_ends_it_within_heartbeat_and_node_wait(fake_cluster: FakeCluster) -> None:
    node = await fake_cluster.node(download_s=60)
    inp = DownloadInput(node.node_id, new_model(), node_wait_s=NODE_WAIT_S, heartbeat_timeout_s=HEARTBEAT_S)
    handle = await fake_cluster.start_download(inp)
    await downloading(node)
    node.die()
    # it had made progress, so it may be back: one more attempt (after 1 s), which no node takes
    message = await failure(handle, ErrorType.NODE_UNAVAILABLE)
    assert message == f"node {node.node_id} unavailable: it did not pick the work up within {NODE_WAIT_S:g} s"
    assert await workflow_clock(handle) < timedelta(seconds=HEARTBEAT_S + 1 + NODE_WAIT_S + 2 * LAG)
    assert len(node.downloads) == 1


async def test_a_lost_attempt_waits_for_a_node_that_reads_offline_for_a_moment(fake_cluster: FakeCluster) -> None:
    """The load that loses an attempt's dispatch can delay the node's presence too: it must not fail the download."""
    node = await fake_cluster.node(LostDispatchNode, offline_reads=2)
    assert isinstance(node, LostDispatchNode)
    inp = DownloadInput(node.node_id, new_model(), node_wait_s=NODE_WAIT_S, heartbeat_timeout_s=HEARTBEAT_S)
    handle = await fake_cluster.start_download(inp)
    result = await handle.result()
    assert result.files == model_files(node.layers)
    assert len(node.downloads) == 2 and node.state_reads == 2


async def test_a_lost_attempt_on_a_node_that_stays_offline_ends_within_two_heartbeats(
    fake_cluster: FakeCluster,
) -> None:
    node = await fake_cluster.node(LostDispatchNode, offline_reads=None)
    inp = DownloadInput(node.node_id, new_model(), node_wait_s=NODE_WAIT_S, heartbeat_timeout_s=HEARTBEAT_S)
    handle = await fake_cluster.start_download(inp)
    message = await failure(handle, ErrorType.NODE_UNAVAILABLE)
    assert message == f"node {node.node_id} unavailable: no heartbeat for {HEARTBEAT_S:g} s"
    assert len(node.downloads) == 1  # not tried again: it never came back
    # the lost attempt's heartbeat timeout, then as long again for the node to report: bounded, not looping
    assert await workflow_clock(handle) < timedelta(seconds=2 * HEARTBEAT_S + 5 + 2 * LAG)


async def test_retries_after_a_transient_failure_then_completes(fake_cluster: FakeCluster) -> None:
    reset = error(ErrorType.TRANSIENT, "fetching x failed: ConnectionError: connection reset")
    node = await fake_cluster.node(FailingNode, errors=[reset, reset])
    handle = await fake_cluster.start_download(DownloadInput(node.node_id, new_model()))  # production: 5 attempts
    started = time.monotonic()
    result = await handle.result()
    assert result.files == model_files(node.layers)
    assert len(node.downloads) == 3
    assert await workflow_clock(handle) >= timedelta(seconds=1 + 2)  # it backed off 1 s, then 2 s
    assert time.monotonic() - started < 10  # on the skipped clock


async def test_gives_up_after_its_attempts_with_the_last_reason(fake_cluster: FakeCluster) -> None:
    errors = [error(ErrorType.TRANSIENT, f"fetching x failed: attempt {i}") for i in range(1, 6)]
    node = await fake_cluster.node(FailingNode, errors=errors)
    handle = await fake_cluster.start_download(DownloadInput(node.node_id, new_model()))  # production: 5 attempts
    assert await failure(handle, ErrorType.TRANSIENT) == "fetching x failed: attempt 5"
    assert len(node.downloads) == 5
    assert await workflow_clock(handle) >= timedelta(seconds=1 + 2 + 4 + 8)


@pytest.mark.parametrize(
    ("kind", "message"),
    [("not_found", "repo {model} not found (or private: set HF_TOKEN)"), ("bad_input", "{model}: no config.json")],
)
async def test_what_a_retry_cannot_fix_fails_at_once(fake_cluster: FakeCluster, kind: str, message: str) -> None:
    model = new_model()
    node = await fake_cluster.node(FailingNode, errors=[error(ErrorType(kind), message.format(model=model))])
    handle = await fake_cluster.start_download(DownloadInput(node.node_id, model))
    assert await failure(handle, ErrorType(kind)) == message.format(model=model)
    assert len(node.downloads) == 1
    assert await workflow_clock(handle) < timedelta(seconds=1)  # no back-off either


async def canceled(handle: WorkflowHandle[DownloadWorkflow, DownloadResult]) -> str:
    """The reason a CANCELED download gives (the API shows it)."""
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()
    assert isinstance(failed.value.cause, CancelledError), failed.value.cause
    desc = await handle.describe()
    assert desc.status == WorkflowExecutionStatus.CANCELED
    assert await state_of(handle) == "canceled"
    return str((await desc.memo())["reason"])


async def test_a_cancel_the_node_confirms_ends_it_canceled(fake_cluster: FakeCluster) -> None:
    node = await fake_cluster.node(download_s=60)
    handle = await fake_cluster.start_download(DownloadInput(node.node_id, new_model()))  # production timeouts
    await downloading(node)
    await handle.cancel()
    assert await canceled(handle) == f"canceled; node {node.node_id} stopped the work"
    assert node.canceled == ["download_model"]
    assert await workflow_clock(handle) < timedelta(seconds=60)


async def test_a_cancel_a_silent_node_never_confirms_ends_it_canceled_at_its_heartbeat_timeout(
    fake_cluster: FakeCluster,
) -> None:
    node = await fake_cluster.node(download_s=60)
    handle = await fake_cluster.start_download(
        DownloadInput(node.node_id, new_model(), heartbeat_timeout_s=HEARTBEAT_S)
    )
    await downloading(node)
    node.freeze()
    await handle.cancel()
    reason = await canceled(handle)
    assert reason == f"canceled; node {node.node_id} did not confirm (no heartbeat for {HEARTBEAT_S:g} s)"
    assert node.canceled == []


async def test_a_request_for_the_whole_model_widens_a_layer_range_download(fake_cluster: FakeCluster) -> None:
    node = await fake_cluster.node(download_s=1.0)
    handle = await fake_cluster.start_download(DownloadInput(node.node_id, new_model(), layers=LayerRange(0, 2)))
    await downloading(node)
    await handle.signal(DownloadWorkflow.whole_model)
    result = await handle.result()
    assert [d.layers for d in node.downloads] == [LayerRange(0, 2), None]
    assert result.files == model_files(node.layers)
