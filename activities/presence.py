"""node_presence: the long heartbeat that says a node is alive, and what it has."""

import asyncio
import time
from pathlib import Path

from temporalio import activity
from temporalio.client import Client

from activities.resources import read_resources
from shardline.types import PresenceInput


class PresenceActivities:
    def __init__(self, client: Client, home: Path) -> None:
        self._client = client
        self._home = home

    @activity.defn(name="node_presence")
    async def node_presence(self, inp: PresenceInput) -> None:
        info = activity.info()
        resources = await asyncio.to_thread(read_resources, inp.node_id, self._home)
        workflow = self._client.get_workflow_handle(info.workflow_id, run_id=info.workflow_run_id)
        await workflow.signal("online", resources)
        deadline = time.monotonic() + inp.lease_s
        while time.monotonic() < deadline:
            activity.heartbeat(resources)
            await asyncio.sleep(inp.report_every_s)
            resources = await asyncio.to_thread(read_resources, inp.node_id, self._home)
