"""Kinds of work and the states each can be in: one name per state, the same strings on the wire and in
search attributes (StrEnum members are those strings)."""

from enum import StrEnum


class Kind(StrEnum):
    """What a workflow is, as its `ShardlineKind` search attribute and its id's prefix say."""

    NODE = "node"
    DOWNLOAD = "download"
    DELETE = "delete"
    SERVE = "serve"
    PREVIEW = "preview"  # where a serve would place a model, asked before anything is downloaded


class NodeState(StrEnum):
    STARTING = "starting"
    ONLINE = "online"
    OFFLINE = "offline"
    DEPARTED = "departed"
    UNKNOWN = "unknown"  # it never joined (no presence workflow): what node_state answers


class WorkState(StrEnum):
    """A download's or a delete's state; also what any workflow's closed status reads as."""

    RUNNING = "running"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    TERMINATED = "terminated"
    # the API's words for a running download, never in a search attribute
    WAITING_FOR_NODE = "waiting for node"  # its first attempt is not picked up yet
    CANCELING = "canceling"  # a cancel was asked for; the node has not confirmed it yet


class InstanceState(StrEnum):
    PLACING = "placing"
    DOWNLOADING = "downloading"
    LOADING = "loading"
    READY = "ready"
    RECOVERING = "recovering"
    FAILED = "failed"
    STOPPED = "stopped"
    STARTING = "starting"  # its workflow runs but cannot answer yet (its worker is restarting): the API's word


# the instance states in which its placement holds memory it has not loaded yet
RESERVING = (InstanceState.PLACING, InstanceState.DOWNLOADING, InstanceState.LOADING, InstanceState.RECOVERING)

# how each closed workflow status reads, by its name without "_" in capitals: WorkflowExecutionStatus names
# (TIMED_OUT) and visibility's (TimedOut) both fit. ContinuedAsNew is left out: it carries on under the same id.
CLOSED = {
    "COMPLETED": WorkState.COMPLETED,
    "CANCELED": WorkState.CANCELED,
    "TERMINATED": WorkState.TERMINATED,
    "TIMEDOUT": WorkState.FAILED,
    "FAILED": WorkState.FAILED,
}
# where a kind's end says more than its status: a node's presence completes only when it departed, and a
# canceled instance was stopped
ENDED_AS: dict[tuple[str, str], str] = {
    (Kind.NODE, WorkState.COMPLETED): NodeState.DEPARTED,
    (Kind.SERVE, WorkState.CANCELED): InstanceState.STOPPED,
}


def closed_state(kind: str, status: str) -> str | None:
    """The state a closed workflow of this kind ended in, from its status (`COMPLETED`, `TimedOut`, ...);
    None for a status that is not closed."""
    state = CLOSED.get(status.replace("_", "").upper())
    return None if state is None else ENDED_AS.get((kind, state), state)


def state_of(kind: str, status: str, state: str | None) -> str:
    """A workflow's state from its status and its `ShardlineState` search attribute (`state`): a running one's
    is the attribute; a closed one's, what its status says, unless its last state already said more."""
    if status.upper() == "RUNNING":
        return state or WorkState.RUNNING
    if state == NodeState.DEPARTED:  # a departed node's last run says so however it closed
        return state
    return closed_state(kind, status) or state or NodeState.UNKNOWN
