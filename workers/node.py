"""The node worker: this machine's activities on `shardline-node-<id>`, and its NodeWorkflow."""

import asyncio
from datetime import timedelta

import structlog
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.worker import Worker

from activities.delete import DeleteActivities
from activities.download import DownloadActivities
from activities.presence import PresenceActivities
from activities.resources import CacheLedger
from activities.runner import ShardActivities
from shardline.discovery import joined_settings
from shardline.ids import node_queue
from shardline.node_identity import resolve_node_id
from shardline.settings import Settings
from shardline.temporal import connect
from workers.run import run_until_signal
from workflows.client import start_node
from workflows.node import NodeInput

log = structlog.get_logger(__name__)


async def run_node(settings: Settings) -> None:
    settings = await asyncio.to_thread(joined_settings, settings)  # the cluster on the LAN; the runners' host
    node_id = resolve_node_id(settings.node_id, settings.home)
    structlog.contextvars.bind_contextvars(node_id=node_id)
    client = await connect(settings, wait_s=60, export_metrics=True)
    ledger = CacheLedger()
    activities = [
        PresenceActivities(client, settings, ledger).node_presence,
        DownloadActivities(settings.models_dir, settings.max_downloads, settings.hub_timeout).download_model,
        DeleteActivities(settings.models_dir).delete_model,
        ShardActivities(client, settings, node_id, ledger).run_shard,
    ]
    worker = Worker(
        client,
        task_queue=node_queue(node_id),
        activities=activities,
        max_concurrent_activities=1000,  # queued downloads wait in the activity, heartbeating
        # activities are cancelled at once on SIGTERM (presence never ends by itself; downloads resume from their
        # partial files; runners are stopped), so that `shardline up` stops within 3 s
        graceful_shutdown_timeout=timedelta(0),
        # progress reaches the UI and API every 2 s, not every 0.8 x heartbeat timeout (24 s by default)
        max_heartbeat_throttle_interval=timedelta(seconds=2),
    )
    run_id = await join(client, settings, node_id)
    log.info("node.started", task_queue=node_queue(node_id), home=str(settings.home), host=settings.node_host)
    rejoin = asyncio.create_task(stay_joined(client, settings, node_id, run_id))
    try:
        await run_until_signal(worker)
    finally:
        rejoin.cancel()


async def join(client: Client, settings: Settings, node_id: str, rpc_timeout: timedelta | None = None) -> str | None:
    """Start this node's NodeWorkflow, or find the one already running; its run id."""
    inp = NodeInput(node_id=node_id, heartbeat_timeout_s=settings.heartbeat_timeout, grace_s=settings.node_grace)
    handle = await start_node(client, inp, rpc_timeout=rpc_timeout)
    return handle.result_run_id


async def stay_joined(client: Client, settings: Settings, node_id: str, run_id: str | None) -> None:
    """A node cut off for longer than the grace period (a partition, a laptop asleep) was declared departed
    while this process lived on: join again, as itself, once the cluster is reachable."""
    while True:
        await asyncio.sleep(settings.heartbeat_timeout)
        try:
            joined = await join(client, settings, node_id, rpc_timeout=timedelta(seconds=10))
        except RPCError as exc:
            log.warning("node.join_failed", error=str(exc))
            continue
        if joined != run_id:
            log.info("node.workflow_run", previous_run_id=run_id, run_id=joined)  # rejoined, or continued as new
            run_id = joined
