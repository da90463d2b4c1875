"""DeleteModelWorkflow `delete:<node>:<model>`: a model's files off one node; already absent is success."""

from dataclasses import dataclass
from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from shardline import contracts
    from shardline.errors import ErrorType, error
    from shardline.states import WorkState
    from shardline.types import DeleteRequest, DeleteResult
    from workflows.common import CONTROL_ACTIVITY, run_on_node, set_state


@dataclass
class DeleteInput:
    node_id: str
    model_id: str
    node_wait_s: float = 300.0
    heartbeat_timeout_s: float = 30.0
    attempts: int = 3
    force: bool = False  # delete even while a download or an instance uses the model on that node


@workflow.defn(name="DeleteModelWorkflow")
class DeleteModelWorkflow:
    @workflow.run
    async def run(self, inp: DeleteInput) -> DeleteResult:
        set_state(WorkState.RUNNING, f"deleting {inp.model_id} from {inp.node_id}")
        # a history recorded before this check replays without it; `temporal workflow start` callers get it too
        if not inp.force and workflow.patched("delete-checks-users"):
            users = await workflow.execute_activity(
                contracts.model_users, DeleteRequest(inp.node_id, inp.model_id), **CONTROL_ACTIVITY
            )
            if users:
                reason = in_use_message(inp.node_id, inp.model_id, users)
                set_state(WorkState.FAILED, reason)
                raise error(ErrorType.IN_USE, reason)
        result = await run_on_node(
            contracts.delete_model,
            DeleteRequest(inp.node_id, inp.model_id),
            inp.node_id,
            wait_s=inp.node_wait_s,
            heartbeat_s=inp.heartbeat_timeout_s,
            attempts=inp.attempts,
            run_for=timedelta(minutes=30),
        )
        set_state(WorkState.COMPLETED, "removed" if result.removed else "already absent")
        return result


def in_use_message(node_id: str, model_id: str, users: list[str]) -> str:
    """Why a delete is refused while `users` (workflow ids) need the model on the node."""
    return (
        f"{model_id} on node {node_id} is in use by {', '.join(users)}: stop or cancel that first "
        "(or delete with force)"
    )
