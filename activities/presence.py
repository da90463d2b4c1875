"""node_presence: the long heartbeat that says a node is alive, and what it has."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from temporalio import activity
from temporalio.client import Client

from activities.resources import CacheLedger, read_resources
from shardline import contracts
from shardline.contracts import implements
from shardline.settings import Settings
from shardline.types import NodeResources, PresenceInput
from workflows.node import NodeWorkflow


class PresenceActivities:
    def __init__(self, client: Client, settings: Settings, ledger: CacheLedger | None = None) -> None:
        self._client = client
        self._settings = settings
        self._ledger = ledger or CacheLedger()
        # its own threads: stalled hub calls or slow deletes filling asyncio's shared pool cannot hold presence
        # back until a live node is declared gone
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="presence")

    async def _resources(self, node_id: str) -> NodeResources:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._read, node_id)

    def _read(self, node_id: str) -> NodeResources:
        s = self._settings
        return read_resources(node_id, s.home, s.node_host or "127.0.0.1", s.node_memory, self._ledger.total())

    @implements(contracts.node_presence)
    async def node_presence(self, inp: PresenceInput) -> None:
        info = activity.info()
        resources = await self._resources(inp.node_id)
        workflow = self._client.get_workflow_handle(info.workflow_id, run_id=info.workflow_run_id)
        await workflow.signal(NodeWorkflow.online, resources)
        deadline = time.monotonic() + inp.lease_s
        while time.monotonic() < deadline:
            activity.heartbeat(resources)
            await asyncio.sleep(inp.report_every_s)
            resources = await self._resources(inp.node_id)
