"""Any shardline workflow by its id: what `shardline cancel WORKFLOW_ID` calls (downloads and instances also have
their own DELETE routes, which say more about them)."""

from fastapi import APIRouter, Response, status
from temporalio.client import WorkflowExecutionStatus

from api.deps import ClientDep
from api.schemas import ADMIN_STATUSES, Accepted, ErrorOut, WorkflowPath, error_responses
from shardline.errors import ErrorType, ShardlineError
from shardline.ids import InvalidId, parse_workflow_id
from shardline.states import Kind, WorkState
from workflows import client as workflows
from workflows.state import describe, state_of

router = APIRouter(prefix="/workflows", tags=["workflows"], responses=error_responses(ErrorOut, ADMIN_STATUSES))


@router.delete(
    "/{workflow_id:path}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Accepted,
    responses={200: {"model": Accepted, "description": "the workflow had already ended: left as it is"}},
)
async def cancel_workflow(workflow_id: WorkflowPath, client: ClientDep, response: Response) -> Accepted:
    """Ask a running workflow to cancel (202, state `canceling`); one that already ended is left as it is (200)."""
    try:
        kind, _ = parse_workflow_id(workflow_id)
    except InvalidId as exc:
        raise ShardlineError(ErrorType.BAD_INPUT, str(exc)) from exc
    if kind not in set(Kind):
        message = f"{workflow_id} is not a shardline workflow: ids start with node:, download:, delete: or serve:"
        raise ShardlineError(ErrorType.BAD_INPUT, message)
    found = await describe(client, workflow_id)
    if found is None:
        raise ShardlineError(ErrorType.NOT_FOUND, f"no workflow {workflow_id}")
    if found.status != WorkflowExecutionStatus.RUNNING:
        response.status_code = status.HTTP_200_OK  # already over: nothing to cancel
        return Accepted(workflow_id=workflow_id, state=state_of(found))
    await workflows.cancel(client, workflow_id)
    return Accepted(workflow_id=workflow_id, state=WorkState.CANCELING)
