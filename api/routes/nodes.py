import asyncio

from fastapi import APIRouter
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from api import cluster
from api.deps import ClientDep, SettingsDep
from api.schemas import Accepted, NodeOut
from shardline import search, state
from shardline.errors import ErrorType, ShardlineError
from shardline.ids import (
    CONTROL_QUEUE,
    InvalidId,
    check_model_id,
    check_node_id,
    delete_workflow_id,
)
from workflows.delete import DeleteInput, DeleteModelWorkflow

router = APIRouter(prefix="/nodes", tags=["nodes"])

DELETE_WAIT = 20.0  # seconds the request waits for the delete before answering 202


@router.get("", response_model=list[NodeOut])
async def list_nodes(client: ClientDep, departed: bool = False) -> list[NodeOut]:
    return await cluster.list_nodes(client, include_departed=departed)


@router.delete("/{node_id}/models/{model_id:path}", response_model=Accepted)
async def delete_model(
    node_id: str, model_id: str, client: ClientDep, settings: SettingsDep, force: bool = False
) -> Accepted:
    """Delete a model's files from a node; refused (in_use, naming the workflow) while a running download or
    instance uses them there, unless `force=true`. A failed delete answers with its type (api/errors.py)."""
    try:
        check_node_id(node_id)
        check_model_id(model_id)
    except InvalidId as exc:
        raise ShardlineError(ErrorType.BAD_INPUT, str(exc)) from exc
    node = await cluster.get_node(client, node_id)
    if node is None:
        raise ShardlineError(ErrorType.NOT_FOUND, f"node {node_id} is unknown: see GET /nodes")
    if not force and (users := await state.model_users(client, node_id, model_id)):
        raise ShardlineError(ErrorType.IN_USE, state.in_use_message(node_id, model_id, users))
    workflow_id = delete_workflow_id(node_id, model_id)
    handle = await client.start_workflow(
        DeleteModelWorkflow.run,
        DeleteInput(node_id, model_id, settings.node_wait, settings.heartbeat_timeout, force=force),
        id=workflow_id,
        task_queue=CONTROL_QUEUE,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        search_attributes=search.attributes("delete", "running", node=node_id, model=model_id),
        static_summary=f"Delete {model_id} from {node_id}",
    )
    try:  # a failure (WorkflowFailureError) reaches the client with its type
        result = await asyncio.wait_for(handle.result(), DELETE_WAIT)
    except TimeoutError:  # still waiting for its node: the workflow carries on
        return Accepted(workflow_id=workflow_id, state="running")
    return Accepted(workflow_id=workflow_id, state="completed", result=vars(result))
