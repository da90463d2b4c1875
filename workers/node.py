"""The node worker: this machine's activities on `shardline-node-<id>`, and its NodeWorkflow."""

from datetime import timedelta

import structlog
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.worker import Worker

from activities.delete import DeleteActivities
from activities.download import DownloadActivities
from activities.presence import PresenceActivities
from activities.serve import ShardActivities
from shardline import search
from shardline.ids import CONTROL_QUEUE, node_queue, node_workflow_id
from shardline.node_identity import resolve_node_id
from shardline.settings import Settings
from shardline.temporal import connect
from workers.run import run_until_signal
from workflows.node import NodeInput, NodeWorkflow


async def run_node(settings: Settings) -> None:
    node_id = resolve_node_id(settings.node_id, settings.home)
    structlog.contextvars.bind_contextvars(node_id=node_id)
    client = await connect(settings, wait_s=60, export_metrics=True)
    activities = [
        PresenceActivities(client, settings).node_presence,
        DownloadActivities(settings.models_dir, settings.max_downloads).download_model,
        DeleteActivities(settings.models_dir).delete_model,
        ShardActivities(client, settings, node_id).run_shard,
    ]
    worker = Worker(
        client,
        task_queue=node_queue(node_id),
        activities=activities,
        max_concurrent_activities=1000,  # queued downloads wait in the activity, heartbeating
        graceful_shutdown_timeout=timedelta(seconds=5),
        # progress reaches the UI and API every 2 s, not every 0.8 x heartbeat timeout (24 s by default)
        max_heartbeat_throttle_interval=timedelta(seconds=2),
    )
    await client.start_workflow(
        NodeWorkflow.run,
        NodeInput(node_id, settings.heartbeat_timeout, settings.node_grace),
        id=node_workflow_id(node_id),
        task_queue=CONTROL_QUEUE,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        search_attributes=search.attributes("node", "starting", node=node_id),
        static_summary=f"Node {node_id}",
    )
    structlog.get_logger(__name__).info("node.started", task_queue=node_queue(node_id), home=str(settings.home))
    await run_until_signal(worker)
