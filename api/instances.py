"""Serving instances as the API sees them: listing, status, and the endpoint for a model (cached briefly)."""

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import structlog
from fastapi import HTTPException
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from shardline import search
from shardline.errors import cause_message, error_type
from shardline.ids import instance_of
from shardline.states import InstanceState, Kind
from workflows import client as workflows
from workflows.serve import InstanceStatus
from workflows.state import describe, list_query, state_of

CACHE_SECONDS = 1.0
LOOKUP_TIMEOUT = 3.0  # seconds; past it, the cached endpoints answer
log = structlog.get_logger(__name__)


async def instance_status(
    client: Client, workflow_id: str, known: InstanceStatus | None = None
) -> InstanceStatus | None:
    """The live status of a running instance, or the last known state of an ended one. A running instance
    whose workflow cannot answer now (its worker is restarting) is `known` if given, else "starting"."""
    desc = await describe(client, workflow_id)
    if desc is None:
        return None
    instance_id = instance_of(workflow_id)
    model = desc.typed_search_attributes.get(search.MODEL) or ""
    if desc.status == WorkflowExecutionStatus.RUNNING:
        try:
            return await workflows.instance_status(client, instance_id)
        except RPCError:
            return known or InstanceStatus(instance_id, model, InstanceState.STARTING, "")
    ended = InstanceStatus(instance_id, model, state_of(desc), "")  # a canceled one reads "stopped"
    if ended.state == InstanceState.FAILED:
        await failed(client, workflow_id, ended)
    return ended


async def failed(client: Client, workflow_id: str, ended: InstanceStatus) -> None:
    """Why it failed, and the recoveries and incidents it last knew (its failure's details; none in a failure
    recorded before they were kept)."""
    try:
        await client.get_workflow_handle(workflow_id).result()
    except WorkflowFailureError as err:
        kind = error_type(err)
        ended.reason, ended.error_type = cause_message(err), kind and kind.value
        details = err.cause.details if isinstance(err.cause, ApplicationError) else ()
        if details and isinstance(details[0], dict):
            ended.recoveries = int(details[0].get("recoveries") or 0)
            ended.incidents = [str(i) for i in details[0].get("incidents") or []]
            ended.carried_over = int(details[0].get("carried_over") or 0)


async def list_instances(
    client: Client, running_only: bool = True, known: dict[str, InstanceStatus] | None = None
) -> list[InstanceStatus]:
    found = []
    async for execution in client.list_workflows(list_query(Kind.SERVE, running_only=running_only)):
        last = (known or {}).get(instance_of(execution.id))
        status = await instance_status(client, execution.id, last)
        if status is not None:
            found.append(status)
    return found


@dataclass
class InstanceCache:
    """Chat requests look their model's instance up here; Temporal is asked at most once a second, and
    never while a request waits if a ready endpoint is already known: Temporal is the control plane
    only, so while it is unreachable the last known endpoints keep serving."""

    client: Client
    _at: float = 0.0
    _instances: list[InstanceStatus] = field(default_factory=list)
    _refreshing: asyncio.Task[None] | None = None

    async def for_model(self, model: str, max_age: float = CACHE_SECONDS) -> list[InstanceStatus]:
        known = [i for i in self._instances if i.model_id == model]
        if time.monotonic() - self._at > max_age:
            if any(i.state == InstanceState.READY for i in known):
                if self._refreshing is None or self._refreshing.done():
                    self._refreshing = asyncio.create_task(self.refresh())
            else:
                await self.refresh()
                known = [i for i in self._instances if i.model_id == model]
        return known

    async def all(self) -> list[InstanceStatus]:
        if time.monotonic() - self._at > CACHE_SECONDS:
            await self.refresh()
        return list(self._instances)

    async def known(self, refresh: bool) -> list[InstanceStatus]:
        """What is known, refreshed first if stale and asked to; never an error (a scrape must answer while
        Temporal is down)."""
        if refresh:
            with contextlib.suppress(HTTPException):
                return await self.all()
        return list(self._instances)

    async def refresh(self) -> None:
        """Ask Temporal now (keeping what is known if it does not answer)."""
        try:
            # an instance whose workflow cannot be queried right now keeps its last known endpoint
            known = {i.instance_id: i for i in self._instances}
            self._instances = await asyncio.wait_for(list_instances(self.client, known=known), LOOKUP_TIMEOUT)
        except (RPCError, TimeoutError) as err:
            if not self._instances:
                raise HTTPException(503, f"the cluster's Temporal server did not answer ({err}): try again") from err
            log.warning("instances.stale", reason=str(err) or type(err).__name__, known=len(self._instances))
        finally:
            self._at = time.monotonic()

    def learn(self, status: InstanceStatus) -> None:
        """A status read from the instance's workflow just now (GET /instances/<id>): a client told "ready" there
        must not be told "not ready" here until the next refresh."""
        if any(i.instance_id == status.instance_id for i in self._instances):
            self._instances = [status if i.instance_id == status.instance_id else i for i in self._instances]

    def forget(self) -> None:
        """After this API started or stopped an instance: the next request asks Temporal first."""
        self._at = 0.0
        self._instances = []
