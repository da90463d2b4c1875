"""How a failed node-bound activity reads to a person, and whether the workflow tries again."""

from temporalio.api.common.v1 import Payload
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    ChildWorkflowError,
    RetryState,
    TimeoutError,
    TimeoutType,
)

from shardline.errors import ErrorType, error, error_type
from workflows.common import failure_reason, failure_type, never_started, not_picked_up, worth_retrying


def activity_error(cause: BaseException) -> ActivityError:
    err = ActivityError(
        "activity failed", scheduled_event_id=1, started_event_id=2, identity="w", activity_type="download_model",
        activity_id="1", retry_state=RetryState.MAXIMUM_ATTEMPTS_REACHED,
    )  # fmt: skip
    err.__cause__ = cause
    return err


def timeout(kind: TimeoutType, details: list[Payload] | None = None) -> TimeoutError:
    return TimeoutError("timeout", type=kind, last_heartbeat_details=details or [])


def test_heartbeat_timeout_names_the_node() -> None:
    err = activity_error(timeout(TimeoutType.HEARTBEAT))
    assert failure_reason(err, "ghost", wait_s=300, heartbeat_s=30) == "node ghost unavailable: no heartbeat for 30 s"


def test_schedule_to_start_timeout_names_the_node() -> None:
    err = activity_error(timeout(TimeoutType.SCHEDULE_TO_START))
    assert "node ghost unavailable" in failure_reason(err, "ghost", wait_s=300, heartbeat_s=30)
    assert not worth_retrying(err)


def test_retry_only_a_node_that_made_progress() -> None:
    assert worth_retrying(activity_error(timeout(TimeoutType.HEARTBEAT, [Payload(data=b"1")])))
    assert not worth_retrying(activity_error(timeout(TimeoutType.HEARTBEAT)))  # swallowed by a frozen node


def test_never_started_is_only_a_silent_heartbeat_timeout() -> None:
    assert never_started(activity_error(timeout(TimeoutType.HEARTBEAT)))
    assert not never_started(activity_error(timeout(TimeoutType.HEARTBEAT, [Payload(data=b"1")])))
    assert not never_started(activity_error(timeout(TimeoutType.SCHEDULE_TO_START)))
    assert not never_started(activity_error(ApplicationError("connection reset")))


def test_not_picked_up_is_only_a_schedule_to_start_timeout() -> None:
    assert not_picked_up(activity_error(timeout(TimeoutType.SCHEDULE_TO_START)))
    assert not not_picked_up(activity_error(timeout(TimeoutType.HEARTBEAT)))
    assert not not_picked_up(activity_error(ApplicationError("connection reset")))


def test_application_errors_keep_their_message() -> None:
    fatal = activity_error(ApplicationError("repo o/m not found", non_retryable=True))
    assert failure_reason(fatal, "n1", wait_s=1, heartbeat_s=1) == "repo o/m not found"
    assert not worth_retrying(fatal)
    assert worth_retrying(activity_error(ApplicationError("connection reset")))


def test_a_node_that_never_took_the_work_or_went_silent_is_unavailable() -> None:
    for kind in (TimeoutType.HEARTBEAT, TimeoutType.SCHEDULE_TO_START):
        assert failure_type(activity_error(timeout(kind))) == ErrorType.NODE_UNAVAILABLE


def test_the_activity_s_own_type_is_kept() -> None:
    full = activity_error(error(ErrorType.DISK_FULL, "disk full: o/m needs 9 more bytes, 1 free"))
    assert failure_type(full) == ErrorType.DISK_FULL
    assert failure_type(activity_error(ApplicationError("KeyError: 'x'", type="KeyError"))) == ErrorType.INTERNAL


def test_the_type_survives_a_workflow_and_its_parent() -> None:
    """run_on_node ends with error(type, reason, cause): a serve's child download that failed still says why."""
    gated = activity_error(error(ErrorType.GATED, "repo o/m is gated: set HF_TOKEN"))
    workflow_failure = error(failure_type(gated), "repo o/m is gated: set HF_TOKEN", gated, non_retryable=True)
    child = ChildWorkflowError(
        "child failed", namespace="default", workflow_id="download:n1:o/m", run_id="r", workflow_type="Download",
        initiated_event_id=1, started_event_id=2, retry_state=RetryState.NON_RETRYABLE_FAILURE,
    )  # fmt: skip
    child.__cause__ = workflow_failure
    assert workflow_failure.non_retryable and workflow_failure.__cause__ is gated
    assert error_type(child) == ErrorType.GATED
    assert error_type(CancelledError("canceled")) == ErrorType.CANCELED
    assert error_type(ApplicationError("gave up after 3 recoveries")) is None  # recorded before types: unknown
