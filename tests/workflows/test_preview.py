"""PreviewWorkflow `preview:<id>`: where a serve would go, from the same profile and online nodes, placed alike;
nothing is downloaded or run; a model that does not fit says why; one that cannot be inspected fails typed."""

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from shardline.placement import ModelProfile, NodeCapacity, place, planned_bytes
from tests.support.fake_nodes import GIB, FakeCluster, new_model
from workflows import client as workflows
from workflows.preview import PreviewInput


def profile(model: str) -> ModelProfile:
    """4 layers of 1 GiB and 0.5 GiB of embeddings: a node of 8 GiB holds it all, one of 4 GiB two layers."""
    return ModelProfile(model, num_layers=4, layer_bytes=GIB, outer_bytes=GIB // 2, pipeline=True, tensor=True,
                        num_heads=4, num_kv_heads=4)  # fmt: skip


async def test_preview_places_as_a_serve_would_and_fetches_nothing(fake_cluster: FakeCluster) -> None:
    nodes = [await fake_cluster.node(memory=4 * GIB) for _ in range(2)]  # two layers each: it needs both
    model = new_model()
    fake_cluster.control.profile = profile(model)
    preview = await workflows.preview(fake_cluster.client, PreviewInput(model))
    expected = place(profile(model), [NodeCapacity(n.node_id, n.memory) for n in nodes])
    assert preview.fits and preview.strategy == expected.strategy == "pipeline"
    assert preview.reason == expected.reason
    got = [(s.node_id, s.rank, s.layer_start, s.layer_end, s.planned_bytes) for s in preview.shards]
    sizes = planned_bytes(profile(model), expected)
    assert got == [(s.node_id, s.rank, s.layers.start, s.layers.end, b)
                   for s, b in zip(expected.shards, sizes, strict=True)]  # fmt: skip
    assert preview.total_bytes == profile(model).total_bytes == 4 * GIB + GIB // 2
    assert all(not n.downloads and not n.runners for n in nodes)

    order = [nodes[1].node_id, nodes[0].node_id]
    pinned = await workflows.preview(fake_cluster.client, PreviewInput(model, "pipeline", nodes=order))
    assert pinned.fits and [s.node_id for s in pinned.shards] == order, pinned  # rank 0 on the first named


async def test_does_not_fit_says_why(fake_cluster: FakeCluster) -> None:
    await fake_cluster.node(memory=2 * GIB)
    model = new_model()
    fake_cluster.control.profile = profile(model)
    preview = await workflows.preview(fake_cluster.client, PreviewInput(model, "pipeline"))
    assert not preview.fits and not preview.shards
    assert f"{model} does not fit: it needs 4.50 GiB" in preview.reason, preview.reason
    missing = await workflows.preview(fake_cluster.client, PreviewInput(model, nodes=["gone"]))
    assert not missing.fits and missing.reason == "nodes not online: gone"


async def test_a_model_that_cannot_be_inspected_fails_typed(fake_cluster: FakeCluster) -> None:
    await fake_cluster.node()
    with pytest.raises(WorkflowFailureError) as failed:
        await workflows.preview(fake_cluster.client, PreviewInput("org/absent"))
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "not_found", cause
    assert "repo org/absent not found" in cause.message
