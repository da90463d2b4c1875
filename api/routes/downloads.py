from fastapi import APIRouter, Response, status
from temporalio.client import WorkflowExecutionStatus

from api import views
from api.deps import ClientDep, SettingsDep
from api.schemas import (
    ADMIN_STATUSES,
    DownloadCreate,
    DownloadOut,
    DownloadPath,
    DownloadsStarted,
    ErrorOut,
    error_responses,
)
from shardline.errors import ErrorType, ShardlineError
from shardline.ids import InvalidId, parse_workflow_id
from shardline.states import Kind, NodeState, WorkState
from workflows import client as workflows
from workflows.download import DownloadInput

router = APIRouter(prefix="/downloads", tags=["downloads"], responses=error_responses(ErrorOut, ADMIN_STATUSES))


async def target_nodes(client: ClientDep, node_id: str | None) -> list[str]:
    if node_id is None:
        online = [n.node_id for n in await views.list_nodes(client) if n.state == NodeState.ONLINE]
        if not online:
            raise ShardlineError(ErrorType.PLACEMENT, "no node is online: start one with `shardline node`")
        return online
    node = await views.get_node(client, node_id)
    if node is None:
        raise ShardlineError(ErrorType.NOT_FOUND, f"node {node_id} is unknown: see GET /nodes")
    if node.state == NodeState.DEPARTED:
        message = f"node {node_id} has departed: restart it with `shardline node` first"
        raise ShardlineError(ErrorType.DEPARTED, message)
    return [node_id]


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=DownloadsStarted)
async def start_downloads(body: DownloadCreate, client: ClientDep, settings: SettingsDep) -> DownloadsStarted:
    ids = []
    for node_id in await target_nodes(client, body.node_id):
        # a running download of one layer range (for a serve) then fetches the rest of the model too
        handle = await workflows.start_download(
            client,
            DownloadInput(
                node_id=node_id,
                model_id=body.model,
                revision=body.revision,
                node_wait_s=settings.node_wait,
                heartbeat_timeout_s=settings.heartbeat_timeout,
                attempts=settings.download_attempts,
            ),
        )
        ids.append(handle.id)
    return DownloadsStarted(workflow_ids=ids)


@router.get("", response_model=list[DownloadOut])
async def list_downloads(
    client: ClientDep,
    node: str | None = None,
    model: str | None = None,
    state: str | None = None,
) -> list[DownloadOut]:
    return await views.list_downloads(client, node, model, state)


def checked_download_id(workflow_id: str) -> str:
    try:
        kind, _ = parse_workflow_id(workflow_id)
    except InvalidId as exc:
        raise ShardlineError(ErrorType.BAD_INPUT, str(exc)) from exc
    if kind != Kind.DOWNLOAD:
        message = f"{workflow_id!r} is not a download: ids look like download:<node_id>:<model_id>"
        raise ShardlineError(ErrorType.BAD_INPUT, message)
    return workflow_id


@router.get("/{workflow_id:path}", response_model=DownloadOut)
async def get_download(workflow_id: DownloadPath, client: ClientDep) -> DownloadOut:
    found = await views.download_detail(client, checked_download_id(workflow_id))
    if found is None:
        raise ShardlineError(ErrorType.NOT_FOUND, f"no download {workflow_id}: see GET /downloads")
    return found


@router.delete(
    "/{workflow_id:path}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DownloadOut,
    responses={200: {"model": DownloadOut, "description": "the download had already ended: left as it is"}},
)
async def cancel_download(workflow_id: DownloadPath, client: ClientDep, response: Response) -> DownloadOut:
    found = await views.download_detail(client, checked_download_id(workflow_id))
    if found is None:
        raise ShardlineError(ErrorType.NOT_FOUND, f"no download {workflow_id}: see GET /downloads")
    if found.status != WorkflowExecutionStatus.RUNNING.name:
        response.status_code = status.HTTP_200_OK  # already over: nothing to cancel
        return found
    await workflows.cancel(client, workflow_id)
    found.state = WorkState.CANCELING
    return found
