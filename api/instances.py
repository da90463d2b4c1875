"""Serving instances as the API sees them: listing, status, and the endpoint for a model (cached briefly)."""

import time
from dataclasses import dataclass, field

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError

from api.cluster import outcome
from shardline import search
from shardline.state import describe, list_query, state_of
from workflows.serve import InstanceStatus, ServingWorkflow

CACHE_SECONDS = 1.0


async def instance_status(client: Client, workflow_id: str) -> InstanceStatus | None:
    """The live status of a running instance, or the last known state of an ended one."""
    desc = await describe(client, workflow_id)
    if desc is None:
        return None
    instance_id = workflow_id.removeprefix("serve:")
    model = desc.typed_search_attributes.get(search.MODEL) or ""
    if desc.status == WorkflowExecutionStatus.RUNNING:
        try:
            return await client.get_workflow_handle_for(ServingWorkflow.run, workflow_id).query(ServingWorkflow.status)
        except RPCError:
            return InstanceStatus(instance_id, model, "starting", "")
    ended = InstanceStatus(instance_id, model, state_of(desc), "")
    if ended.state == "canceled":
        ended.state = "stopped"
    elif ended.state == "failed":
        _, ended.reason = await outcome(client, workflow_id)
    return ended


async def list_instances(client: Client, running_only: bool = True) -> list[InstanceStatus]:
    found = []
    async for execution in client.list_workflows(list_query("serve", running_only=running_only)):
        status = await instance_status(client, execution.id)
        if status is not None:
            found.append(status)
    return found


@dataclass
class InstanceCache:
    """Chat requests look their model's instance up here; Temporal is asked at most once a second."""

    client: Client
    _at: float = 0.0
    _instances: list[InstanceStatus] = field(default_factory=list)

    async def for_model(self, model: str) -> list[InstanceStatus]:
        if time.monotonic() - self._at > CACHE_SECONDS:
            self._instances = await list_instances(self.client)
            self._at = time.monotonic()
        return [i for i in self._instances if i.model_id == model]

    async def all(self) -> list[InstanceStatus]:
        await self.for_model("")
        return list(self._instances)

    def forget(self) -> None:
        self._at = 0.0
