"""Stand-ins for nodes, and for the control worker's reads of the cluster, that let the real workflows run
in-process under time skipping: registered under the real activity names, on the real task queues.

A FakeNode reports itself, downloads, deletes and runs shards, heartbeating all the while, so that a cancel
reaches it at its next heartbeat, as the real activities do. freeze() is a node that hangs (it keeps taking
work but never heartbeats again), die() a power cut (it also stops polling), restart() the same node back,
as itself. A FailingNode fails its next attempts with typed ApplicationErrors. FakeControl answers
`online_nodes`, `node_state`, `model_users`, `inspect_model` and `wait_workflow_end` from the fake nodes and
what the test chose. FakeCluster runs every workflow on the control queue, and ends what a test started.
"""

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Self

from temporalio import activity
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import WorkflowIDReusePolicy
from temporalio.converter import decode_typed_search_attributes
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from shardline import contracts, search
from shardline.contracts import implements
from shardline.errors import ErrorType, error
from shardline.ids import (
    CONTROL_QUEUE,
    delete_workflow_id,
    download_workflow_id,
    node_queue,
    node_workflow_id,
    serve_workflow_id,
)
from shardline.placement import ModelProfile, NodeCapacity
from shardline.types import (
    DeleteRequest,
    DeleteResult,
    DownloadProgress,
    DownloadRequest,
    DownloadResult,
    InspectRequest,
    NodeResources,
    PresenceInput,
    RunnerReady,
    ShardSpec,
)
from tests.support.waits import eventually
from workers.control import WORKFLOWS
from workflows.delete import DeleteInput, DeleteModelWorkflow
from workflows.download import DownloadInput, DownloadWorkflow
from workflows.node import NodeInput, NodeWorkflow
from workflows.serve import ServeInput, ServingWorkflow

GIB = 2**30
# The server enforces an activity's heartbeat and schedule-to-start timeouts in real time: time skipping moves
# a workflow's clock only while nothing of it is in flight (a 30 s heartbeat timeout takes 30 s). Tests that
# wait for one of those pass these; every timer (backoffs, heal waits, deadlines, windows) keeps its
# production value and runs on the skipped clock.
HEARTBEAT_S = 3.0
NODE_WAIT_S = 3.0
TICK = 0.1  # seconds between a stand-in's heartbeats (the SDK sends at most one per throttle interval)
# production sends a heartbeat at most every 2 s (workers/node.py); a cancel reaches a node at its next one
THROTTLE = timedelta(seconds=0.5)
FILE_BYTES = 1 << 20


def new_id(prefix: str = "n") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def new_model() -> str:
    return f"test-org/m{uuid.uuid4().hex[:8]}"


def model_files(layers: int, start: int = 0, end: int | None = None) -> list[str]:
    """The files a layer range [start, end) needs: one weight file per layer here, and the config."""
    return ["config.json", *(f"layer-{i}.safetensors" for i in range(start, layers if end is None else end))]


@dataclass
class _Life:
    """One run of a node's process: its activities stop heartbeating together when it goes silent."""

    worker: Worker
    task: asyncio.Task[None]
    silent: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: asyncio.Task[None] | None = None


class FakeNode:
    """A node that heartbeats, and honours cancellation through its heartbeats."""

    def __init__(
        self,
        client: Client,
        node_id: str | None = None,
        *,
        memory: int = 8 * GIB,
        layers: int = 4,
        download_s: float = 0.3,
        lease_s: float | None = None,
        runner_lives_s: float | None = None,
        models: list[str] | None = None,
    ) -> None:
        self.client = client
        self.node_id = node_id or new_id()
        self.memory = memory
        self.host = "127.0.0.1"
        self.layers = layers  # of every model, for the files a layer range needs
        self.download_s = download_s  # how long a download takes (real seconds: an activity is in flight)
        self.lease_s = lease_s  # presence returns after this long; None: the lease the workflow asks for (1 h)
        self.runner_lives_s = runner_lives_s  # a runner exits after this long; None: until it is stopped
        self.models = set(models or [])  # on disk
        self.presence_runs = 0
        self.downloads: list[DownloadRequest] = []  # every attempt, in order
        self.deletes: list[DeleteRequest] = []
        self.runners: list[ShardSpec] = []
        self.stopped: list[ShardSpec] = []  # runners that saw their cancel, and stopped
        self.canceled: list[str] = []  # activities (by name) that saw their cancel
        self._lives: list[_Life] = []
        self._crash: list[asyncio.Event] = []  # one per running runner
        self._closed = asyncio.Event()

    # -- the node's process ---------------------------------------------------------------------------------

    async def start(self) -> Self:
        worker = Worker(
            self.client,
            task_queue=node_queue(self.node_id),
            activities=[self.node_presence, self.download_model, self.delete_model, self.run_shard],
            max_concurrent_activities=100,
            max_heartbeat_throttle_interval=THROTTLE,
            default_heartbeat_throttle_interval=THROTTLE,
            # die() stops polling without ending what runs: a dead machine reports nothing, the server times it out
            graceful_shutdown_timeout=timedelta(hours=1),
        )
        self._lives.append(_Life(worker, asyncio.create_task(worker.run())))
        return self

    @property
    def alive(self) -> bool:
        """Its process runs and heartbeats (what its presence would tell the cluster)."""
        return bool(self._lives) and self._lives[-1].stopping is None and not self._lives[-1].silent.is_set()

    def freeze(self) -> None:
        """Hang: the node keeps taking work but never heartbeats again (a wedged process, a disk that blocks)."""
        self._lives[-1].silent.set()

    def die(self) -> None:
        """A power cut: no heartbeat from what runs, no new work taken; the server times its work out."""
        life = self._lives[-1]
        life.silent.set()
        life.stopping = asyncio.create_task(life.worker.shutdown())

    async def restart(self) -> Self:
        """The same node back, as itself (what ran before the cut is gone)."""
        return await self.start()

    def crash_runners(self) -> None:
        """Every runner running here exits, as a runner process that died would."""
        for crash in self._crash:
            crash.set()

    async def close(self) -> None:
        self._closed.set()
        for life in self._lives:
            await (life.stopping or life.worker.shutdown())
            await life.task

    def resources(self) -> NodeResources:
        return NodeResources(self.node_id, f"host-{self.node_id}", "cpu", "fake", self.memory, self.memory, 100 * GIB,
                             sorted(self.models), self.host)  # fmt: skip

    # -- activities, under their real names ------------------------------------------------------------------

    @implements(contracts.node_presence)
    async def node_presence(self, inp: PresenceInput) -> None:
        life = self._lives[-1]
        self._maybe_fail()
        info = activity.info()
        workflow = self.client.get_workflow_handle(info.workflow_id, run_id=info.workflow_run_id)
        await workflow.signal(NodeWorkflow.online, self.resources())
        self.presence_runs += 1
        await self._heartbeat_for(life, "node_presence", inp.lease_s if self.lease_s is None else self.lease_s)

    @implements(contracts.download_model)
    async def download_model(self, req: DownloadRequest) -> DownloadResult:
        life = self._lives[-1]
        self.downloads.append(req)
        self._maybe_fail()
        files = model_files(self.layers, *((req.layers.start, req.layers.end) if req.layers else ()))
        total = len(files) * FILE_BYTES
        steps = max(1, round(self.download_s / TICK))
        for step in range(steps):
            done = total * step // steps
            await self._beat(life, DownloadProgress("downloading", done, total, len(files) * step // steps, len(files)))
            await self._sleep(life, "download_model", TICK)
        self.models.add(req.model_id)
        return DownloadResult(req.model_id, f"/models/{req.model_id}", files, total, total, self.download_s)

    @implements(contracts.delete_model)
    async def delete_model(self, req: DeleteRequest) -> DeleteResult:
        life = self._lives[-1]
        self.deletes.append(req)
        self._maybe_fail()
        await self._beat(life, "deleting")
        removed = req.model_id in self.models
        self.models.discard(req.model_id)
        return DeleteResult(removed, self.layers * FILE_BYTES if removed else 0)

    @implements(contracts.run_shard)
    async def run_shard(self, spec: ShardSpec) -> None:
        life = self._lives[-1]
        self._maybe_fail()
        self.runners.append(spec)
        info = activity.info()
        endpoint = f"http://{self.host}:{18000 + spec.rank}" if spec.rank == 0 else None
        ready = RunnerReady(spec.instance_id, spec.rank, self.node_id, endpoint, spec.generation, FILE_BYTES)
        workflow = self.client.get_workflow_handle(info.workflow_id, run_id=info.workflow_run_id)
        await workflow.signal(ServingWorkflow.runner_ready, ready)  # as the real one, once its runner loaded
        crash = asyncio.Event()
        self._crash.append(crash)
        lives = asyncio.create_task(asyncio.sleep(self.runner_lives_s if self.runner_lives_s is not None else 1e9))
        try:
            while not (crash.is_set() or lives.done()):
                await self._beat(life, "serving")
                await self._sleep(life, "run_shard", TICK)
            raise error(
                ErrorType.RUNNER_FAILED, f"runner {spec.rank} on {self.node_id} exited (1): Fatal Python error: Aborted"
            )
        except asyncio.CancelledError:
            if not life.silent.is_set():
                self.stopped.append(spec)
            raise
        finally:
            lives.cancel()
            self._crash.remove(crash)

    # -- how its activities behave ---------------------------------------------------------------------------

    def _maybe_fail(self) -> None:
        """Here a FailingNode fails an attempt."""

    async def _beat(self, life: _Life, *details: Any) -> None:
        """One heartbeat; a silent node hangs here instead, as a dead machine would."""
        if life.silent.is_set() or self._closed.is_set():
            await self._hang()
        activity.heartbeat(*details)

    async def _sleep(self, life: _Life, name: str, seconds: float) -> None:
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            if life.silent.is_set():
                await self._hang()
            self.canceled.append(name)
            raise

    async def _hang(self) -> None:
        """Hear nothing, not even a cancel (the SDK delivers one a heartbeat sent just before brought back, and
        cancels the work itself once the server gave up on it), until the test ends."""
        while not self._closed.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await self._closed.wait()
        raise ApplicationError("the test ended", non_retryable=True)

    async def _heartbeat_for(self, life: _Life, name: str, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while loop.time() < deadline and not self._closed.is_set():
            await self._beat(life, self.resources())
            await self._sleep(life, name, TICK)


class FailingNode(FakeNode):
    """A node whose next attempts (of any of its activities) fail with these errors, in order; then it works."""

    def __init__(self, client: Client, errors: list[ApplicationError], **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self.errors = list(errors)

    def _maybe_fail(self) -> None:
        if self.errors:
            raise self.errors.pop(0)


class LostDispatchNode(FakeNode):
    """Alive, but on an overloaded server: its first download attempt went to a poll it no longer acted on (no
    heartbeat ever), and its presence heartbeat was late under the same load, so it reads offline for its next
    `offline_reads` state checks (`None`: it never comes back)."""

    def __init__(self, client: Client, offline_reads: int | None = 2, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self.offline_reads = offline_reads
        self.state_reads = 0

    @property
    def alive(self) -> bool:
        if self.downloads and (self.offline_reads is None or self.state_reads < self.offline_reads):
            self.state_reads += 1
            return False
        return super().alive

    @implements(contracts.download_model)
    async def download_model(self, req: DownloadRequest) -> DownloadResult:
        if not self.downloads:
            self.downloads.append(req)
            await self._hang()
        return await super().download_model(req)


class FakeControl:
    """The control worker's reads of the cluster: the nodes alive are online with their memory; the model's
    profile, and who uses a model, are what the test chose."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.nodes: list[FakeNode] = []
        self.profile: ModelProfile | None = None
        self.users: list[str] = []
        self.placements = 0  # online_nodes calls for a serve (each try to place)

    def activities(self) -> list[Callable[..., Any]]:
        return [self.online_nodes, self.node_state, self.model_users, self.inspect_model, self.wait_workflow_end]

    @implements(contracts.online_nodes)
    async def online_nodes(self, asking: str = "") -> list[NodeCapacity]:
        self.placements += bool(asking)
        return [NodeCapacity(n.node_id, n.memory, n.host) for n in self.nodes if n.alive]

    @implements(contracts.node_state)
    async def node_state(self, node_id: str) -> str:
        node = next((n for n in self.nodes if n.node_id == node_id), None)
        return "unknown" if node is None else "online" if node.alive else "offline"

    @implements(contracts.model_users)
    async def model_users(self, req: DeleteRequest) -> list[str]:
        return list(self.users)

    @implements(contracts.inspect_model)
    async def inspect_model(self, req: InspectRequest) -> ModelProfile:
        if self.profile is None or self.profile.model_id != req.model_id:
            raise error(ErrorType.NOT_FOUND, f"repo {req.model_id} not found (or private: set HF_TOKEN)")
        return self.profile

    @implements(contracts.wait_workflow_end)
    async def wait_workflow_end(self, workflow_id: str) -> str:
        handle = self.client.get_workflow_handle(workflow_id)
        while True:
            try:
                status = (await handle.describe()).status
            except RPCError:
                return "NOT_FOUND"
            if status != WorkflowExecutionStatus.RUNNING:
                return status.name if status else "UNKNOWN"
            activity.heartbeat()
            await asyncio.sleep(TICK)


class FakeCluster:
    """Every workflow on the control queue with FakeControl's activities, and fake nodes, in this process.
    What a test started is terminated when it ends, so that no test sees another's work."""

    def __init__(self, env: WorkflowEnvironment) -> None:
        self.env = env
        self.client = env.client  # starts every workflow with time skipping on
        self.control = FakeControl(self.client)
        self._worker = Worker(self.client, task_queue=CONTROL_QUEUE, workflows=WORKFLOWS,
                              activities=self.control.activities())  # fmt: skip
        self._task: asyncio.Task[None] | None = None
        self._started: list[WorkflowHandle[Any, Any]] = []

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._worker.run())
        return self

    async def __aexit__(self, *_: object) -> None:
        for handle in self._started:
            try:
                if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
                    await handle.terminate("the test ended")
            except RPCError:
                pass
        for node in self.control.nodes:
            await node.close()
        await self._worker.shutdown()
        if self._task:
            await self._task

    async def node(self, kind: type[FakeNode] = FakeNode, *, start: bool = True, **kwargs: Any) -> FakeNode:
        """A fresh node (a new id), known to the control stand-ins; running unless `start` is False."""
        node = kind(self.client, **kwargs)
        self.control.nodes.append(node)
        return await node.start() if start else node

    def _track(self, handle: WorkflowHandle[Any, Any]) -> WorkflowHandle[Any, Any]:
        self._started.append(handle)
        return handle

    async def start_node(self, inp: NodeInput) -> WorkflowHandle[NodeWorkflow, Any]:
        return self._track(await self.client.start_workflow(
            NodeWorkflow.run, inp, id=node_workflow_id(inp.node_id), task_queue=CONTROL_QUEUE,
            search_attributes=search.attributes("node", "starting", node=inp.node_id),
        ))  # fmt: skip

    async def start_download(self, inp: DownloadInput) -> WorkflowHandle[DownloadWorkflow, DownloadResult]:
        return self._track(await self.client.start_workflow(
            DownloadWorkflow.run, inp, id=download_workflow_id(inp.node_id, inp.model_id), task_queue=CONTROL_QUEUE,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            search_attributes=search.attributes("download", "running", node=inp.node_id, model=inp.model_id),
        ))  # fmt: skip

    async def start_delete(self, inp: DeleteInput) -> WorkflowHandle[DeleteModelWorkflow, DeleteResult]:
        return self._track(await self.client.start_workflow(
            DeleteModelWorkflow.run, inp, id=delete_workflow_id(inp.node_id, inp.model_id), task_queue=CONTROL_QUEUE,
            search_attributes=search.attributes("delete", "running", node=inp.node_id, model=inp.model_id),
        ))  # fmt: skip

    async def start_serve(self, inp: ServeInput) -> WorkflowHandle[ServingWorkflow, Any]:
        return self._track(await self.client.start_workflow(
            ServingWorkflow.run, inp, id=serve_workflow_id(inp.instance_id), task_queue=CONTROL_QUEUE,
            search_attributes=search.attributes("serve", "placing", model=inp.model_id),
        ))  # fmt: skip


# -- what a user sees of a workflow ------------------------------------------------------------------------------


async def state_of(handle: WorkflowHandle[Any, Any]) -> str | None:
    """Its ShardlineState search attribute (what `temporal workflow list --query` and the API read)."""
    return (await handle.describe()).typed_search_attributes.get(search.STATE)


async def until_state(handle: WorkflowHandle[Any, Any], state: str, timeout: float = 10.0) -> None:
    async def probe() -> bool:
        return await state_of(handle) == state

    await eventually(probe, timeout, f"{handle.id} {state}")


async def details_of(handle: WorkflowHandle[Any, Any]) -> str:
    """Its current details, as the Temporal UI shows them."""
    meta = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    return str(meta.current_details)


async def workflow_clock(handle: WorkflowHandle[Any, Any]) -> timedelta:
    """How long a closed workflow ran on its own clock, the one time skipping moves."""
    desc = await handle.describe()
    assert desc.close_time is not None, f"{handle.id} still runs"
    return desc.close_time - desc.start_time


async def states_seen(handle: WorkflowHandle[Any, Any]) -> list[str]:
    """Every ShardlineState the workflow run set, in order (repeats dropped): what a user watching it saw."""
    seen: list[str] = []
    async for event in handle.fetch_history_events():
        if event.HasField("upsert_workflow_search_attributes_event_attributes"):
            fields = event.upsert_workflow_search_attributes_event_attributes.search_attributes
            state = decode_typed_search_attributes(fields).get(search.STATE)
            if state and seen[-1:] != [state]:
                seen.append(state)
    return seen
