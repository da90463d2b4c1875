from fastapi import APIRouter, Response, status
from temporalio.client import WorkflowExecutionStatus
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from api import cluster
from api.deps import ClientDep, SettingsDep
from api.schemas import DownloadCreate, DownloadOut, DownloadsStarted
from shardline import search
from shardline.errors import ErrorType, ShardlineError
from shardline.ids import (
    CONTROL_QUEUE,
    InvalidId,
    download_workflow_id,
    parse_workflow_id,
)
from workflows.download import DownloadInput, DownloadWorkflow

router = APIRouter(prefix="/downloads", tags=["downloads"])


async def target_nodes(client: ClientDep, node_id: str | None) -> list[str]:
    if node_id is None:
        online = [n.node_id for n in await cluster.list_nodes(client) if n.state == "online"]
        if not online:
            raise ShardlineError(ErrorType.PLACEMENT, "no node is online: start one with `shardline node`")
        return online
    node = await cluster.get_node(client, node_id)
    if node is None:
        raise ShardlineError(ErrorType.NOT_FOUND, f"node {node_id} is unknown: see GET /nodes")
    if node.state == "departed":
        message = f"node {node_id} has departed: restart it with `shardline node` first"
        raise ShardlineError(ErrorType.DEPARTED, message)
    return [node_id]


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=DownloadsStarted)
async def start_downloads(body: DownloadCreate, client: ClientDep, settings: SettingsDep) -> DownloadsStarted:
    ids = []
    for node_id in await target_nodes(client, body.node_id):
        workflow_id = download_workflow_id(node_id, body.model)
        await client.start_workflow(
            DownloadWorkflow.run,
            DownloadInput(
                node_id,
                body.model,
                body.revision,
                node_wait_s=settings.node_wait,
                heartbeat_timeout_s=settings.heartbeat_timeout,
                attempts=settings.download_attempts,
            ),
            id=workflow_id,
            task_queue=CONTROL_QUEUE,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            search_attributes=search.attributes("download", "running", node=node_id, model=body.model),
            static_summary=f"Download {body.model} onto {node_id}",
            # a running download of one layer range (for a serve) then fetches the rest of the model too
            start_signal=DownloadWorkflow.whole_model.__name__,
        )
        ids.append(workflow_id)
    return DownloadsStarted(workflow_ids=ids)


@router.get("", response_model=list[DownloadOut])
async def list_downloads(
    client: ClientDep,
    node: str | None = None,
    model: str | None = None,
    state: str | None = None,
) -> list[DownloadOut]:
    return await cluster.list_downloads(client, node, model, state)


def checked_download_id(workflow_id: str) -> str:
    try:
        kind, _ = parse_workflow_id(workflow_id)
    except InvalidId as exc:
        raise ShardlineError(ErrorType.BAD_INPUT, str(exc)) from exc
    if kind != "download":
        message = f"{workflow_id!r} is not a download: ids look like download:<node_id>:<model_id>"
        raise ShardlineError(ErrorType.BAD_INPUT, message)
    return workflow_id


@router.get("/{workflow_id:path}", response_model=DownloadOut)
async def get_download(workflow_id: str, client: ClientDep) -> DownloadOut:
    found = await cluster.download_detail(client, checked_download_id(workflow_id))
    if found is None:
        raise ShardlineError(ErrorType.NOT_FOUND, f"no download {workflow_id}: see GET /downloads")
    return found


@router.delete(
    "/{workflow_id:path}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DownloadOut,
)
async def cancel_download(workflow_id: str, client: ClientDep, response: Response) -> DownloadOut:
    found = await cluster.download_detail(client, checked_download_id(workflow_id))
    if found is None:
        raise ShardlineError(ErrorType.NOT_FOUND, f"no download {workflow_id}: see GET /downloads")
    if found.status != WorkflowExecutionStatus.RUNNING.name:
        response.status_code = status.HTTP_200_OK  # already over: nothing to cancel
        return found
    await client.get_workflow_handle(workflow_id).cancel()
    found.state = "canceling"
    return found
