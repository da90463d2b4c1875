"""Reading cluster state out of Temporal: visibility queries, describe() and the workflows' own queries,
never the workers."""

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any

from temporalio.client import (
    Client,
    WorkflowExecution,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowQueryFailedError,
)
from temporalio.service import RPCError, RPCStatusCode

from shardline import search, states
from shardline.ids import download_workflow_id, instance_of, node_of, node_workflow_id, serve_workflow_id
from shardline.states import RESERVING, Kind
from shardline.types import NodeResources
from workflows.client import instance_status
from workflows.serve import InstanceStatus


def quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def list_query(kind: Kind, running_only: bool = False, **equals: str | None) -> str:
    clauses = [f"{search.KIND.name} = {quote(str(kind))}"]
    names = {
        "node": search.NODE.name,
        "model": search.MODEL.name,
        "state": search.STATE.name,
    }
    clauses += [f"{names[k]} = {quote(v)}" for k, v in equals.items() if v]
    if running_only:
        clauses.append("ExecutionStatus = 'Running'")
    return " AND ".join(clauses)


async def describe(client: Client, workflow_id: str) -> WorkflowExecutionDescription | None:
    try:
        return await client.get_workflow_handle(workflow_id).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return None
        raise


async def heartbeat(client: Client, desc: WorkflowExecutionDescription, as_type: type) -> tuple[Any, Any]:
    """(last heartbeat details, pending activity) of the workflow's one pending activity, if any."""
    for pending in desc.raw_description.pending_activities:
        details = None
        if pending.heartbeat_details.payloads:
            decoded = await client.data_converter.decode(pending.heartbeat_details.payloads, [as_type])
            details = decoded[0] if decoded else None
        return details, pending
    return None, None


def state_of(execution: WorkflowExecution) -> str:
    """The workflow's state (see shardline.states.state_of) from what visibility or describe() says."""
    attrs = execution.typed_search_attributes
    status = execution.status.name if execution.status else "UNKNOWN"
    return states.state_of(attrs.get(search.KIND) or "", status, attrs.get(search.STATE))


BY_STATUS = "GROUP BY ExecutionStatus"


async def count_states(client: Client, kind: Kind, limit: int = 10_000) -> dict[str, int]:
    """Workflows of one kind by state. Running ones are listed (a few per node); closed ones pile up, so the
    server counts them (visibility can GROUP BY ExecutionStatus only, not by ShardlineState)."""
    if kind == Kind.NODE:  # few, and one may have runs that departed before it came back: the last run counts
        return dict(Counter(n.state for n in await list_nodes(client, include_departed=True)))
    counts: Counter[str] = Counter()
    async for execution in client.list_workflows(list_query(kind, running_only=True), limit=limit):
        counts[state_of(execution)] += 1
    closed = await client.count_workflows(f"{list_query(kind)} AND ExecutionStatus != 'Running' {BY_STATUS}")
    for group in closed.groups:
        state = states.closed_state(kind, str(group.group_values[0]))
        if state is not None:
            counts[state] += group.count
    return dict(counts)


@dataclass
class NodeView:
    node_id: str
    state: str
    workflow_id: str
    resources: NodeResources | None


async def node_view(client: Client, desc: WorkflowExecutionDescription) -> NodeView:
    node_id = desc.typed_search_attributes.get(search.NODE) or node_of(desc.id)
    resources, _ = await heartbeat(client, desc, NodeResources)
    return NodeView(node_id, state_of(desc), desc.id, resources if isinstance(resources, NodeResources) else None)


async def list_nodes(client: Client, include_departed: bool = False) -> list[NodeView]:
    """Every node once, as its latest run says (a node that departed and came back has several runs)."""
    nodes: dict[str, NodeView] = {}
    async for execution in client.list_workflows(list_query(Kind.NODE, running_only=not include_departed)):
        if execution.id in nodes:
            continue
        desc = await describe(client, execution.id)
        if desc is not None and (include_departed or desc.status == WorkflowExecutionStatus.RUNNING):
            nodes[execution.id] = await node_view(client, desc)
    return sorted(nodes.values(), key=lambda n: n.node_id)


async def get_node(client: Client, node_id: str) -> NodeView | None:
    desc = await describe(client, node_workflow_id(node_id))
    return None if desc is None else await node_view(client, desc)


QUERY_WAIT = 5.0  # seconds an instance gets to say where it runs; silent, it counts as a user


async def answered(client: Client, instance_id: str) -> InstanceStatus | None:
    """A running instance's status, or None if it does not answer within QUERY_WAIT."""
    try:
        return await asyncio.wait_for(instance_status(client, instance_id), QUERY_WAIT)
    except (RPCError, WorkflowQueryFailedError, TimeoutError):
        return None


async def placed_on(client: Client, instance_id: str) -> set[str] | None:
    """The nodes a running instance is placed on; None when it cannot say (not placed yet, not answering)."""
    status = await answered(client, instance_id)
    if status is None:
        return None
    return {shard.node_id for shard in status.shards} or None


async def reserved_memory(client: Client, exclude: str) -> dict[str, int]:
    """Bytes per node that running instances (but `exclude`) have placed and not yet loaded."""
    reserved: dict[str, int] = {}
    async for execution in client.list_workflows(list_query(Kind.SERVE, running_only=True)):
        if execution.id == serve_workflow_id(exclude):
            continue
        status = await answered(client, instance_of(execution.id))
        if status is None or status.state not in RESERVING:
            continue
        for shard in status.shards:
            if not shard.ready:
                reserved[shard.node_id] = reserved.get(shard.node_id, 0) + shard.planned_bytes
    return reserved


async def model_users(client: Client, node_id: str, model_id: str) -> list[str]:
    """Running workflows that need this model's files on this node: its download, and any instance of the
    model placed there (or that cannot say where it is placed: it may be placed there next), or drafting with it
    there (rank 0's node)."""
    users = []
    download = await describe(client, download_workflow_id(node_id, model_id))
    if download is not None and download.status == WorkflowExecutionStatus.RUNNING:
        users.append(download.id)
    async for execution in client.list_workflows(list_query(Kind.SERVE, running_only=True)):
        model = execution.typed_search_attributes.get(search.MODEL)
        if model == model_id:
            nodes = await placed_on(client, instance_of(execution.id))
            if nodes is None or node_id in nodes:
                users.append(execution.id)
            continue
        status = await answered(client, instance_of(execution.id))  # its draft model, where its rank 0 runs
        drafts = status is not None and status.draft_model == model_id
        if drafts and (not status.shards or any(s.rank == 0 and s.node_id == node_id for s in status.shards)):
            users.append(execution.id)
    return users
