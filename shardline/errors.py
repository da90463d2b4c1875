"""Every kind of failure shardline produces, named once: set where it happens (an activity, a workflow, an API
route), carried as `ApplicationError.type` through Temporal, and turned into an HTTP status in api/errors.py."""

from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from temporalio.exceptions import ApplicationError, CancelledError


class ErrorType(StrEnum):
    BAD_INPUT = "bad_input"  # an id, request or model shardline cannot take as it is
    NOT_FOUND = "not_found"  # a repo, revision, file, node, download or instance that does not exist
    GATED = "gated"  # the hub refuses access: a token with access is needed
    DISK_FULL = "disk_full"
    CONFLICT = "conflict"  # what is on the node's disk conflicts with the request (a case twin, a foreign dir)
    IN_USE = "in_use"  # a running download or instance needs what is to be deleted
    PLACEMENT = "placement"  # no room: no node online, or the model does not fit the nodes asked for
    DEPARTED = "departed"  # the node left the cluster for good (its grace period is over)
    NODE_UNAVAILABLE = "node_unavailable"  # the node did not pick the work up, or went silent during it
    RUNNER_FAILED = "runner_failed"  # a runner could not load its shard, or exited
    GAVE_UP = "gave_up"  # an instance recovered as often as it may within its window
    HUB_UNREACHABLE = "hub_unreachable"  # no connection to the hub (or its mirror)
    TRANSIENT = "transient"  # anything else a retry may fix
    UNAVAILABLE = "unavailable"  # the cluster's Temporal server did not answer
    CANCELED = "canceled"
    INTERNAL = "internal"  # a failure no one named: a bug


# what a retry of the same work may fix; every other type fails at once
RETRYABLE = frozenset({ErrorType.TRANSIENT, ErrorType.HUB_UNREACHABLE, ErrorType.UNAVAILABLE})
NON_RETRYABLE = [t.value for t in ErrorType if t not in RETRYABLE]
_VALUES = frozenset(t.value for t in ErrorType)


def error(
    kind: ErrorType,
    message: str,
    cause: BaseException | None = None,
    *,
    non_retryable: bool | None = None,
    details: Sequence[Any] = (),
) -> ApplicationError:
    """The error to raise for a failure of this kind; retryable as the kind says unless told otherwise
    (a workflow's own failure is final). `details` travel with it (what a failed workflow last knew)."""
    final = kind not in RETRYABLE if non_retryable is None else non_retryable
    err = ApplicationError(message, *details, type=kind.value, non_retryable=final)
    if cause is not None:
        err.__cause__ = cause
    return err


def cause_message(err: BaseException) -> str:
    """What a failure says: its cause's message (an activity's, a child workflow's or a workflow's
    ApplicationError), else the cause, or the error itself, as text."""
    cause = getattr(err, "cause", None)
    return getattr(cause, "message", None) or str(cause or err)


def error_type(exc: BaseException | None) -> ErrorType | None:
    """The type of the first typed error in `exc`'s chain of causes (a workflow's failure, an activity's, a
    child workflow's); None if no one named it (e.g. in a history recorded before errors had types)."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, ApplicationError) and exc.type in _VALUES:
            return ErrorType(exc.type)
        if isinstance(exc, CancelledError):
            return ErrorType.CANCELED
        exc, seen = getattr(exc, "cause", None) or exc.__cause__, seen + 1
    return None


class ShardlineError(Exception):
    """A failure the API answers, of a known type (api/errors.py picks the status)."""

    def __init__(self, kind: ErrorType, message: str) -> None:
        super().__init__(message)
        self.type = kind
        self.message = message
