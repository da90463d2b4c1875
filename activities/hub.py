"""Every huggingface_hub call bounded: a hub that stalls ends the attempt instead of holding a thread forever."""

import os
from typing import TYPE_CHECKING

from huggingface_hub import set_client_factory
from huggingface_hub.utils._http import default_client_factory

if TYPE_CHECKING:
    import httpx2

DEFAULT_TIMEOUT_S = 10.0


def bound_hub_calls(timeout_s: float) -> None:
    """API calls (listing, repo info) in this process give up after `timeout_s` waiting for a connection or
    for the next bytes: huggingface_hub's own client waits forever."""

    def bounded() -> "httpx2.Client":
        client = default_client_factory()
        client.timeout = timeout_s  # type: ignore[assignment]  # httpx turns a number into a Timeout
        return client

    set_client_factory(bounded)


def hub_env(timeout_s: float) -> dict[str, str]:
    """The environment of a process that downloads: file transfers (HEAD and GET) bounded the same way. A
    stalled transfer is resumed a few times by huggingface_hub, then fails, and the next attempt resumes it."""
    seconds = str(max(1, round(timeout_s)))  # huggingface_hub reads whole seconds
    return {**os.environ, "HF_HUB_ETAG_TIMEOUT": seconds, "HF_HUB_DOWNLOAD_TIMEOUT": seconds,
            "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # fmt: skip
