"""ServingWorkflow `serve:<instance>`: placed, each node's files downloaded (child workflows), runners ready; a
model that cannot be placed fails at once; a lost runner is placed again on the nodes left; recoveries are
bounded in a window, healing waits for room up to its deadline; a cancel stops every runner; continue-as-new
carries the instance's history of recoveries."""

import time
from dataclasses import replace
from datetime import timedelta

import httpx
import pytest
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.testing import WorkflowEnvironment

from shardline import contracts
from shardline.contracts import implements
from shardline.errors import ErrorType, error
from shardline.ids import download_workflow_id, serve_workflow_id
from shardline.placement import ModelProfile, NodeCapacity, place
from shardline.types import LayerRange, ShardSpec
from tests.support.fake_nodes import (
    GIB,
    HEARTBEAT_S,
    NODE_WAIT_S,
    FakeCluster,
    FakeNode,
    new_id,
    new_model,
    state_of,
    states_seen,
    workflow_clock,
)
from tests.support.offline_app import offline_app
from tests.support.waits import eventually
from workflows.download import DownloadInput
from workflows.serve import InstanceStatus, ServeInput, ServingWorkflow

pytestmark = pytest.mark.slow(35)  # seconds in make test: tests/conftest.py starts the longest files first

Handle = WorkflowHandle[ServingWorkflow, InstanceStatus]


def profile(model: str) -> ModelProfile:
    """4 layers of 1 GiB and 0.5 GiB of embeddings: a node of 8 GiB holds it all, one of 4 GiB two layers."""
    return ModelProfile(model, num_layers=4, layer_bytes=GIB, outer_bytes=GIB // 2, pipeline=True, tensor=True,
                        num_heads=4, num_kv_heads=4)  # fmt: skip


async def serving(cluster: FakeCluster, model: str = "", **options: float) -> Handle:
    """An instance of `model` (a fresh one by default) on the cluster's nodes, at production timeouts unless
    `options` say otherwise."""
    model = model or new_model()
    cluster.control.profile = profile(model)
    return await cluster.start_serve(ServeInput(new_id("i"), model, **options))  # type: ignore[arg-type]


async def status(handle: Handle) -> InstanceStatus:
    return await handle.query(ServingWorkflow.status)


async def until_ready(handle: Handle, recoveries: int = 0, timeout: float = 15) -> InstanceStatus:
    """Until the instance is ready after `recoveries` recoveries (the query follows continue-as-new)."""

    async def probe() -> InstanceStatus | None:
        s = await status(handle)
        assert s.state != "failed", s.reason
        return s if s.state == "ready" and s.recoveries == recoveries else None

    return await eventually(probe, timeout, f"{handle.id} ready after {recoveries} recoveries")


async def failure(handle: Handle) -> ApplicationError:
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()
    assert isinstance(failed.value.cause, ApplicationError), failed.value.cause
    return failed.value.cause


async def test_placed_downloaded_and_ready(fake_cluster: FakeCluster) -> None:
    nodes = [await fake_cluster.node(memory=4 * GIB) for _ in range(2)]  # two layers each: it needs both
    model = new_model()
    handle = await serving(fake_cluster, model)
    ready = await until_ready(handle)
    placement = place(profile(model), [NodeCapacity(n.node_id, n.memory) for n in nodes])
    assert [(s.node_id, s.rank, s.layer_start, s.layer_end, s.ready) for s in ready.shards] == [
        (s.node_id, s.rank, s.layers.start, s.layers.end, True) for s in placement.shards
    ]
    assert ready.endpoint == "http://127.0.0.1:18000"  # rank 0's
    assert await states_seen(handle) == ["placing", "downloading", "loading", "ready"]
    by_id = {n.node_id: n for n in nodes}
    for shard in placement.shards:
        node = by_id[shard.node_id]
        download = fake_cluster.client.get_workflow_handle(download_workflow_id(node.node_id, model))
        assert (await download.describe()).status == WorkflowExecutionStatus.COMPLETED
        assert [d.layers for d in node.downloads] == [shard.layers]  # exactly the files its layers need
        (runner,) = node.runners
        assert (runner.rank, runner.layers, runner.world_size, runner.splits) == (shard.rank, shard.layers, 2, [2, 2])
        assert runner.secret == ready.secret != ""


async def test_no_strategy_picks_pipeline_over_several_nodes_and_says_why(fake_cluster: FakeCluster) -> None:
    nodes = [await fake_cluster.node(memory=4 * GIB) for _ in range(3)]  # two layers each: pipeline over all three
    handle = await serving(fake_cluster)  # no strategy: auto
    assert (await status(handle)).strategy in ("auto", "pipeline")  # "auto" until placed
    ready = await until_ready(handle)
    assert (ready.strategy, ready.strategy_reason) == (
        "pipeline",
        "pipeline: layers weighted by free memory over 3 nodes",
    )
    assert sorted(s.layer_end - s.layer_start for s in ready.shards) == [1, 1, 2]
    specs = [r for n in nodes for r in n.runners]
    assert len(specs) == 3 and {(r.strategy, r.world_size) for r in specs} == {("pipeline", 3)}


async def test_no_strategy_for_a_model_that_cannot_be_pipelined_splits_by_heads(fake_cluster: FakeCluster) -> None:
    nodes = [await fake_cluster.node() for _ in range(2)]
    model = new_model()
    why = "model type 'gpt2' does not support pipeline parallelism"
    fake_cluster.control.profile = replace(profile(model), pipeline=False, why_not_pipeline=why)
    ready = await until_ready(await fake_cluster.start_serve(ServeInput(new_id("i"), model)))
    assert ready.strategy == "tensor"
    assert ready.strategy_reason == f"tensor: {why}; its 4 attention heads and 4 key/value heads split over 2 nodes"
    assert [(r.strategy, r.world_size, r.layers) for n in nodes for r in n.runners] == [
        ("tensor", 2, LayerRange(0, 4))
    ] * 2


async def test_no_strategy_on_one_node_runs_whole_there(fake_cluster: FakeCluster) -> None:
    node = await fake_cluster.node()
    ready = await until_ready(await serving(fake_cluster))
    assert (ready.strategy, ready.strategy_reason) == ("single", f"whole on node {node.node_id}: the only node online")
    assert [(r.world_size, r.layers) for r in node.runners] == [(1, LayerRange(0, 4))]


async def test_the_api_shows_the_strategy_chosen_and_why(fake_cluster: FakeCluster) -> None:
    for _ in range(2):
        await fake_cluster.node(memory=4 * GIB)
    model = new_model()
    fake_cluster.control.profile = profile(model)
    app = offline_app(fake_cluster.client).app
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as api:
        created = await api.post("/instances", json={"model": model, "strategy": None})
        assert created.status_code == 202, created.text
        assert (created.json()["strategy"], created.json()["strategy_reason"]) == ("auto", None)
        instance_id = created.json()["instance_id"]
        handle = fake_cluster.client.get_workflow_handle(serve_workflow_id(instance_id))
        try:
            await until_ready(handle)
            shown = (await api.get(f"/instances/{instance_id}")).json()
        finally:
            await handle.terminate("the test ended")
    assert shown["strategy"] == "pipeline"
    assert shown["strategy_reason"] == "pipeline: layers weighted by free memory over 2 nodes"


async def test_tensor_asked_for_heads_that_divide_by_no_group_fails_before_any_download(
    fake_cluster: FakeCluster,
) -> None:
    nodes = [await fake_cluster.node(memory=4 * GIB) for _ in range(2)]  # neither holds it whole
    model = new_model()
    fake_cluster.control.profile = replace(profile(model), num_heads=9, num_kv_heads=3)
    handle = await fake_cluster.start_serve(ServeInput(new_id("i"), model, strategy="tensor"))
    error = await failure(handle)
    assert error.type == "placement"
    assert "its 9 attention heads and 3 key/value heads do not split evenly over 2 nodes" in error.message
    assert all(not n.downloads for n in nodes)


async def test_a_model_that_does_not_fit_fails_at_once_saying_why(fake_cluster: FakeCluster) -> None:
    nodes = [await fake_cluster.node(memory=2 * GIB) for _ in range(2)]  # room for one layer each
    model = new_model()
    handle = await serving(fake_cluster, model)
    error = await failure(handle)
    assert error.type == "placement"
    assert error.message == (
        f"{model} does not fit: it needs 4.50 GiB (4 layers of 1.00 GiB plus 0.50 GiB per node), "
        "2 node(s) have 3.40 GiB usable, room for 2 layers"
    )
    assert (await status(handle)).reason == error.message
    assert await state_of(handle) == "failed"
    assert await workflow_clock(handle) < timedelta(seconds=2)
    assert all(not n.downloads for n in nodes)


async def test_a_model_the_hub_does_not_have_fails_at_once(fake_cluster: FakeCluster) -> None:
    await fake_cluster.node()
    model = new_model()  # the control stand-in knows no profile for it
    handle = await fake_cluster.start_serve(ServeInput(new_id("i"), model))
    assert (await failure(handle)).message == f"repo {model} not found (or private: set HF_TOKEN)"
    assert await state_of(handle) == "failed"


async def test_a_runner_lost_is_placed_again_on_the_nodes_left(fake_cluster: FakeCluster) -> None:
    nodes = [await fake_cluster.node() for _ in range(2)]  # 8 GiB: either holds the whole model
    handle = await serving(fake_cluster, heartbeat_timeout_s=HEARTBEAT_S, node_wait_s=NODE_WAIT_S)
    first = await until_ready(handle)
    lost, left = (nodes[0], nodes[1]) if first.shards[1].node_id == nodes[0].node_id else (nodes[1], nodes[0])
    lost.die()
    healed = await until_ready(handle, recoveries=1, timeout=HEARTBEAT_S + 15)
    assert [(s.node_id, s.layer_start, s.layer_end) for s in healed.shards] == [(left.node_id, 0, 4)]
    assert healed.incidents == [f"node {lost.node_id} unavailable: no heartbeat for {HEARTBEAT_S:g} s"]
    assert [r.generation for r in left.stopped] == [1]  # its runner of the first placement was stopped
    assert (left.runners[-1].generation, left.runners[-1].world_size) == (2, 1)
    assert [d.layers for d in left.downloads][-1] == LayerRange(0, 4)  # the files of the layers it now holds
    assert await states_seen(handle) == ["placing", "downloading", "loading", "ready", "recovering", "ready"]


async def test_recoveries_beyond_the_limit_within_the_window_fail(fake_cluster: FakeCluster) -> None:
    node = await fake_cluster.node(runner_lives_s=0.3, download_s=0.1)  # every runner exits soon after it is ready
    handle = await serving(fake_cluster)  # production: 3 recoveries within 3600 s
    error = await failure(handle)
    crash = f"runner 0 on {node.node_id} exited (1): Fatal Python error: Aborted"
    assert error.message == f"gave up after 3 recoveries within 3600 s; last: {crash}"
    final = await status(handle)  # 3 recoveries made; the 4th loss was not recovered
    assert (final.state, final.recoveries, final.incidents) == ("failed", 3, [crash] * 4)
    # what the API shows once it ended
    assert error.details == ({"recoveries": 3, "incidents": [crash] * 4, "carried_over": 0},)
    assert len(node.runners) == 4


class RefusingNode(FakeNode):
    """Its runners cannot load the model: MLX refuses it (as run_shard reports it)."""

    @implements(contracts.run_shard)
    async def run_shard(self, spec: ShardSpec) -> None:
        self.runners.append(spec)
        raise error(ErrorType.BAD_INPUT, f"runner on {self.node_id} cannot load: [rope] dims must be even but got 9.")


async def test_a_model_mlx_refuses_fails_at_once(fake_cluster: FakeCluster) -> None:
    node = await fake_cluster.node(RefusingNode, download_s=0.1)
    handle = await serving(fake_cluster)
    failed = await failure(handle)
    reason = f"runner on {node.node_id} cannot load: [rope] dims must be even but got 9."
    assert (failed.type, failed.message, failed.non_retryable) == ("bad_input", reason, True)
    final = await status(handle)
    assert (final.state, final.recoveries, final.incidents, final.reason) == ("failed", 0, [], reason)
    assert failed.details == ({"recoveries": 0, "incidents": [], "carried_over": 0},)
    assert len(node.runners) == 1  # not retried
    assert await states_seen(handle) == ["placing", "downloading", "loading", "failed"]


async def test_healing_waits_for_room_until_the_recovery_deadline(fake_cluster: FakeCluster) -> None:
    node, model = await fake_cluster.node(), new_model()
    handle = await serving(fake_cluster, model, heartbeat_timeout_s=HEARTBEAT_S, node_wait_s=NODE_WAIT_S)
    await until_ready(handle)
    node.die()  # and never comes back
    started = time.monotonic()
    error = await failure(handle)
    assert error.message == f"could not heal {model} within 1800 s: no node is online"  # production deadline
    # it gives up when the next try would fall past the deadline: within the last back-off (a minute) of it
    assert timedelta(seconds=1800 - 60) < await workflow_clock(handle) < timedelta(seconds=1800 + 30)
    assert time.monotonic() - started < 30  # the clock skipped the waits
    # it tried again with a back-off (1 s doubling to a minute), not in a loop: about 35 tries in 30 minutes
    assert 30 <= fake_cluster.control.placements <= 45, fake_cluster.control.placements


async def test_healing_places_again_once_a_node_is_back(fake_cluster: FakeCluster) -> None:
    node = await fake_cluster.node()
    handle = await serving(fake_cluster, heartbeat_timeout_s=HEARTBEAT_S, node_wait_s=NODE_WAIT_S)
    await until_ready(handle)
    node.die()

    async def waiting() -> bool:
        s = await status(handle)
        return s.state == "recovering" and (s.reason or "").startswith("waiting for room: no node is online")

    await eventually(waiting, HEARTBEAT_S + 10, f"{handle.id} waits for room")
    await node.restart()
    healed = await until_ready(handle, recoveries=1)
    assert [s.node_id for s in healed.shards] == [node.node_id]
    assert node.runners[-1].generation == 2


async def test_cancel_stops_every_runner_and_ends_canceled(fake_cluster: FakeCluster) -> None:
    nodes = [await fake_cluster.node(memory=4 * GIB) for _ in range(2)]
    handle = await serving(fake_cluster)  # production timeouts
    await until_ready(handle)
    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()
    assert isinstance(failed.value.cause, CancelledError)
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    assert await state_of(handle) == "stopped"
    assert [len(n.stopped) for n in nodes] == [1, 1]  # each runner saw the cancel, and stopped
    assert (await status(handle)).endpoint is None


async def test_waits_for_a_download_of_the_same_model_already_running(fake_cluster: FakeCluster) -> None:
    node = await fake_cluster.node(download_s=1.0)
    model = new_model()
    fake_cluster.control.profile = profile(model)
    someone = await fake_cluster.start_download(DownloadInput(node.node_id, model))  # the whole model
    handle = await fake_cluster.start_serve(ServeInput(new_id("i"), model))
    await until_ready(handle)
    assert (await someone.describe()).status == WorkflowExecutionStatus.COMPLETED
    assert [d.layers for d in node.downloads] == [None, LayerRange(0, 4)]  # its own, once the other had ended


async def test_continue_as_new_after_recoveries_carries_its_state(short_history_env: WorkflowEnvironment) -> None:
    async with FakeCluster(short_history_env) as cluster:
        node = await cluster.node()
        handle = await serving(cluster)
        first_run = handle.result_run_id
        await until_ready(handle)
        for recoveries in (1, 2):
            node.crash_runners()
            healed = await until_ready(handle, recoveries)
        crash = f"runner 0 on {node.node_id} exited (1): Fatal Python error: Aborted"
        assert healed.incidents == [crash, crash]
        first = cluster.client.get_workflow_handle(handle.id, run_id=first_run)
        assert (await first.describe()).status == WorkflowExecutionStatus.CONTINUED_AS_NEW
        latest = cluster.client.get_workflow_handle(handle.id)
        assert (await latest.describe()).run_id != first_run
        assert await state_of(latest) == "ready"
        assert [r.generation for r in node.runners] == [1, 2, 3]  # the next run goes on counting placements
