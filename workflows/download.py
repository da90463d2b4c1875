"""DownloadWorkflow `download:<node>:<model>`: one model (or one layer range's files) onto one node."""

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from shardline import contracts
    from shardline.ids import CONTROL_QUEUE
    from shardline.states import WorkState
    from shardline.types import DownloadRequest, DownloadResult, LayerRange
    from workflows.common import run_on_node, set_state

# histories of serves recorded before a serve waited for a running download as long as it ran replay the
# old 5-minute cap
DOWNLOAD_WAITS = "serve-waits-for-download"
WIDENS = "download-widens-to-whole-model"
# waiting on someone else's download runs on the control worker, as long as the download does (it may take
# days); a restarted control worker picks the wait up again within the heartbeat timeout
WAIT_FOR_DOWNLOAD: dict[str, Any] = {
    "task_queue": CONTROL_QUEUE,
    "start_to_close_timeout": timedelta(days=3),
    "heartbeat_timeout": timedelta(seconds=30),
    "retry_policy": RetryPolicy(maximum_interval=timedelta(seconds=30)),
}


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
    def __init__(self) -> None:
        self._whole = False

    @workflow.run
    async def run(self, inp: DownloadInput) -> DownloadResult:
        set_state(WorkState.RUNNING, f"downloading {inp.model_id} onto {inp.node_id}")
        result = await self._fetch(inp, inp.layers)
        if inp.layers is not None and self._whole and workflow.patched(WIDENS):
            # someone asked for the whole model while this fetched a layer range: fetch the rest too
            set_state(WorkState.RUNNING, f"downloading the rest of {inp.model_id} onto {inp.node_id}")
            result = await self._fetch(inp, None)
        set_state(WorkState.COMPLETED, f"{inp.model_id} on {inp.node_id}: {len(result.files)} files")
        return result

    async def _fetch(self, inp: DownloadInput, layers: LayerRange | None) -> DownloadResult:
        request = DownloadRequest(inp.node_id, inp.model_id, inp.revision, layers)
        return await run_on_node(
            contracts.download_model,
            request,
            inp.node_id,
            wait_s=inp.node_wait_s,
            heartbeat_s=inp.heartbeat_timeout_s,
            attempts=inp.attempts,
            run_for=timedelta(days=2),  # a slow link may take long; the heartbeat says it is alive
        )

    @workflow.signal
    def whole_model(self) -> None:
        """A request for every file of the model reached this download (which may fetch one layer range)."""
        self._whole = True


async def wait_until_ended(workflow_id: str) -> str:
    """From a workflow: until the download `workflow_id` (someone else's) ends; how it ended."""
    return await workflow.execute_activity(contracts.wait_workflow_end, workflow_id, **WAIT_FOR_DOWNLOAD)
