"""An upgrade keeps every running workflow alive: the histories each earlier release recorded (tests/histories/
<release>/, by tests/support/record_histories.py) replay against today's workflow code without a server.
A change that would break them goes behind `workflow.patched(...)`, or into a new workflow type."""

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from workers.control import WORKFLOWS

HISTORIES = Path(__file__).resolve().parents[1] / "histories"
RELEASES = sorted(p for p in HISTORIES.iterdir() if p.is_dir())
FILES = sorted(f for release in RELEASES for f in release.glob("*.json") if f.name != "manifest.json")
# what every release's set holds at least once each: a long-lived node, a healed instance, a retried download, ...
TYPES = {"NodeWorkflow", "DownloadWorkflow", "DeleteModelWorkflow", "ServingWorkflow"}


def load(path: Path) -> WorkflowHistory:
    return WorkflowHistory.from_json(f"{path.parent.name}/{path.stem}", path.read_text())


def workflow_type(history: WorkflowHistory) -> str:
    return history.events[0].workflow_execution_started_event_attributes.workflow_type.name


@pytest.mark.parametrize("path", FILES, ids=[f"{f.parent.name}/{f.stem}" for f in FILES])
async def test_history_replays_with_todays_code(path: Path) -> None:
    history = load(path)
    result = await Replayer(workflows=WORKFLOWS).replay_workflow(history, raise_on_replay_failure=False)
    if result.replay_failure is not None:
        pytest.fail(
            f"{path.relative_to(HISTORIES)} ({workflow_type(history)}, recorded by release {path.parent.name}) "
            f"no longer replays: {result.replay_failure}. Put the change behind workflow.patched(...) or a new type.",
            pytrace=False,
        )


@pytest.mark.parametrize("release", RELEASES, ids=[r.name for r in RELEASES])
def test_every_workflow_type_is_recorded(release: Path) -> None:
    recorded = {workflow_type(load(f)) for f in release.glob("*.json") if f.name != "manifest.json"}
    assert recorded >= TYPES, f"release {release.name} has no history of {sorted(TYPES - recorded)}"


def test_there_is_a_release_to_replay() -> None:
    assert RELEASES and FILES, f"no recorded histories under {HISTORIES}"
