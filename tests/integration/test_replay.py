"""Every workflow history the session's real cluster produced replays with today's code: determinism."""

from collections.abc import AsyncIterator

import httpx
from temporalio.client import Client, WorkflowHistory
from temporalio.worker import Replayer

from tests.conftest import TINY, Cluster
from tests.support.waits import start_download, wait_download, wait_node
from workers.control import WORKFLOWS


async def test_histories_replay_deterministically(
    cluster: Cluster, client: Client, api: httpx.AsyncClient, node_id: str
) -> None:
    # a download and a delete of its own, whatever else this cluster ran before (tests run in any order)
    cluster.start_node(node_id)
    await wait_node(api, node_id, "online")
    assert (await wait_download(api, await start_download(api, TINY, node_id)))["state"] == "completed"
    deleted = await api.delete(f"/nodes/{node_id}/models/{TINY}")
    assert deleted.status_code == 200 and deleted.json()["state"] == "completed", deleted.text
    histories = [h async for h in client.list_workflows("ExecutionStatus != 'Running'").map_histories()]
    kinds = {h.events[0].workflow_execution_started_event_attributes.workflow_type.name for h in histories}
    assert {"DownloadWorkflow", "DeleteModelWorkflow"} <= kinds, kinds

    async def each() -> AsyncIterator[WorkflowHistory]:
        for history in histories:
            yield history

    results = await Replayer(workflows=WORKFLOWS).replay_workflows(each(), raise_on_replay_failure=False)
    failures = {wid: str(err) for wid, err in results.replay_failures.items()}
    assert failures == {}
