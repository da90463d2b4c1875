"""DeleteModelWorkflow `delete:<node>:<model>`: removes a model's files from a node, already absent is success;
refused while a download or an instance uses the model there, unless forced."""

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from shardline.ids import serve_workflow_id
from shardline.types import DeleteResult
from tests.support.fake_nodes import FILE_BYTES, FakeCluster, details_of, new_model, state_of
from workflows.delete import DeleteInput


async def test_removes_the_model_and_then_finds_it_absent(fake_cluster: FakeCluster) -> None:
    model = new_model()
    node = await fake_cluster.node(models=[model])
    handle = await fake_cluster.start_delete(DeleteInput(node.node_id, model))  # production timeouts
    assert await handle.result() == DeleteResult(removed=True, bytes_freed=node.layers * FILE_BYTES)
    assert (await state_of(handle), await details_of(handle)) == ("completed", "removed")
    assert model not in node.models

    again = await fake_cluster.start_delete(DeleteInput(node.node_id, model))
    assert await again.result() == DeleteResult(removed=False, bytes_freed=0)
    assert (await state_of(again), await details_of(again)) == ("completed", "already absent")


async def test_refused_while_in_use_unless_forced(fake_cluster: FakeCluster) -> None:
    model = new_model()
    node = await fake_cluster.node(models=[model])
    fake_cluster.control.users = [serve_workflow_id("tiny-1a2b3c")]
    handle = await fake_cluster.start_delete(DeleteInput(node.node_id, model))
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()
    assert isinstance(failed.value.cause, ApplicationError)
    assert failed.value.cause.message == (
        f"{model} on node {node.node_id} is in use by serve:tiny-1a2b3c: stop or cancel that first "
        "(or delete with force)"
    )
    assert failed.value.cause.type == "in_use"
    assert await state_of(handle) == "failed"
    assert node.deletes == [] and model in node.models

    forced = await fake_cluster.start_delete(DeleteInput(node.node_id, model, force=True))
    assert (await forced.result()).removed
    assert [d.model_id for d in node.deletes] == [model]
