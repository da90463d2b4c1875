"""A failure's type is set where it happens and kept to the end: DownloadWorkflow under time skipping with the
real download activity on the node's queue."""

import asyncio
import contextlib
import uuid
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ActivityError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.download import DownloadActivities
from shardline.errors import ErrorType, error_type
from shardline.ids import node_queue
from workflows.download import DownloadInput, DownloadWorkflow
from workflows.starts import download_start


async def failed_download(env: WorkflowEnvironment, inp: DownloadInput, models: Path) -> Exception:
    """How the download ends, the real download activity on the node's queue."""
    control = f"control-{uuid.uuid4().hex[:8]}"
    activities = DownloadActivities(models)
    workers = [
        Worker(env.client, task_queue=control, workflows=[DownloadWorkflow]),
        Worker(env.client, task_queue=node_queue(inp.node_id), activities=[activities.download_model]),
    ]
    async with contextlib.AsyncExitStack() as running:
        for worker in workers:
            await running.enter_async_context(worker)
        start = download_start(inp.node_id, inp.model_id) | {"task_queue": control}
        handle = await env.client.start_workflow(DownloadWorkflow.run, inp, **start)
        with pytest.raises(WorkflowFailureError) as failed:
            await asyncio.wait_for(handle.result(), 60)
    return failed.value


async def test_the_activity_s_type_ends_the_workflow(env: WorkflowEnvironment, tmp_path: Path) -> None:
    (tmp_path / "Org" / "Model").mkdir(parents=True)  # a case twin: the real activity refuses before any hub call
    inp = DownloadInput(f"n{uuid.uuid4().hex[:8]}", "org/model", attempts=3)
    failed = await failed_download(env, inp, models=tmp_path)
    assert error_type(failed) == ErrorType.CONFLICT and "differs only by case" in str(failed.cause)
    assert isinstance(failed.cause.__cause__, ActivityError)  # the workflow's error chains the activity's
