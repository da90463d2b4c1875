import asyncio

from fastapi import APIRouter, status

from api.deps import ClientDep, InstancesDep, SettingsDep
from api.instances import InstanceCache, instance_status, list_instances
from api.schemas import ADMIN_STATUSES, ErrorOut, InstanceCreate, InstanceOut, PreviewOut, error_responses
from shardline.errors import ErrorType, ShardlineError
from shardline.ids import new_instance_id, serve_workflow_id
from shardline.states import InstanceState, WorkState
from shardline.types import DRAFT_MAX_BATCH
from workflows import client as workflows
from workflows.preview import PreviewInput
from workflows.serve import ServeInput

router = APIRouter(prefix="/instances", tags=["instances"], responses=error_responses(ErrorOut, ADMIN_STATUSES))
STOP_WAIT = 60.0  # seconds DELETE waits for every runner to stop
PREVIEW_WAIT = 60.0  # seconds a preview may take: the model's profile comes from the hub (or the control's cache)


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=InstanceOut)
async def create_instance(
    body: InstanceCreate, client: ClientDep, settings: SettingsDep, cache: InstancesDep
) -> InstanceOut:
    instance_id = new_instance_id(body.model)
    inp = ServeInput(
        instance_id=instance_id,
        model_id=body.model,
        strategy=body.strategy or "auto",
        nodes=body.nodes,
        revision=body.revision,
        node_wait_s=settings.node_wait,
        heartbeat_timeout_s=settings.heartbeat_timeout,
        recovery_deadline_s=settings.recovery_deadline,
        download_attempts=settings.download_attempts,
        draft_tokens=body.speculative.num_draft_tokens if body.speculative else 0,
        draft_max_batch=body.speculative.max_batch if body.speculative else DRAFT_MAX_BATCH,
        draft_model=body.draft_model,
    )
    await workflows.start_serving(client, inp)
    cache.forget()
    return InstanceOut.of(instance_id, body.model, InstanceState.PLACING, inp.strategy)


@router.post("/preview", response_model=PreviewOut, responses={409: {"model": ErrorOut}})
async def preview_instance(body: InstanceCreate, client: ClientDep) -> PreviewOut:
    """Where `POST /instances` with this body would place the model now, before anything is downloaded: the
    nodes, their layer ranges and bytes, the strategy and why; 409 (type `placement`) with the reason it does not
    fit."""
    inp = PreviewInput(body.model, body.strategy or "auto", body.nodes, body.revision, body.draft_model)
    try:
        preview = await asyncio.wait_for(workflows.preview(client, inp), PREVIEW_WAIT)
    except TimeoutError as err:
        message = f"no answer within {PREVIEW_WAIT:g} s: is the control worker (`shardline control`) running?"
        raise ShardlineError(ErrorType.UNAVAILABLE, message) from err
    if not preview.fits:
        raise ShardlineError(ErrorType.PLACEMENT, preview.reason)
    return PreviewOut.from_preview(preview)


@router.get("", response_model=list[InstanceOut])
async def get_instances(client: ClientDep, all: bool = False) -> list[InstanceOut]:
    return [InstanceOut.from_status(s) for s in await list_instances(client, running_only=not all)]


async def found(client: ClientDep, instance_id: str, cache: InstanceCache | None = None) -> InstanceOut:
    current = await instance_status(client, serve_workflow_id(instance_id))
    if current is None:
        raise ShardlineError(ErrorType.NOT_FOUND, f"no instance {instance_id}: see GET /instances")
    if cache is not None:
        cache.learn(current)
    return InstanceOut.from_status(current)


@router.get("/{instance_id}", response_model=InstanceOut)
async def get_instance(instance_id: str, client: ClientDep, cache: InstancesDep) -> InstanceOut:
    """The instance as its workflow says now; chat requests routed by this API see the same from then on."""
    return await found(client, instance_id, cache)


@router.delete("/{instance_id}", response_model=InstanceOut)
async def stop_instance(instance_id: str, client: ClientDep, cache: InstancesDep) -> InstanceOut:
    """Cancel the instance and wait until every runner has stopped and freed its memory."""
    current = await found(client, instance_id)
    if current.state not in (InstanceState.STOPPED, InstanceState.FAILED, WorkState.COMPLETED, WorkState.TERMINATED):
        await workflows.cancel(client, serve_workflow_id(instance_id), wait_s=STOP_WAIT)
    cache.forget()
    return await found(client, instance_id)
