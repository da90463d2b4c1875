"""A failure's type is set where it happens and kept to the end: DownloadWorkflow under time skipping with the
real download activity on the node's queue, and the API's one mapping from types to statuses."""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ActivityError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.download import DownloadActivities
from api.errors import STATUS, status_for
from shardline import search
from shardline.errors import ErrorType, error_type
from shardline.ids import node_queue
from shardline.temporal import ensure_search_attributes, temporal_cli
from tests.support.offline_app import offline_app
from workflows.download import DownloadInput, DownloadWorkflow


@pytest.fixture(scope="module")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    async with await WorkflowEnvironment.start_time_skipping_v2(
        dev_server_existing_path=temporal_cli(),
        dev_server_extra_args=["--dynamic-config-value", "frontend.WorkflowTimeSkippingEnabled=true"],
    ) as started:
        await ensure_search_attributes(started.client, "default")
        yield started


async def failed_download(env: WorkflowEnvironment, inp: DownloadInput, node_worker: bool, models: Path) -> Exception:
    """How the download ends (within the time its node had to pick the work up, node_wait_s)."""
    control = f"control-{uuid.uuid4().hex[:8]}"
    activities = DownloadActivities(models)
    workers = [Worker(env.client, task_queue=control, workflows=[DownloadWorkflow])]
    if node_worker:
        workers.append(Worker(env.client, task_queue=node_queue(inp.node_id), activities=[activities.download_model]))
    async with contextlib.AsyncExitStack() as running:
        for worker in workers:
            await running.enter_async_context(worker)
        handle = await env.client.start_workflow(
            DownloadWorkflow.run,
            inp,
            id=f"download:{inp.node_id}:{inp.model_id}",
            task_queue=control,
            search_attributes=search.attributes("download", "running", node=inp.node_id, model=inp.model_id),
        )
        with pytest.raises(WorkflowFailureError) as failed:
            await asyncio.wait_for(handle.result(), 60)
    return failed.value


async def test_the_activity_s_type_ends_the_workflow(env: WorkflowEnvironment, tmp_path: Path) -> None:
    (tmp_path / "Org" / "Model").mkdir(parents=True)  # a case twin: the real activity refuses before any hub call
    inp = DownloadInput(f"n{uuid.uuid4().hex[:8]}", "org/model", attempts=3)
    failed = await failed_download(env, inp, node_worker=True, models=tmp_path)
    assert error_type(failed) == ErrorType.CONFLICT and "differs only by case" in str(failed.cause)
    assert isinstance(failed.cause.__cause__, ActivityError)  # the workflow's error chains the activity's


async def test_a_node_that_never_answers_is_unavailable(env: WorkflowEnvironment, tmp_path: Path) -> None:
    # a short wait: time skipping does not skip an activity's schedule-to-start timeout
    inp = DownloadInput(f"n{uuid.uuid4().hex[:8]}", "org/model", node_wait_s=2)
    failed = await failed_download(env, inp, node_worker=False, models=tmp_path)
    assert error_type(failed) == ErrorType.NODE_UNAVAILABLE and "unavailable" in str(failed.cause)


def test_every_type_has_one_status() -> None:
    assert set(STATUS) == set(ErrorType)
    assert status_for(ErrorType.DISK_FULL) == 507 and status_for(ErrorType.IN_USE) == 409


def test_admin_errors_carry_their_type_and_inference_errors_openai_s() -> None:
    http = offline_app(None)
    odd = http.get("/downloads/serve:x")
    assert odd.status_code == 422 and odd.json()["error"]["type"] == ErrorType.BAD_INPUT, odd.text
    invalid = http.post("/instances", json={"model": "a/b/c"})
    assert invalid.status_code == 422 and invalid.json()["error"]["type"] == ErrorType.BAD_INPUT
    chat = http.post("/v1/chat/completions", json={"model": "o/m"})
    assert chat.status_code == 400 and chat.json()["error"]["type"] == "invalid_request_error"
