"""ServingWorkflow `serve:<instance>`: place a model, download each node's files, run one shard per node,
and heal: a lost runner stops the rest and the model is placed again on the nodes still online."""

import asyncio
from dataclasses import dataclass, field, replace
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    TimeoutError,
    TimeoutType,
    WorkflowAlreadyStartedError,
)

with workflow.unsafe.imports_passed_through():
    from shardline import search
    from shardline.ids import CONTROL_QUEUE, download_workflow_id
    from shardline.placement import ModelProfile, NodeCapacity, Placement, PlacementError, place
    from shardline.types import InspectRequest, RunnerReady, ShardSpec
    from workflows.common import failure_reason, node_activity_options, set_state
    from workflows.download import DownloadInput, DownloadWorkflow

CONTROL_ACTIVITY = {
    "task_queue": CONTROL_QUEUE,
    "start_to_close_timeout": timedelta(minutes=2),
    "retry_policy": RetryPolicy(maximum_attempts=3, non_retryable_error_types=["bad_input", "not_found", "gated"]),
}
RUNNER_LIFETIME = timedelta(days=365)  # a runner lives until stopped; its heartbeat says it is alive


@dataclass
class ServeInput:
    instance_id: str
    model_id: str
    strategy: str = "pipeline"
    nodes: list[str] | None = None
    revision: str | None = None
    node_wait_s: float = 300.0
    heartbeat_timeout_s: float = 30.0
    max_recoveries: int = 3
    recoveries: int = 0  # carried across continue-as-new
    excluded: list[str] = field(default_factory=list)  # nodes just lost: not placed on next time


@dataclass
class ShardStatus:
    node_id: str
    rank: int
    layer_start: int
    layer_end: int
    ready: bool = False


@dataclass
class InstanceStatus:
    instance_id: str
    model_id: str
    state: str  # placing | downloading | loading | ready | recovering | failed | stopped
    strategy: str
    shards: list[ShardStatus] = field(default_factory=list)
    endpoint: str | None = None
    recoveries: int = 0
    reason: str | None = None


class RunnerLost(Exception):
    def __init__(self, node_id: str, reason: str, node_gone: bool) -> None:
        super().__init__(reason)
        self.node_id, self.reason, self.node_gone = node_id, reason, node_gone


@workflow.defn(name="ServingWorkflow")
class ServingWorkflow:
    def __init__(self) -> None:
        self._status = InstanceStatus("", "", "placing", "pipeline")
        self._ready: dict[int, RunnerReady] = {}
        self._generation = 0
        self._runners: list[workflow.ActivityHandle[None]] = []

    @workflow.run
    async def run(self, inp: ServeInput) -> InstanceStatus:
        self._status = InstanceStatus(inp.instance_id, inp.model_id, "placing", inp.strategy, recoveries=inp.recoveries)
        self._generation = inp.recoveries
        try:
            return await self._serve(inp)
        except asyncio.CancelledError:
            await self._stop_runners()
            self._set("stopped", "canceled")
            raise

    async def _serve(self, inp: ServeInput) -> InstanceStatus:
        profile = await self._control("inspect_model", InspectRequest(inp.model_id, inp.revision), ModelProfile)
        excluded = list(inp.excluded)
        while True:
            placement = await self._place(inp, profile, excluded)
            await self._download(inp, placement)
            lost = await self._run(inp, placement)
            await self._stop_runners()
            self._status.recoveries += 1
            if self._status.recoveries > inp.max_recoveries:
                reason = f"gave up after {inp.max_recoveries} recoveries; last: {lost.reason}"
                self._set("failed", reason)
                raise ApplicationError(reason, non_retryable=True)
            self._set("recovering", lost.reason)
            excluded = [lost.node_id] if lost.node_gone else []
            if workflow.info().is_continue_as_new_suggested():  # every runner is drained: nothing is orphaned
                workflow.continue_as_new(replace(inp, recoveries=self._status.recoveries, excluded=excluded))

    async def _control(self, activity: str, arg: object, result_type: type) -> object:
        try:
            return await workflow.execute_activity(activity, arg, result_type=result_type, **CONTROL_ACTIVITY)
        except ActivityError as err:
            reason = getattr(err.cause, "message", None) or str(err.cause or err)
            self._set("failed", reason)
            raise ApplicationError(reason, non_retryable=True) from err

    async def _place(self, inp: ServeInput, profile: ModelProfile, excluded: list[str]) -> Placement:
        self._set("placing" if not self._status.recoveries else "recovering", f"placing {inp.model_id}")
        nodes = await self._control("online_nodes", None, list[NodeCapacity])
        nodes = [n for n in nodes if n.node_id not in excluded]  # type: ignore[attr-defined]
        try:
            placement = place(profile, nodes, inp.strategy, inp.nodes)  # type: ignore[arg-type]
        except PlacementError as err:
            self._set("failed", str(err))
            raise ApplicationError(str(err), type="placement", non_retryable=True) from err
        self._status.shards = [ShardStatus(s.node_id, s.rank, s.layers.start, s.layers.end) for s in placement.shards]
        return placement

    async def _download(self, inp: ServeInput, placement: Placement) -> None:
        self._set("downloading" if not self._status.recoveries else "recovering", "fetching each node's files")
        await asyncio.gather(*(self._download_one(inp, s.node_id, s.layers) for s in placement.shards))

    async def _download_one(self, inp: ServeInput, node_id: str, layers: object) -> None:
        child = DownloadInput(node_id, inp.model_id, inp.revision, layers, inp.node_wait_s, inp.heartbeat_timeout_s)  # type: ignore[arg-type]
        for _ in range(60):
            try:
                await workflow.execute_child_workflow(
                    DownloadWorkflow.run,
                    child,
                    id=download_workflow_id(node_id, inp.model_id),
                    task_queue=CONTROL_QUEUE,
                    id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                    search_attributes=search.attributes("download", "running", node=node_id, model=inp.model_id),
                    static_summary=f"Download {inp.model_id} onto {node_id} for {inp.instance_id}",
                )
                return
            except WorkflowAlreadyStartedError:
                await workflow.sleep(5)  # someone else's download of the same model: let it finish first
        raise ApplicationError(f"a download of {inp.model_id} onto {node_id} never finished", non_retryable=True)

    async def _run(self, inp: ServeInput, placement: Placement) -> RunnerLost:
        self._generation += 1
        self._ready = {}
        self._set("loading" if not self._status.recoveries else "recovering", "starting runners")
        hosts = [f"{s.host}:{workflow.random().randint(20000, 60000)}" for s in placement.shards]
        for shard in placement.shards:
            spec = ShardSpec(inp.instance_id, inp.model_id, placement.strategy, shard.rank, len(placement.shards),
                             shard.layers, placement.splits, hosts, self._generation)  # fmt: skip
            options = node_activity_options(
                shard.node_id, wait_s=inp.node_wait_s, heartbeat_s=inp.heartbeat_timeout_s, run_for=RUNNER_LIFETIME
            )
            self._runners.append(workflow.start_activity("run_shard", spec, **options))
        size = len(placement.shards)
        await workflow.wait_condition(lambda: len(self._ready) == size or self._any_runner_done())
        if not self._any_runner_done():
            self._status.endpoint = self._ready[0].endpoint
            self._set("ready", f"serving at {self._status.endpoint}")
            await workflow.wait_condition(self._any_runner_done)
        return self._lost(inp, placement)

    def _any_runner_done(self) -> bool:
        return any(r.done() for r in self._runners)

    def _lost(self, inp: ServeInput, placement: Placement) -> RunnerLost:
        rank = next(i for i, r in enumerate(self._runners) if r.done())
        node_id = placement.shards[rank].node_id
        err = self._runners[rank].exception()
        if not isinstance(err, ActivityError):
            return RunnerLost(node_id, f"runner {rank} on {node_id} stopped", node_gone=False)
        reason = failure_reason(err, node_id, wait_s=inp.node_wait_s, heartbeat_s=inp.heartbeat_timeout_s)
        gone = isinstance(err.cause, TimeoutError) and err.cause.type in (
            TimeoutType.HEARTBEAT,
            TimeoutType.SCHEDULE_TO_START,
        )
        return RunnerLost(node_id, reason, node_gone=gone)

    async def _stop_runners(self) -> None:
        """Cancel every runner and wait until each has really stopped (and freed its memory)."""
        for runner in self._runners:
            if not runner.done():
                runner.cancel()
        await asyncio.gather(*self._runners, return_exceptions=True)
        self._runners = []
        self._status.endpoint = None
        for shard in self._status.shards:
            shard.ready = False

    @workflow.signal
    def runner_ready(self, ready: RunnerReady) -> None:
        if ready.generation != self._generation:
            return  # a runner of an earlier placement, reporting late
        self._ready[ready.rank] = ready
        for shard in self._status.shards:
            if shard.rank == ready.rank:
                shard.ready = True

    @workflow.query
    def status(self) -> InstanceStatus:
        return self._status

    def _set(self, state: str, details: str) -> None:
        self._status.state = state
        if state in ("failed", "recovering"):
            self._status.reason = details
        set_state(state, details)
