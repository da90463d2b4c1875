"""The client side of shardline's workflows: start, signal, query and cancel them, with keyword inputs.
The API, the node worker, the activities, tests and benchmarks all go through here; the workflow
definitions never import it (import-linter)."""

import asyncio
import contextlib
from datetime import timedelta

from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy

from shardline.ids import new_instance_id, serve_workflow_id
from shardline.types import DeleteResult, DownloadResult
from workflows.delete import DeleteInput, DeleteModelWorkflow
from workflows.download import DownloadInput, DownloadWorkflow
from workflows.node import NodeInput, NodeStatus, NodeWorkflow
from workflows.preview import Preview, PreviewInput, PreviewWorkflow
from workflows.serve import InstanceStatus, ServeInput, ServingWorkflow
from workflows.starts import delete_start, download_start, node_start, preview_start, serve_start


async def start_download(client: Client, inp: DownloadInput) -> WorkflowHandle[DownloadWorkflow, DownloadResult]:
    """Start the download, or join the one running. A request for the whole model (no layer range) that
    meets a running download of one layer range (a serve's) makes it fetch the rest of the model too."""
    return await client.start_workflow(
        DownloadWorkflow.run,
        inp,
        **download_start(inp.node_id, inp.model_id),
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        start_signal=DownloadWorkflow.whole_model.__name__ if inp.layers is None else None,
    )


async def start_delete(client: Client, inp: DeleteInput) -> WorkflowHandle[DeleteModelWorkflow, DeleteResult]:
    """Start the delete, or join the one running."""
    return await client.start_workflow(
        DeleteModelWorkflow.run,
        inp,
        **delete_start(inp.node_id, inp.model_id),
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )


async def start_serving(client: Client, inp: ServeInput) -> WorkflowHandle[ServingWorkflow, InstanceStatus]:
    return await client.start_workflow(
        ServingWorkflow.run, inp, **serve_start(inp.instance_id, inp.model_id, inp.strategy)
    )


async def preview(client: Client, inp: PreviewInput) -> Preview:
    """Where a serve of the model would go now, and why (or why it does not fit); raises as the preview fails
    (the model not found, gated, not a model)."""
    return await client.execute_workflow(
        PreviewWorkflow.run, inp, **preview_start(new_instance_id(inp.model_id), inp.model_id)
    )


async def start_node(
    client: Client, inp: NodeInput, rpc_timeout: timedelta | None = None
) -> WorkflowHandle[NodeWorkflow, NodeStatus]:
    """Start the node's presence workflow, or find the one already running."""
    return await client.start_workflow(
        NodeWorkflow.run,
        inp,
        **node_start(inp.node_id),
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        rpc_timeout=rpc_timeout,
    )


async def instance_status(client: Client, instance_id: str) -> InstanceStatus:
    """What a running instance says of itself (its `status` query); raises as the query does."""
    handle = client.get_workflow_handle_for(ServingWorkflow.run, serve_workflow_id(instance_id))
    return await handle.query(ServingWorkflow.status)


async def carried_over(client: Client, instance_id: str, count: int) -> None:
    """Tell an instance that the API resumed `count` of its generations elsewhere after losing its runner."""
    handle = client.get_workflow_handle_for(ServingWorkflow.run, serve_workflow_id(instance_id))
    await handle.signal(ServingWorkflow.carried_over, count)


async def cancel(client: Client, workflow_id: str, wait_s: float = 0.0) -> None:
    """Ask the workflow to cancel (it ends CANCELED once its work has really stopped), and wait up to `wait_s`
    for it to end."""
    handle = client.get_workflow_handle(workflow_id)
    await handle.cancel()
    if wait_s > 0:
        with contextlib.suppress(WorkflowFailureError, TimeoutError):
            await asyncio.wait_for(handle.result(), wait_s)
