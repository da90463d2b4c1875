"""Hub and disk errors, sorted into what a retry can fix and what it cannot."""

import errno

from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from shardline.errors import ErrorType

# huggingface_hub's client is httpx, its fork httpx2, or requests (older versions): named alike in each
_UNREACHABLE = frozenset({"TransportError", "ConnectionError", "Timeout", "TimeoutError"})


def unreachable(exc: BaseException) -> bool:
    """No answer from the hub at all: refused, reset, timed out, no route, no name."""
    return any(c.__name__ in _UNREACHABLE for c in type(exc).__mro__)


def classify(exc: BaseException, what: str) -> tuple[ErrorType, str]:
    """(type, sentence) for an exception raised while fetching `what` (a repo id or file)."""
    if isinstance(exc, GatedRepoError):  # a subclass of RepositoryNotFoundError: check first
        return ErrorType.GATED, f"repo {what} is gated: set HF_TOKEN to a token with access"
    if isinstance(exc, RevisionNotFoundError):
        return ErrorType.NOT_FOUND, f"revision not found in {what}"
    if isinstance(exc, RepositoryNotFoundError):
        return ErrorType.NOT_FOUND, f"repo {what} not found (or private: set HF_TOKEN)"
    if isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
        return ErrorType.NOT_FOUND, f"file not found in {what}: {exc}"
    if isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code in (401, 403):
        return ErrorType.GATED, f"access to {what} denied ({exc.response.status_code}): set HF_TOKEN"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ErrorType.DISK_FULL, f"disk full while fetching {what}"
    if unreachable(exc) or isinstance(exc, LocalEntryNotFoundError):  # the latter: no hub, and not in the cache
        return ErrorType.HUB_UNREACHABLE, f"hub unreachable while fetching {what}: {type(exc).__name__}: {exc}"
    return ErrorType.TRANSIENT, f"fetching {what} failed: {type(exc).__name__}: {exc}"
