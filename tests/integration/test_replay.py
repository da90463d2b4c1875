"""Every workflow history the session's real cluster produced replays with today's code: determinism."""

from collections.abc import AsyncIterator

from temporalio.client import Client, WorkflowHistory
from temporalio.worker import Replayer

from workers.control import WORKFLOWS


async def test_histories_replay_deterministically(client: Client) -> None:
    histories = [h async for h in client.list_workflows("ExecutionStatus != 'Running'").map_histories()]
    kinds = {h.events[0].workflow_execution_started_event_attributes.workflow_type.name for h in histories}
    assert {"DownloadWorkflow", "DeleteModelWorkflow"} <= kinds, kinds  # earlier tests ran them

    async def each() -> AsyncIterator[WorkflowHistory]:
        for history in histories:
            yield history

    results = await Replayer(workflows=WORKFLOWS).replay_workflows(each(), raise_on_replay_failure=False)
    failures = {wid: str(err) for wid, err in results.replay_failures.items()}
    assert failures == {}
