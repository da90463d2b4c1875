"""Reading cluster state out of Temporal: visibility queries and describe(), never the workers."""

from typing import Any

from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import (
    Client,
    WorkflowExecution,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowFailureError,
)
from temporalio.service import RPCError, RPCStatusCode

from api.schemas import DownloadOut, NodeOut, Progress
from shardline import search
from shardline.ids import node_workflow_id
from shardline.types import DownloadProgress, NodeResources


def quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def list_query(kind: str, running_only: bool = False, **equals: str | None) -> str:
    clauses = [f"{search.KIND.name} = {quote(kind)}"]
    names = {
        "node": search.NODE.name,
        "model": search.MODEL.name,
        "state": search.STATE.name,
    }
    clauses += [f"{names[k]} = {quote(v)}" for k, v in equals.items() if v]
    if running_only:
        clauses.append("ExecutionStatus = 'Running'")
    return " AND ".join(clauses)


async def describe(client: Client, workflow_id: str) -> WorkflowExecutionDescription | None:
    try:
        return await client.get_workflow_handle(workflow_id).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return None
        raise


async def heartbeat(client: Client, desc: WorkflowExecutionDescription, as_type: type) -> tuple[Any, Any]:
    """(last heartbeat details, pending activity) of the workflow's one pending activity, if any."""
    for pending in desc.raw_description.pending_activities:
        details = None
        if pending.heartbeat_details.payloads:
            decoded = await client.data_converter.decode(pending.heartbeat_details.payloads, [as_type])
            details = decoded[0] if decoded else None
        return details, pending
    return None, None


def state_of(execution: WorkflowExecution) -> str:
    state = execution.typed_search_attributes.get(search.STATE)
    if execution.status == WorkflowExecutionStatus.RUNNING:
        return state or "running"
    closed = {
        WorkflowExecutionStatus.COMPLETED: "completed",
        WorkflowExecutionStatus.CANCELED: "canceled",
        WorkflowExecutionStatus.TERMINATED: "terminated",
        WorkflowExecutionStatus.TIMED_OUT: "failed",
        WorkflowExecutionStatus.FAILED: "failed",
    }
    # a node's last state (departed) says more than "completed"
    return state if state == "departed" else closed.get(execution.status, state or "unknown")  # type: ignore[arg-type]


async def node_out(client: Client, desc: WorkflowExecutionDescription) -> NodeOut:
    node_id = desc.typed_search_attributes.get(search.NODE) or desc.id.removeprefix("node:")
    resources, _ = await heartbeat(client, desc, NodeResources)
    out = NodeOut(node_id=node_id, state=state_of(desc), workflow_id=desc.id)
    if isinstance(resources, NodeResources):
        out = out.model_copy(update={k: v for k, v in vars(resources).items() if k != "node_id"})
    return out


async def list_nodes(client: Client, include_departed: bool = False) -> list[NodeOut]:
    nodes = []
    async for execution in client.list_workflows(list_query("node", running_only=not include_departed)):
        desc = await describe(client, execution.id)
        if desc is not None and (include_departed or desc.status == WorkflowExecutionStatus.RUNNING):
            nodes.append(await node_out(client, desc))
    return sorted(nodes, key=lambda n: n.node_id)


async def get_node(client: Client, node_id: str) -> NodeOut | None:
    desc = await describe(client, node_workflow_id(node_id))
    return None if desc is None else await node_out(client, desc)


def download_summary(execution: WorkflowExecution) -> DownloadOut:
    attrs = execution.typed_search_attributes
    return DownloadOut(
        workflow_id=execution.id,
        node_id=attrs.get(search.NODE),
        model_id=attrs.get(search.MODEL),
        state=state_of(execution),
        status=execution.status.name if execution.status else "UNKNOWN",
        started_at=execution.start_time.isoformat() if execution.start_time else None,
        closed_at=execution.close_time.isoformat() if execution.close_time else None,
    )


async def list_downloads(client: Client, node: str | None, model: str | None, state: str | None) -> list[DownloadOut]:
    query = list_query("download", node=node, model=model, state=state)
    return [download_summary(e) async for e in client.list_workflows(query)]


def progress_out(p: DownloadProgress) -> Progress:
    percent = 100.0 * p.bytes_done / p.bytes_total if p.bytes_total else 0.0
    return Progress(**vars(p), percent=round(percent, 1))


async def download_detail(client: Client, workflow_id: str) -> DownloadOut | None:
    desc = await describe(client, workflow_id)
    if desc is None:
        return None
    out = download_summary(desc)
    progress, pending = await heartbeat(client, desc, DownloadProgress)
    if pending is not None:
        out.attempt = pending.attempt
        if pending.state == PendingActivityState.PENDING_ACTIVITY_STATE_SCHEDULED and pending.attempt == 1:
            out.state = "waiting for node"
        if pending.last_failure.message:
            out.last_failure = pending.last_failure.message
    if isinstance(progress, DownloadProgress):
        out.progress = progress_out(progress)
    if desc.status in (
        WorkflowExecutionStatus.COMPLETED,
        WorkflowExecutionStatus.FAILED,
    ):
        out.result, out.reason = await outcome(client, workflow_id)
    return out


async def outcome(client: Client, workflow_id: str) -> tuple[dict[str, Any] | None, str | None]:
    """(result, failure reason) of a closed workflow."""
    try:
        result = await client.get_workflow_handle(workflow_id).result()
    except WorkflowFailureError as err:
        cause = err.cause
        return None, getattr(cause, "message", None) or str(cause or err)
    return (vars(result) if hasattr(result, "__dict__") else result), None
