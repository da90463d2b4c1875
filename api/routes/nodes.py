import asyncio

from fastapi import APIRouter

from api import views
from api.deps import ClientDep, SettingsDep
from api.schemas import ADMIN_STATUSES, Accepted, ErrorOut, ModelPath, NodeOut, NodePath, error_responses
from shardline.errors import ErrorType, ShardlineError
from shardline.ids import InvalidId, check_model_id, check_node_id
from shardline.states import WorkState
from workflows import client as workflows
from workflows import state
from workflows.delete import DeleteInput, in_use_message

router = APIRouter(prefix="/nodes", tags=["nodes"], responses=error_responses(ErrorOut, ADMIN_STATUSES))

DELETE_WAIT = 20.0  # seconds the request waits for the delete before answering 202


@router.get("", response_model=list[NodeOut])
async def list_nodes(client: ClientDep, departed: bool = False) -> list[NodeOut]:
    return await views.list_nodes(client, include_departed=departed)


@router.delete("/{node_id}/models/{model_id:path}", response_model=Accepted)
async def delete_model(
    node_id: NodePath, model_id: ModelPath, client: ClientDep, settings: SettingsDep, force: bool = False
) -> Accepted:
    """Delete a model's files from a node; refused (in_use, naming the workflow) while a running download or
    instance uses them there, unless `force=true`. A failed delete answers with its type (api/errors.py)."""
    try:
        check_node_id(node_id)
        check_model_id(model_id)
    except InvalidId as exc:
        raise ShardlineError(ErrorType.BAD_INPUT, str(exc)) from exc
    node = await views.get_node(client, node_id)
    if node is None:
        raise ShardlineError(ErrorType.NOT_FOUND, f"node {node_id} is unknown: see GET /nodes")
    if not force and (users := await state.model_users(client, node_id, model_id)):
        raise ShardlineError(ErrorType.IN_USE, in_use_message(node_id, model_id, users))
    inp = DeleteInput(
        node_id=node_id,
        model_id=model_id,
        node_wait_s=settings.node_wait,
        heartbeat_timeout_s=settings.heartbeat_timeout,
        force=force,
    )
    handle = await workflows.start_delete(client, inp)
    workflow_id = handle.id
    try:  # a failure (WorkflowFailureError) reaches the client with its type
        result = await asyncio.wait_for(handle.result(), DELETE_WAIT)
    except TimeoutError:  # still waiting for its node: the workflow carries on
        return Accepted(workflow_id=workflow_id, state=WorkState.RUNNING)
    return Accepted(workflow_id=workflow_id, state=WorkState.COMPLETED, result=vars(result))
