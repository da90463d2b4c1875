"""Nodes and downloads as the API shows them: read from Temporal, shaped as `api.schemas` (instances as the API
sees them: `api/instances.py`)."""

from typing import Any

from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus, WorkflowFailureError

from api.schemas import DownloadOut, NodeOut, PartialModelOut, Progress
from shardline import search
from shardline.errors import ErrorType, cause_message, error_type
from shardline.states import Kind, WorkState
from shardline.types import DownloadProgress
from workflows import state
from workflows.state import describe, heartbeat, list_query, state_of


def node_out(view: state.NodeView) -> NodeOut:
    out = NodeOut(node_id=view.node_id, state=view.state, workflow_id=view.workflow_id)
    if view.resources is not None:
        fields = {k: v for k, v in vars(view.resources).items() if k not in ("node_id", "partial_models")}
        partial = [PartialModelOut(model=p.model_id, layers=[(r.start, r.end) for r in p.layers])
                   for p in view.resources.partial_models]  # fmt: skip
        out = out.model_copy(update={**fields, "partial_models": partial})
    return out


async def list_nodes(client: Client, include_departed: bool = False) -> list[NodeOut]:
    return [node_out(v) for v in await state.list_nodes(client, include_departed)]


async def get_node(client: Client, node_id: str) -> NodeOut | None:
    view = await state.get_node(client, node_id)
    return None if view is None else node_out(view)


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
    query = list_query(Kind.DOWNLOAD, node=node, model=model, state=state)
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
            out.state = WorkState.WAITING_FOR_NODE
        if pending.last_failure.message:
            out.last_failure = pending.last_failure.message
    if isinstance(progress, DownloadProgress):
        out.progress = progress_out(progress)
    if desc.status in (
        WorkflowExecutionStatus.COMPLETED,
        WorkflowExecutionStatus.FAILED,
    ):
        out.result, out.reason, out.error_type = await outcome(client, workflow_id)
    elif desc.status == WorkflowExecutionStatus.CANCELED:
        # what the node did about the cancel (confirmed, went silent, had finished), as the workflow wrote it
        out.reason = (await desc.memo()).get("reason") or WorkState.CANCELED
        out.error_type = ErrorType.CANCELED
    return out


async def outcome(client: Client, workflow_id: str) -> tuple[dict[str, Any] | None, str | None, ErrorType | None]:
    """(result, failure reason, failure type) of a closed workflow; the type is None for a failure recorded
    before failures had types."""
    try:
        result = await client.get_workflow_handle(workflow_id).result()
    except WorkflowFailureError as err:
        return None, cause_message(err), error_type(err)
    return (vars(result) if hasattr(result, "__dict__") else result), None, None
