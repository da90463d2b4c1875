"""PreviewWorkflow `preview:<id>`: where a serve of the model would go now, before anything is downloaded: the
same profile (the control worker's `inspect_model`) and online nodes a ServingWorkflow places with, placed alike."""

from dataclasses import dataclass, field

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from shardline import contracts
    from shardline.errors import ErrorType, cause_message, error, error_type
    from shardline.placement import PlacementError, place, planned_bytes
    from shardline.types import InspectRequest
    from workflows.common import CONTROL_ACTIVITY


@dataclass
class PreviewInput:
    model_id: str
    strategy: str = "auto"  # auto | pipeline | tensor, as a serve takes it
    nodes: list[str] | None = None
    revision: str | None = None
    draft_model: str | None = None  # speculative decoding's draft model, which rank 0's node would hold too


@dataclass
class PreviewShard:
    node_id: str
    rank: int
    layer_start: int  # [layer_start, layer_end)
    layer_end: int
    planned_bytes: int  # what this node would hold: its layers' weights, and the embeddings and head it needs


@dataclass
class Preview:
    model_id: str
    fits: bool
    strategy: str  # what would run (pipeline | tensor | single); as asked when it does not fit
    reason: str  # why that strategy and those nodes, or why it does not fit
    shards: list[PreviewShard] = field(default_factory=list)
    total_bytes: int = 0  # the whole model's weights


@workflow.defn(name="PreviewWorkflow")
class PreviewWorkflow:
    @workflow.run
    async def run(self, inp: PreviewInput) -> Preview:
        try:
            profile = await workflow.execute_activity(
                contracts.inspect_model, InspectRequest(inp.model_id, inp.revision), **CONTROL_ACTIVITY
            )
            draft_bytes = 0
            if inp.draft_model:
                draft = await workflow.execute_activity(
                    contracts.inspect_model, InspectRequest(inp.draft_model, None), **CONTROL_ACTIVITY
                )
                draft_bytes = draft.total_bytes
            # asking as no instance: the memory every instance reserved and has not loaded yet is not free
            nodes = await workflow.execute_activity(contracts.online_nodes, workflow.info().workflow_id,
                                                    **CONTROL_ACTIVITY)  # fmt: skip
        except ActivityError as err:  # the model's own failure (not found, gated, not a model), as a serve fails
            raise error(error_type(err) or ErrorType.TRANSIENT, cause_message(err), err, non_retryable=True) from err
        try:
            placement = place(profile, nodes, inp.strategy, inp.nodes, draft_bytes)
        except PlacementError as err:
            return Preview(inp.model_id, False, inp.strategy, str(err), total_bytes=profile.total_bytes)
        sizes = planned_bytes(profile, placement, draft_bytes)
        shards = [PreviewShard(s.node_id, s.rank, s.layers.start, s.layers.end, b)
                  for s, b in zip(placement.shards, sizes, strict=True)]  # fmt: skip
        return Preview(inp.model_id, True, placement.strategy, placement.reason, shards, profile.total_bytes)
