"""What every node-bound activity call shares: its options and how its failure reads to a person."""

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    TimeoutError,
    TimeoutType,
)
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from shardline import contracts, search
    from shardline.errors import NON_RETRYABLE, ErrorType, error, error_type
    from shardline.ids import CONTROL_QUEUE, node_queue
    from shardline.states import NodeState, WorkState

T = TypeVar("T")
# histories recorded before a cancel always won replay the old way: they may have failed, retried or completed
CANCEL_WINS = "cancel-always-ends-canceled"
# an online node that did not pick the work up in time (200 downloads starving its cores) gets the next attempt
UNPICKED_RETRIED = "unpicked-work-retried-while-online"
# a lost attempt on a node that missed its presence heartbeat under the same load waits for it to report again
LOST_WAITS_FOR_NODE = "lost-attempt-waits-for-node"

# calls on the control worker's own queue: short, and retried by the server (the control worker restarts)
CONTROL_ACTIVITY: dict[str, Any] = {
    "task_queue": CONTROL_QUEUE,
    "start_to_close_timeout": timedelta(minutes=2),
    "retry_policy": RetryPolicy(maximum_attempts=3, non_retryable_error_types=NON_RETRYABLE),
}


def node_activity_options(node_id: str, *, wait_s: float, heartbeat_s: float, run_for: timedelta) -> dict[str, Any]:
    """One attempt that waits at most `wait_s` for the node and dies `heartbeat_s` after the node goes
    silent; the caller decides about another attempt, so work for a vanished node always ends."""
    return {
        "task_queue": node_queue(node_id),
        "schedule_to_start_timeout": timedelta(seconds=wait_s),
        "heartbeat_timeout": timedelta(seconds=heartbeat_s),
        "start_to_close_timeout": run_for,
        "retry_policy": RetryPolicy(maximum_attempts=1),
        # a canceled workflow reports Canceled only once the node has really stopped the work
        "cancellation_type": ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
    }


def failure_reason(err: ActivityError, node_id: str, *, wait_s: float, heartbeat_s: float) -> str:
    """The sentence a person reads in the UI and the API for a failed node-bound activity."""
    cause = err.cause
    if isinstance(cause, TimeoutError):
        if cause.type == TimeoutType.HEARTBEAT:
            return f"node {node_id} unavailable: no heartbeat for {heartbeat_s:g} s"
        if cause.type == TimeoutType.SCHEDULE_TO_START:
            return f"node {node_id} unavailable: it did not pick the work up within {wait_s:g} s"
        return f"node {node_id} timed out ({cause.type.name.lower() if cause.type else 'unknown'})"
    if isinstance(cause, ApplicationError):
        return cause.message
    return str(cause or err)


def failure_type(err: ActivityError) -> ErrorType:
    """The type of a failed node-bound activity: a node that never took the work or went silent is unavailable;
    otherwise what the activity named, or internal (an exception no one typed: a bug)."""
    if isinstance(err.cause, TimeoutError):
        return ErrorType.NODE_UNAVAILABLE
    return error_type(err) or ErrorType.INTERNAL


def is_cancel(err: BaseException) -> bool:
    return isinstance(err, CancelledError) or (isinstance(err, ActivityError) and isinstance(err.cause, CancelledError))


def set_state(state: str, details: str = "") -> None:
    """The state in the `ShardlineState` search attribute (a member of one of shardline.states' enums)."""
    workflow.upsert_search_attributes([search.STATE.value_set(str(state))])
    workflow.set_current_details(details or str(state))


def cancel_requested() -> bool:
    """Someone asked this workflow to cancel (and this history was recorded by code that lets the cancel win)."""
    return workflow.cancellation_reason() is not None and workflow.patched(CANCEL_WINS)


def canceled_reason(outcome: BaseException | None, node_id: str, *, heartbeat_s: float) -> str:
    """What a person reads once a cancel was asked for: that it was, and what the node did about it."""
    cause = outcome.cause if isinstance(outcome, ActivityError) else outcome
    if outcome is None:
        return f"canceled; node {node_id} had already finished the work"
    if isinstance(cause, CancelledError):
        return f"canceled; node {node_id} stopped the work"
    if isinstance(cause, TimeoutError) and cause.type == TimeoutType.HEARTBEAT:
        return f"canceled; node {node_id} did not confirm (no heartbeat for {heartbeat_s:g} s)"
    if isinstance(cause, TimeoutError):
        return f"canceled; node {node_id} did not confirm ({cause.type.name.lower() if cause.type else 'timeout'})"
    return f"canceled; node {node_id} ended with: {getattr(cause, 'message', None) or cause}"


def end_canceled(reason: str) -> NoReturn:
    """End the workflow CANCELED, whatever its last activity ended with; the reason outlives the run (memo)."""
    set_state(WorkState.CANCELED, reason)
    workflow.upsert_memo({"reason": reason})
    raise asyncio.CancelledError(reason)


def worth_retrying(err: ActivityError) -> bool:
    """A retry may help: a transient error, or a node that died after making progress (it may be back).
    An attempt that never heartbeat was swallowed by a dead or frozen node: retrying only waits again."""
    cause = err.cause
    if isinstance(cause, TimeoutError):
        return cause.type == TimeoutType.HEARTBEAT and bool(cause.last_heartbeat_details)
    if isinstance(cause, ApplicationError):
        return not cause.non_retryable
    return True


def never_started(err: ActivityError) -> bool:
    """The attempt timed out without a single heartbeat: the node never ran it."""
    cause = err.cause
    return isinstance(cause, TimeoutError) and cause.type == TimeoutType.HEARTBEAT and not cause.last_heartbeat_details


def not_picked_up(err: ActivityError) -> bool:
    """The node did not take the work within its wait: gone, or too busy to poll."""
    return isinstance(err.cause, TimeoutError) and err.cause.type == TimeoutType.SCHEDULE_TO_START


async def node_comes_back(node_id: str, within_s: float) -> bool:
    """Whether the node is online, or reports online again within `within_s`. The load that loses an attempt's
    dispatch can also delay the node's presence heartbeat, so a live node may read offline for a moment: its next
    presence puts it back online. A departed node, or one that never joined, never comes back."""
    deadline = workflow.now() + timedelta(seconds=within_s)
    while True:
        state = await workflow.execute_activity(contracts.node_state, node_id, **CONTROL_ACTIVITY)
        if state == NodeState.ONLINE:
            return True
        if state in (NodeState.DEPARTED, NodeState.UNKNOWN) or workflow.now() >= deadline:
            return False
        await workflow.sleep(min(5.0, max(1.0, within_s / 6)))


async def node_takes_work(err: ActivityError, node_id: str, heartbeat_s: float) -> bool:
    """After an attempt the node did not take or never started: whether it is there to take the next (one it never
    started waits a heartbeat timeout for the node to come back; else only whether it is online now)."""
    lost = never_started(err) and workflow.patched(LOST_WAITS_FOR_NODE)
    return await node_comes_back(node_id, heartbeat_s if lost else 0.0)


async def between_attempts(step: Awaitable[T], node_id: str, reason: str) -> T:
    """A back-off or a node check between attempts: a cancel there ends the workflow CANCELED too."""
    try:
        return await step
    except (asyncio.CancelledError, ActivityError):
        if cancel_requested():
            end_canceled(f"canceled between attempts; node {node_id} had no work running (last: {reason})")
        raise


async def run_on_node(
    activity: Callable[[Any], Awaitable[T]],
    request: Any,
    node_id: str,
    *,
    wait_s: float,
    heartbeat_s: float,
    attempts: int,
    run_for: timedelta,
) -> T:
    """Run one node-bound activity, retrying here rather than in the server so that a node that is gone
    ends the work within heartbeat + wait; a failure ends the workflow with a readable reason."""
    options = node_activity_options(node_id, wait_s=wait_s, heartbeat_s=heartbeat_s, run_for=run_for)
    reason, last = "no attempt made", None
    for attempt in range(1, attempts + 1):
        try:
            result = await workflow.execute_activity(activity, request, **options)
        except asyncio.CancelledError:
            if cancel_requested():
                end_canceled(f"canceled; node {node_id} had not started the work")
            set_state(WorkState.CANCELED)
            raise
        except ActivityError as err:
            # WAIT_CANCELLATION_COMPLETED: a cancel asked for ends only once the node confirmed it or went
            # silent; either way the person asked for a cancel and the workflow ends CANCELED
            if cancel_requested():
                end_canceled(canceled_reason(err, node_id, heartbeat_s=heartbeat_s))
            if is_cancel(err):
                set_state(WorkState.CANCELED)
                raise
            reason, last = failure_reason(err, node_id, wait_s=wait_s, heartbeat_s=heartbeat_s), err
            if attempt == attempts:
                break
            # an overloaded node may not pick the work up in time, and an overloaded server can hand a task to a
            # poll the worker no longer waits on: the attempt is lost though the node is alive. Try again then,
            # but not for a node that is gone.
            # (histories recorded before UNPICKED_RETRIED ended at once when the work was not picked up)
            # (histories recorded before LOST_WAITS_FOR_NODE asked once whether the node was online)
            lost = never_started(err) or (not_picked_up(err) and workflow.patched(UNPICKED_RETRIED))
            if not worth_retrying(err) and not (
                lost and await between_attempts(node_takes_work(err, node_id, heartbeat_s), node_id, reason)
            ):
                break
            set_state(WorkState.RETRYING, f"attempt {attempt} of {attempts} failed: {reason}")
            await between_attempts(workflow.sleep(min(2 ** (attempt - 1), 10)), node_id, reason)
        else:
            if cancel_requested():  # the node finished before the cancel reached it
                end_canceled(canceled_reason(None, node_id, heartbeat_s=heartbeat_s))
            return result
    set_state(WorkState.FAILED, reason)
    kind = failure_type(last) if last is not None else ErrorType.BAD_INPUT
    raise error(kind, reason, last, non_retryable=True)
