"""Hub and disk errors, sorted into what a retry can fix and what it cannot."""

import errno

from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from temporalio.exceptions import ApplicationError

# kind -> may a retry help?
RETRYABLE = {
    "transient": True,
    "not_found": False,
    "gated": False,
    "disk_full": False,
    "bad_input": False,
}


def classify(exc: BaseException, what: str) -> tuple[str, str]:
    """(kind, sentence) for an exception raised while fetching `what` (a repo id or file)."""
    if isinstance(exc, GatedRepoError):  # a subclass of RepositoryNotFoundError: check first
        return "gated", f"repo {what} is gated: set HF_TOKEN to a token with access"
    if isinstance(exc, RevisionNotFoundError):
        return "not_found", f"revision not found in {what}"
    if isinstance(exc, RepositoryNotFoundError):
        return "not_found", f"repo {what} not found (or private: set HF_TOKEN)"
    if isinstance(exc, EntryNotFoundError):
        return "not_found", f"file not found in {what}: {exc}"
    if isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code in (401, 403):
        return (
            "gated",
            f"access to {what} denied ({exc.response.status_code}): set HF_TOKEN",
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk_full", f"disk full while fetching {what}"
    return "transient", f"fetching {what} failed: {type(exc).__name__}: {exc}"


def application_error(kind: str, message: str) -> ApplicationError:
    return ApplicationError(message, type=kind, non_retryable=not RETRYABLE.get(kind, True))
