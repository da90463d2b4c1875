"""NodeWorkflow `node:<id>`: a node's presence, online -> offline -> departed."""

from dataclasses import dataclass
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, TimeoutError, TimeoutType

with workflow.unsafe.imports_passed_through():
    from shardline import contracts
    from shardline.errors import cause_message
    from shardline.states import NodeState
    from shardline.types import NodeResources, PresenceInput
    from workflows.common import node_activity_options, set_state

# The presence activity returns after this long, so history grows by a few events per lease.
PRESENCE_LEASE = timedelta(hours=1)
# histories recorded before presence backed off replay without its timers
PRESENCE_BACKOFF = "presence-backoff"
BACKOFF_MIN_S, BACKOFF_MAX_S = 1.0, 60.0
HEALTHY_RUN_S = 60.0  # a presence that ran this long was healthy: the next failure starts the backoff over


def presence_backoff(previous_s: float, lasted_s: float) -> float:
    """Seconds to wait before presence runs again after the node failed it: exponential from 1 s to 60 s
    while it keeps failing fast (a disk unplugged), nothing after a healthy run."""
    if lasted_s >= HEALTHY_RUN_S:
        return 0.0
    return min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, previous_s * 2))


@dataclass
class NodeInput:
    node_id: str
    heartbeat_timeout_s: float = 30.0
    grace_s: float = 600.0


@dataclass
class NodeStatus:
    node_id: str
    state: NodeState
    resources: NodeResources | None = None
    boots: int = 0


@workflow.defn(name="NodeWorkflow")
class NodeWorkflow:
    def __init__(self) -> None:
        self._status = NodeStatus(node_id="", state=NodeState.STARTING)

    @workflow.run
    async def run(self, inp: NodeInput) -> NodeStatus:
        self._status.node_id = inp.node_id
        options = node_activity_options(
            inp.node_id,
            wait_s=inp.grace_s,
            heartbeat_s=inp.heartbeat_timeout_s,
            run_for=PRESENCE_LEASE + timedelta(minutes=5),
        )
        presence = PresenceInput(
            node_id=inp.node_id,
            report_every_s=max(0.5, inp.heartbeat_timeout_s / 4),
            lease_s=PRESENCE_LEASE.total_seconds(),
        )
        backoff = 0.0
        while True:
            started = workflow.now()
            try:
                await workflow.execute_activity(contracts.node_presence, presence, **options)
            except ActivityError as err:
                if isinstance(err.cause, TimeoutError) and err.cause.type == TimeoutType.SCHEDULE_TO_START:
                    self._set(NodeState.DEPARTED, f"offline for more than {inp.grace_s:g} s")
                    return self._status
                if isinstance(err.cause, TimeoutError) or not workflow.patched(PRESENCE_BACKOFF):
                    self._set(NodeState.OFFLINE, f"no heartbeat for {inp.heartbeat_timeout_s:g} s")
                else:  # the node ran presence and it failed: waiting is what bounds a fast failure
                    backoff = presence_backoff(backoff, (workflow.now() - started).total_seconds())
                    reason = cause_message(err)
                    self._set(NodeState.OFFLINE, f"presence failed on the node ({reason}); again in {backoff:g} s")
                    if backoff:
                        await workflow.sleep(backoff)
            if workflow.info().is_continue_as_new_suggested():
                workflow.continue_as_new(inp)  # nothing is running here: presence just ended

    @workflow.signal
    def online(self, resources: NodeResources) -> None:
        self._status.resources = resources
        self._status.boots += 1
        self._set(NodeState.ONLINE, f"{resources.hostname} {resources.backend}")

    @workflow.query
    def status(self) -> NodeStatus:
        return self._status

    def _set(self, state: NodeState, details: str) -> None:
        self._status.state = state
        set_state(state, details)
