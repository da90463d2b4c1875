"""How each workflow is started: its id, task queue, search attributes, summary and id reuse policy.

Pure, so that workflows.client (the API, the workers, tests, benchmarks) and the serving workflow's child
downloads start the same workflow the same way. Each returns keyword arguments of `Client.start_workflow`
that `workflow.execute_child_workflow` takes too; a client start adds its id conflict policy."""

from datetime import timedelta
from typing import Any

from temporalio.common import WorkflowIDReusePolicy

from shardline import search
from shardline.ids import (
    CONTROL_QUEUE,
    delete_workflow_id,
    download_workflow_id,
    node_workflow_id,
    preview_workflow_id,
    serve_workflow_id,
)
from shardline.states import InstanceState, Kind, NodeState, WorkState

Start = dict[str, Any]
PREVIEW_TIMEOUT = timedelta(minutes=5)  # inspecting the model (the hub) and placing it take seconds


def download_start(node_id: str, model_id: str, for_instance: str | None = None) -> Start:
    """A download may run again once ended (a second request, a deleted model fetched back)."""
    summary = f"Download {model_id} onto {node_id}" + (f" for {for_instance}" if for_instance else "")
    return {
        "id": download_workflow_id(node_id, model_id),
        "task_queue": CONTROL_QUEUE,
        "id_reuse_policy": WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        "search_attributes": search.attributes(Kind.DOWNLOAD, WorkState.RUNNING, node=node_id, model=model_id),
        "static_summary": summary,
    }


def delete_start(node_id: str, model_id: str) -> Start:
    return {
        "id": delete_workflow_id(node_id, model_id),
        "task_queue": CONTROL_QUEUE,
        "id_reuse_policy": WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        "search_attributes": search.attributes(Kind.DELETE, WorkState.RUNNING, node=node_id, model=model_id),
        "static_summary": f"Delete {model_id} from {node_id}",
    }


def serve_start(instance_id: str, model_id: str, strategy: str) -> Start:
    """Instance ids are new each time: no reuse policy needed."""
    return {
        "id": serve_workflow_id(instance_id),
        "task_queue": CONTROL_QUEUE,
        "search_attributes": search.attributes(Kind.SERVE, InstanceState.PLACING, model=model_id),
        "static_summary": f"Serve {model_id} ({strategy})",
    }


def preview_start(preview_id: str, model_id: str) -> Start:
    """Preview ids are new each time; a preview ends on its own within minutes even if no one waits for it."""
    return {
        "id": preview_workflow_id(preview_id),
        "task_queue": CONTROL_QUEUE,
        "execution_timeout": PREVIEW_TIMEOUT,
        "search_attributes": search.attributes(Kind.PREVIEW, WorkState.RUNNING, model=model_id),
        "static_summary": f"Preview where {model_id} would be placed",
    }


def node_start(node_id: str) -> Start:
    """A node that departed and comes back, as itself, runs again under its id."""
    return {
        "id": node_workflow_id(node_id),
        "task_queue": CONTROL_QUEUE,
        "id_reuse_policy": WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        "search_attributes": search.attributes(Kind.NODE, NodeState.STARTING, node=node_id),
        "static_summary": f"Node {node_id}",
    }
