"""A serve's downloads retry as often as SHARDLINE_DOWNLOAD_ATTEMPTS says, as a download of its own does:
the API's POST /instances (in-process, with that setting), ServingWorkflow and its child DownloadWorkflow
under time skipping, and a node whose hub is unreachable."""

import uuid

import httpx
import pytest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from shardline import contracts
from shardline.contracts import implements
from shardline.ids import CONTROL_QUEUE, download_workflow_id, node_queue, serve_workflow_id
from shardline.placement import ModelProfile, NodeCapacity
from shardline.types import DownloadRequest, DownloadResult, InspectRequest
from tests.support.offline_app import offline_app
from workers.control import WORKFLOWS

MODEL = "org/tiny"


@pytest.mark.parametrize("attempts", [2, 3])
async def test_a_serve_downloads_with_the_configured_attempts(env: WorkflowEnvironment, attempts: int) -> None:
    client: Client = env.client
    node_id = f"n{uuid.uuid4().hex[:8]}"
    tries: list[DownloadRequest] = []

    @implements(contracts.inspect_model)
    async def inspect_model(req: InspectRequest) -> ModelProfile:
        return ModelProfile(req.model_id, num_layers=2, layer_bytes=2**20, outer_bytes=2**20, pipeline=True,
                            tensor=False)  # fmt: skip

    @implements(contracts.online_nodes)
    async def online_nodes(asking: str = "") -> list[NodeCapacity]:
        return [NodeCapacity(node_id, 2**30)]

    @implements(contracts.download_model)
    async def download_model(req: DownloadRequest) -> DownloadResult:  # the node's, its hub unreachable
        tries.append(req)
        raise ApplicationError(f"cannot reach the hub for {req.model_id}: connection refused")  # worth retrying

    app = offline_app(client, download_attempts=attempts).app  # SHARDLINE_DOWNLOAD_ATTEMPTS
    async with (
        Worker(client, task_queue=CONTROL_QUEUE, workflows=WORKFLOWS, activities=[inspect_model, online_nodes]),
        Worker(client, task_queue=node_queue(node_id), activities=[download_model]),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as api,
    ):
        created = await api.post("/instances", json={"model": MODEL, "nodes": [node_id]})
        assert created.status_code == 202, created.text
        serving = client.get_workflow_handle(serve_workflow_id(created.json()["instance_id"]))
        with pytest.raises(WorkflowFailureError):
            await serving.result()
    download = await client.get_workflow_handle(download_workflow_id(node_id, MODEL)).describe()
    assert download.status == WorkflowExecutionStatus.FAILED
    assert len(tries) == attempts, f"the serve's download tried {len(tries)} times, configured {attempts}"
