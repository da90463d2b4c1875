"""Every huggingface_hub call bounded: a hub that stalls ends the attempt instead of holding a thread forever."""

import os
from typing import TYPE_CHECKING

from huggingface_hub import hf_hub_url, set_client_factory
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
from huggingface_hub.utils._http import default_client_factory

from shardline.model_files import HEADER_LIMIT, header_length, stored_bytes

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


def safetensors_sizes(
    repo_id: str, filename: str, revision: str, timeout_s: float, endpoint: str | None = None
) -> dict[str, int]:
    """Each tensor's stored bytes in one weight file of a repo, read from the file's header alone. It asks for
    a byte range, as huggingface_hub's get_safetensors_metadata does, but reads the answer as a stream and stops
    once the header is in: a server may ignore the range and send the whole file (olah's local mirrors do),
    which get_safetensors_metadata would read whole into memory, gigabytes per file of a large model."""
    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
    headers = {**build_hf_headers(), "Range": f"bytes=0-{HEADER_LIMIT + 7}"}
    data, need = bytearray(), 8
    with get_session().stream("GET", url, headers=headers, timeout=timeout_s, follow_redirects=True) as response:
        hf_raise_for_status(response)
        for chunk in response.iter_bytes():
            data += chunk
            need = 8 + header_length(data) if len(data) >= 8 else 8
            if len(data) >= need:
                break
    if len(data) < need:
        raise ValueError(f"{filename}: the file ended after {len(data)} bytes, inside its header")
    return stored_bytes(bytes(data[8:need]))
