"""DownloadWorkflow `download:<node>:<model>`: one model (or one layer range's files) onto one node."""

from dataclasses import dataclass
from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from shardline.types import DownloadRequest, DownloadResult, LayerRange
    from workflows.common import run_on_node, set_state


@dataclass
class DownloadInput:
    node_id: str
    model_id: str
    revision: str | None = None
    layers: LayerRange | None = None
    node_wait_s: float = 300.0
    heartbeat_timeout_s: float = 30.0
    attempts: int = 5


@workflow.defn(name="DownloadWorkflow")
class DownloadWorkflow:
    @workflow.run
    async def run(self, inp: DownloadInput) -> DownloadResult:
        set_state("running", f"downloading {inp.model_id} onto {inp.node_id}")
        request = DownloadRequest(inp.node_id, inp.model_id, inp.revision, inp.layers)
        result: DownloadResult = await run_on_node(
            "download_model",
            request,
            DownloadResult,
            inp.node_id,
            wait_s=inp.node_wait_s,
            heartbeat_s=inp.heartbeat_timeout_s,
            attempts=inp.attempts,
            run_for=timedelta(days=2),  # a slow link may take long; the heartbeat says it is alive
        )
        set_state("completed", f"{inp.model_id} on {inp.node_id}: {len(result.files)} files")
        return result
