import asyncio
import contextlib
import uuid

from fastapi import APIRouter, status
from temporalio.client import WorkflowFailureError

from api.deps import ClientDep, InstancesDep, SettingsDep
from api.instances import instance_status, list_instances
from api.schemas import InstanceCreate, InstanceOut
from shardline import search
from shardline.errors import ErrorType, ShardlineError
from shardline.ids import CONTROL_QUEUE, serve_workflow_id
from workflows.serve import ServeInput, ServingWorkflow

router = APIRouter(prefix="/instances", tags=["instances"])
STOP_WAIT = 60.0  # seconds DELETE waits for every runner to stop


def new_instance_id(model: str) -> str:
    return f"{model.rsplit('/', 1)[-1].lower()[:40]}-{uuid.uuid4().hex[:6]}"


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=InstanceOut)
async def create_instance(
    body: InstanceCreate, client: ClientDep, settings: SettingsDep, cache: InstancesDep
) -> InstanceOut:
    instance_id = new_instance_id(body.model)
    await client.start_workflow(
        ServingWorkflow.run,
        ServeInput(
            instance_id,
            body.model,
            body.strategy,
            body.nodes,
            body.revision,
            settings.node_wait,
            settings.heartbeat_timeout,
            recovery_deadline_s=settings.recovery_deadline,
        ),
        id=serve_workflow_id(instance_id),
        task_queue=CONTROL_QUEUE,
        search_attributes=search.attributes("serve", "placing", model=body.model),
        static_summary=f"Serve {body.model} ({body.strategy})",
    )
    cache.forget()
    return InstanceOut.of(instance_id, body.model, "placing", body.strategy)


@router.get("", response_model=list[InstanceOut])
async def get_instances(client: ClientDep, all: bool = False) -> list[InstanceOut]:
    return [InstanceOut.from_status(s) for s in await list_instances(client, running_only=not all)]


async def found(client: ClientDep, instance_id: str) -> InstanceOut:
    current = await instance_status(client, serve_workflow_id(instance_id))
    if current is None:
        raise ShardlineError(ErrorType.NOT_FOUND, f"no instance {instance_id}: see GET /instances")
    return InstanceOut.from_status(current)


@router.get("/{instance_id}", response_model=InstanceOut)
async def get_instance(instance_id: str, client: ClientDep) -> InstanceOut:
    return await found(client, instance_id)


@router.delete("/{instance_id}", response_model=InstanceOut)
async def stop_instance(instance_id: str, client: ClientDep, cache: InstancesDep) -> InstanceOut:
    """Cancel the instance and wait until every runner has stopped and freed its memory."""
    current = await found(client, instance_id)
    handle = client.get_workflow_handle(serve_workflow_id(instance_id))
    if current.state not in ("stopped", "failed", "completed", "terminated"):
        await handle.cancel()
        with contextlib.suppress(WorkflowFailureError, TimeoutError):
            await asyncio.wait_for(handle.result(), STOP_WAIT)
    cache.forget()
    return await found(client, instance_id)
