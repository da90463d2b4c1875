"""The control worker: runs every workflow, on the `shardline-control` task queue."""

import structlog
from temporalio.worker import Worker

from activities.cluster import ClusterActivities
from shardline.ids import CONTROL_QUEUE
from shardline.settings import Settings
from shardline.temporal import connect
from workers.run import run_until_signal
from workflows.delete import DeleteModelWorkflow
from workflows.download import DownloadWorkflow
from workflows.node import NodeWorkflow
from workflows.preview import PreviewWorkflow
from workflows.serve import ServingWorkflow

WORKFLOWS = [NodeWorkflow, DownloadWorkflow, DeleteModelWorkflow, ServingWorkflow, PreviewWorkflow]


async def run_control(settings: Settings) -> None:
    client = await connect(settings, wait_s=60, export_metrics=True)
    cluster = ClusterActivities(client, settings.home / "cache", settings.hub_timeout)
    worker = Worker(
        client,
        task_queue=CONTROL_QUEUE,
        workflows=WORKFLOWS,
        activities=[
            cluster.online_nodes,
            cluster.node_state,
            cluster.inspect_model,
            cluster.model_users,
            cluster.wait_workflow_end,
        ],
    )
    structlog.get_logger(__name__).info("control.started", task_queue=CONTROL_QUEUE, temporal=settings.target)
    await run_until_signal(worker)
