"""ServingWorkflow `serve:<instance>`: place a model, download each node's files, run one shard per node,
and heal: a lost runner stops the rest and the model is placed again on the nodes still online."""

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
    TimeoutError,
    TimeoutType,
    WorkflowAlreadyStartedError,
)

with workflow.unsafe.imports_passed_through():
    from shardline import contracts
    from shardline.errors import ErrorType, cause_message, error, error_type
    from shardline.placement import (
        ModelProfile,
        NodeCapacity,
        Placement,
        PlacementError,
        place,
        place_again,
        planned_bytes,
    )  # fmt: skip
    from shardline.states import InstanceState
    from shardline.types import DRAFT_MAX_BATCH, InspectRequest, LayerRange, RunnerReady, ShardSpec
    from workflows.common import (
        CONTROL_ACTIVITY,
        cancel_requested,
        failure_reason,
        node_activity_options,
        set_state,
    )
    from workflows.download import DOWNLOAD_WAITS, DownloadInput, DownloadWorkflow, wait_until_ended
    from workflows.starts import download_start

T = TypeVar("T")

MAX_INCIDENTS = 10
MAX_PLACE_DELAY_S = 60.0
# ring ports, below the ephemeral ranges of Linux (32768-60999) and macOS (49152-65535): a port taken by some
# outgoing connection would fail the runner's bind and cost a recovery
RING_PORTS = (20000, 32767)
# a runner that cannot load the model itself fails the instance at once (histories from before recovered)
MODEL_REFUSED = "model-refused-fails-at-once"
RUNNER_LIFETIME = timedelta(days=365)  # a runner lives until stopped; its heartbeat says it is alive


@dataclass
class ServeInput:
    instance_id: str
    model_id: str
    strategy: str = "auto"  # auto (chosen at placement) | pipeline | tensor
    nodes: list[str] | None = None
    revision: str | None = None
    node_wait_s: float = 300.0
    heartbeat_timeout_s: float = 30.0
    max_recoveries: int = 3  # within any recovery_window_s: a flaky week is not a broken instance
    recoveries: int = 0  # carried across continue-as-new
    recovery_window_s: float = 3600.0
    recovery_deadline_s: float = 1800.0  # how long healing waits for room (nodes back, memory freed)
    recent_recoveries: list[float] = field(default_factory=list)  # their times (epoch s), carried likewise
    excluded: list[str] = field(default_factory=list)  # nodes just lost: not placed on next time
    incidents: list[str] = field(default_factory=list)  # carried across continue-as-new
    carried_over: int = 0  # likewise
    download_attempts: int = 5  # of each node's download (histories from before it was carried replay with 5)
    draft_tokens: int = 0  # speculative decoding by prompt lookup, drafts a step, for requests that do not say; 0 = off
    draft_max_batch: int = DRAFT_MAX_BATCH  # ... while at most this many requests decode together
    draft_model: str | None = None  # drafts written by this model (downloaded onto rank 0's node), not looked up


@dataclass
class ShardStatus:
    node_id: str
    rank: int
    layer_start: int
    layer_end: int
    ready: bool = False
    planned_bytes: int = 0  # memory it will hold: reserved from other placements until it is ready


@dataclass
class InstanceStatus:
    instance_id: str
    model_id: str
    state: str  # an InstanceState
    strategy: str  # as asked until placed; then what runs: pipeline | tensor, or single (whole on one node)
    shards: list[ShardStatus] = field(default_factory=list)
    endpoint: str | None = None
    recoveries: int = 0
    reason: str | None = None
    error_type: str | None = None  # an ErrorType, once it failed
    incidents: list[str] = field(default_factory=list)  # why each recovery happened, the last few
    secret: str = ""  # what the API sends rank 0's runner (never shown by the API)
    strategy_reason: str = ""  # why that strategy and those nodes, once placed
    carried_over: int = 0  # generations resumed elsewhere (or here, restarted) after a runner of this one was lost
    draft_tokens: int = 0  # as asked (ServeInput)
    draft_max_batch: int = DRAFT_MAX_BATCH
    draft_model: str | None = None


@dataclass
class RunnerLost:
    reason: str
    gone: list[str]  # nodes that went silent: left out of the next placement


def refused(outcomes: list[BaseException | None]) -> str | None:
    """Why a runner could not load the model itself (MLX or mlx-lm refuse it), if one could not."""
    for outcome in outcomes:
        if isinstance(outcome, ActivityError) and error_type(outcome) == ErrorType.BAD_INPUT:
            return cause_message(outcome)
    return None


def recent_recoveries(times: list[float], now: float, window_s: float) -> list[float]:
    """The recoveries within the window before `now`, and this one."""
    return [t for t in times if now - t < window_s] + [now]


@workflow.defn(name="ServingWorkflow")
class ServingWorkflow:
    def __init__(self) -> None:
        self._status = InstanceStatus("", "", InstanceState.PLACING, "pipeline")
        self._ready: dict[int, RunnerReady] = {}
        self._generation = 0
        self._runners: list[workflow.ActivityHandle[None]] = []
        self._recent: list[float] = []
        self._heal_until: datetime | None = None  # while healing: when it gives up
        self._heal_delay = 1.0
        self._draft_bytes = 0  # the draft model's weights, which rank 0's node holds too

    @workflow.run
    async def run(self, inp: ServeInput) -> InstanceStatus:
        self._status = InstanceStatus(inp.instance_id, inp.model_id, InstanceState.PLACING, inp.strategy,
                                      recoveries=inp.recoveries, incidents=list(inp.incidents),
                                      carried_over=inp.carried_over, draft_tokens=inp.draft_tokens,
                                      draft_max_batch=inp.draft_max_batch, draft_model=inp.draft_model)  # fmt: skip
        self._generation = inp.recoveries
        self._recent = list(inp.recent_recoveries)
        try:
            return await self._serve(inp)
        except asyncio.CancelledError:
            await self._stop_runners()
            self._set(InstanceState.STOPPED, "canceled")
            raise
        except (ActivityError, ApplicationError, ChildWorkflowError):
            if not cancel_requested():
                raise
            # whatever a step ended with once a cancel was asked for (a child download that failed, a
            # control call cut short), the person asked to stop: stop the runners and end CANCELED
            await self._stop_runners()
            self._set(InstanceState.STOPPED, "canceled")
            raise asyncio.CancelledError("canceled") from None

    async def _serve(self, inp: ServeInput) -> InstanceStatus:
        profile = await self._control(contracts.inspect_model, InspectRequest(inp.model_id, inp.revision))
        if inp.draft_model:
            draft = await self._control(contracts.inspect_model, InspectRequest(inp.draft_model, None))
            self._draft_bytes = draft.total_bytes
        excluded = list(inp.excluded)
        while True:
            placement = await self._place(inp, profile, excluded)
            if not await self._fetch(inp, placement):
                continue
            await self._run(inp, placement)
            outcomes = await self._stop_runners()
            if (refusal := refused(outcomes)) is not None and workflow.patched(MODEL_REFUSED):
                raise self._failed(ErrorType.BAD_INPUT, refusal)  # the same model fails the same way on any node
            lost = self._lost(inp, placement, outcomes)
            self._status.incidents = [*self._status.incidents, lost.reason][-MAX_INCIDENTS:]
            if workflow.patched("recovery-window"):
                self._recent = recent_recoveries(self._recent, workflow.now().timestamp(), inp.recovery_window_s)
                over = len(self._recent) > inp.max_recoveries
                window = f" within {inp.recovery_window_s:g} s"
            else:
                over, window = self._status.recoveries + 1 > inp.max_recoveries, ""
            if over:  # `recoveries` counts those made: this loss is not recovered
                reason = f"gave up after {inp.max_recoveries} recoveries{window}; last: {lost.reason}"
                raise self._failed(ErrorType.GAVE_UP, reason)
            self._status.recoveries += 1
            self._set(InstanceState.RECOVERING, lost.reason)
            excluded = lost.gone
            if workflow.info().is_continue_as_new_suggested():  # every runner is drained: nothing is orphaned
                workflow.continue_as_new(
                    replace(
                        inp,
                        recoveries=self._status.recoveries,
                        excluded=excluded,
                        incidents=self._status.incidents,
                        carried_over=self._status.carried_over,
                        recent_recoveries=self._recent,
                    )
                )

    async def _control(self, activity: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            return await workflow.execute_activity(activity, args=list(args), **CONTROL_ACTIVITY)
        except ActivityError as err:
            raise self._failed(error_type(err) or ErrorType.TRANSIENT, cause_message(err), err) from err

    async def _place(self, inp: ServeInput, profile: ModelProfile, excluded: list[str]) -> Placement:
        self._set(
            InstanceState.RECOVERING if self._status.recoveries else InstanceState.PLACING, f"placing {inp.model_id}"
        )
        if workflow.patched("heal-waits"):
            placement = await (self._place_again if self._status.recoveries else self._place_first)(
                inp, profile, excluded
            )
            sizes = planned_bytes(profile, placement, self._draft_bytes)
            self._status.shards = [ShardStatus(s.node_id, s.rank, s.layers.start, s.layers.end, planned_bytes=b)
                                   for s, b in zip(placement.shards, sizes, strict=True)]  # fmt: skip
            self._placed(placement)
            return placement
        nodes = await self._control(contracts.online_nodes)
        nodes = [n for n in nodes if n.node_id not in excluded]
        pinned = [n for n in inp.nodes if n not in excluded] if inp.nodes else None  # heal on the rest of them
        try:
            placement = place(profile, nodes, inp.strategy, pinned)
        except PlacementError as err:
            raise self._failed(ErrorType.PLACEMENT, str(err)) from err
        self._status.shards = [ShardStatus(s.node_id, s.rank, s.layers.start, s.layers.end) for s in placement.shards]
        self._placed(placement)
        return placement

    def _placed(self, placement: Placement) -> None:
        """What the status says was chosen, and why (the status only: no command, so histories replay alike)."""
        self._status.strategy, self._status.strategy_reason = placement.strategy, placement.reason

    async def _nodes(self, inp: ServeInput) -> list[NodeCapacity]:
        """Online nodes, less the memory other placements have reserved and not loaded yet."""
        return await self._control(contracts.online_nodes, inp.instance_id)

    async def _place_first(self, inp: ServeInput, profile: ModelProfile, _: list[str]) -> Placement:
        """A new instance that cannot be placed fails at once, saying why: the person is waiting for it."""
        try:
            return place(profile, await self._nodes(inp), inp.strategy, inp.nodes, self._draft_bytes)
        except PlacementError as err:
            raise self._failed(ErrorType.PLACEMENT, str(err)) from err

    async def _place_again(self, inp: ServeInput, profile: ModelProfile, lost: list[str]) -> Placement:
        """Healing waits for room (a restarted node, memory being freed, a stale memory reading)."""
        while True:
            try:
                return place_again(profile, await self._nodes(inp), inp.strategy, inp.nodes, lost, self._draft_bytes)
            except PlacementError as err:
                await self._wait_to_heal(inp, str(err))

    async def _fetch(self, inp: ServeInput, placement: Placement) -> bool:
        """Each node's files. While healing, a node's download that fails (the node was only just lost, and
        looked online) means: wait, and place again; False then."""
        try:
            await self._download(inp, placement)
            return True
        except ChildWorkflowError as err:
            reason = f"a download failed: {getattr(err.cause, 'message', None) or err}"
            if not self._status.recoveries or not workflow.patched("heal-waits"):
                # the download's own type (not found, gated, disk full, node unavailable); no new command
                # (a state upsert) here, so that histories recorded before replay alike
                kind = error_type(err) or ErrorType.TRANSIENT
                self._status.reason, self._status.error_type = reason, kind.value
                raise error(kind, reason, err, non_retryable=True) from err
            await self._wait_to_heal(inp, reason)
            return False

    async def _wait_to_heal(self, inp: ServeInput, reason: str) -> None:
        """Back off (1 s, doubling, at most a minute) before healing tries again; fail past the deadline."""
        if self._heal_until is None:
            self._heal_until = workflow.now() + timedelta(seconds=inp.recovery_deadline_s)
        if workflow.now() + timedelta(seconds=self._heal_delay) > self._heal_until:
            reason = f"could not heal {inp.model_id} within {inp.recovery_deadline_s:g} s: {reason}"
            raise self._failed(ErrorType.PLACEMENT, reason)
        self._set(InstanceState.RECOVERING, f"waiting for room: {reason} (next try in {self._heal_delay:g} s)")
        await workflow.sleep(self._heal_delay)
        self._heal_delay = min(self._heal_delay * 2, MAX_PLACE_DELAY_S)

    async def _download(self, inp: ServeInput, placement: Placement) -> None:
        self._set(InstanceState.RECOVERING if self._status.recoveries else InstanceState.DOWNLOADING,
                  "fetching each node's files")  # fmt: skip
        downloads = [self._download_one(inp, s.node_id, s.layers) for s in placement.shards]
        if inp.draft_model:  # the whole draft model, where rank 0 runs
            first = next(s for s in placement.shards if s.rank == 0)
            downloads.append(self._download_one(inp, first.node_id, None, inp.draft_model))
        await asyncio.gather(*downloads)

    async def _download_one(
        self, inp: ServeInput, node_id: str, layers: LayerRange | None, model_id: str | None = None
    ) -> None:
        model_id = model_id or inp.model_id
        child = DownloadInput(
            node_id=node_id,
            model_id=model_id,
            revision=inp.revision if model_id == inp.model_id else None,
            layers=layers,
            node_wait_s=inp.node_wait_s,
            heartbeat_timeout_s=inp.heartbeat_timeout_s,
            attempts=inp.download_attempts,
        )
        start = download_start(node_id, model_id, for_instance=inp.instance_id)
        workflow_id = start["id"]
        waits = 0
        while True:
            try:
                await workflow.execute_child_workflow(DownloadWorkflow.run, child, **start)
                return
            except WorkflowAlreadyStartedError:
                # someone else's download of the same model: let it finish first, then ours finds its files on disk
                if workflow.patched(DOWNLOAD_WAITS):
                    await wait_until_ended(workflow_id)
                    continue
                await workflow.sleep(5)  # recorded before a serve waited as long as the download ran
                waits += 1
                if waits == 60:
                    break
        reason = f"a download of {model_id} onto {node_id} never finished"
        raise error(ErrorType.TRANSIENT, reason, non_retryable=True)

    async def _run(self, inp: ServeInput, placement: Placement) -> None:
        """Start every rank; return when the first one ends."""
        self._generation += 1
        self._ready = {}
        self._set(InstanceState.RECOVERING if self._status.recoveries else InstanceState.LOADING, "starting runners")
        hosts = [f"{s.host}:{workflow.random().randint(*RING_PORTS)}" for s in placement.shards]
        # a fresh secret for each placement: the runners answer only the API (and whoever reads this history)
        secret = workflow.uuid4().hex if workflow.patched("runner-secret") else ""
        for shard in placement.shards:
            spec = ShardSpec(inp.instance_id, inp.model_id, placement.strategy, shard.rank, len(placement.shards),
                             shard.layers, placement.splits, hosts, self._generation, secret,
                             draft_tokens=inp.draft_tokens, draft_max_batch=inp.draft_max_batch,
                             draft_model=inp.draft_model)  # fmt: skip
            options = node_activity_options(
                shard.node_id, wait_s=inp.node_wait_s, heartbeat_s=inp.heartbeat_timeout_s, run_for=RUNNER_LIFETIME
            )
            self._runners.append(workflow.start_activity(contracts.run_shard, spec, **options))
        size = len(placement.shards)
        await workflow.wait_condition(lambda: len(self._ready) == size or self._any_runner_done())
        if not self._any_runner_done():
            self._status.endpoint = self._ready[0].endpoint
            self._status.secret = secret
            self._heal_until, self._heal_delay = None, 1.0
            self._set(InstanceState.READY, f"serving at {self._status.endpoint}")
            await workflow.wait_condition(self._any_runner_done)

    def _any_runner_done(self) -> bool:
        return any(r.done() for r in self._runners)

    def _lost(self, inp: ServeInput, placement: Placement, outcomes: list[BaseException | None]) -> RunnerLost:
        """Why the ranks stopped. When a node dies the others lose the ring at once, before its own
        heartbeat times out, so look at every rank once all have ended and blame a silent node first."""
        reasons, gone = [], []
        for shard, outcome in zip(placement.shards, outcomes, strict=True):
            if not isinstance(outcome, ActivityError):
                continue
            reason = failure_reason(outcome, shard.node_id, wait_s=inp.node_wait_s, heartbeat_s=inp.heartbeat_timeout_s)
            timeout = outcome.cause.type if isinstance(outcome.cause, TimeoutError) else None
            if timeout in (TimeoutType.HEARTBEAT, TimeoutType.SCHEDULE_TO_START):
                gone.append(shard.node_id)
                reasons.insert(0, reason)
            else:
                reasons.append(reason)
        return RunnerLost(reasons[0] if reasons else "a runner stopped", gone)

    async def _stop_runners(self) -> list[BaseException | None]:
        """Cancel every runner and wait until each has really stopped (and freed its memory);
        what each ended with, in rank order."""
        for runner in self._runners:
            if not runner.done():
                runner.cancel()
        outcomes = await asyncio.gather(*self._runners, return_exceptions=True)
        self._runners = []
        self._status.endpoint = None
        for shard in self._status.shards:
            shard.ready = False
        return [o if isinstance(o, BaseException) else None for o in outcomes]

    @workflow.signal
    def runner_ready(self, ready: RunnerReady) -> None:
        if ready.generation != self._generation:
            return  # a runner of an earlier placement, reporting late
        self._ready[ready.rank] = ready
        for shard in self._status.shards:
            if shard.rank == ready.rank:
                shard.ready = True

    @workflow.signal
    def carried_over(self, count: int) -> None:
        """The API resumed `count` generations that a lost runner of this instance was making."""
        self._status.carried_over += count

    @workflow.query
    def status(self) -> InstanceStatus:
        return self._status

    def _failed(self, kind: ErrorType, reason: str, cause: BaseException | None = None) -> ApplicationError:
        """The instance failed: say so, and return the error that ends the workflow."""
        self._set(InstanceState.FAILED, reason)
        self._status.error_type = kind.value
        # what the API shows of an ended instance, which no longer answers its status query
        last = {"recoveries": self._status.recoveries, "incidents": self._status.incidents,
                "carried_over": self._status.carried_over}  # fmt: skip
        return error(kind, reason, cause, non_retryable=True, details=[last])

    def _set(self, state: InstanceState, details: str) -> None:
        self._status.state = state
        if state in (InstanceState.FAILED, InstanceState.RECOVERING):
            self._status.reason = details
        set_state(state, details)
