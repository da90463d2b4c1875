"""Polling helpers: tests wait for what a user would see, with a deadline."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
from temporalio.client import Client, WorkflowHandle

from shardline.types import DownloadResult
from workflows import client as workflows
from workflows.download import DownloadInput, DownloadWorkflow

T = TypeVar("T")
FINAL = {"completed", "failed", "canceled", "terminated"}


async def eventually(probe: Callable[[], Awaitable[T | None]], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(0.25)
    raise AssertionError(f"not within {timeout} s: {what} (last seen: {last!r})")


async def node_state(api: httpx.AsyncClient, node_id: str) -> str | None:
    nodes = (await api.get("/nodes", params={"departed": True})).json()
    return next((n["state"] for n in nodes if n["node_id"] == node_id), None)


async def wait_node(api: httpx.AsyncClient, node_id: str, state: str, timeout: float = 30) -> None:
    async def probe() -> bool:
        return await node_state(api, node_id) == state

    await eventually(probe, timeout, f"node {node_id} {state}")


async def download(api: httpx.AsyncClient, workflow_id: str) -> dict[str, Any]:
    response = await api.get(f"/downloads/{workflow_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def wait_download(api: httpx.AsyncClient, workflow_id: str, timeout: float = 60) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        d = await download(api, workflow_id)
        return d if d["state"] in FINAL else None

    return await eventually(probe, timeout, f"{workflow_id} ends")


async def wait_progress(
    api: httpx.AsyncClient, workflow_id: str, files_done: int = 0, timeout: float = 60
) -> dict[str, Any]:
    """Until the download has moved some bytes (and finished `files_done` files)."""

    async def probe() -> dict[str, Any] | None:
        d = await download(api, workflow_id)
        assert d["state"] not in FINAL, f"download ended early: {d}"
        p = d["progress"]
        return d if p and p["bytes_done"] > 0 and p["files_done"] >= files_done else None

    return await eventually(probe, timeout, f"{workflow_id} makes progress")


async def start_download(api: httpx.AsyncClient, model: str, node_id: str) -> str:
    response = await api.post("/downloads", json={"model": model, "node_id": node_id})
    assert response.status_code == 202, response.text
    (workflow_id,) = response.json()["workflow_ids"]
    return str(workflow_id)


async def start_download_workflow(
    client: Client, inp: DownloadInput
) -> WorkflowHandle[DownloadWorkflow, DownloadResult]:
    """A DownloadWorkflow started on Temporal directly, as the API would, but past its checks and defaults."""
    return await workflows.start_download(client, inp)


async def scheduled_activities(client: Client, workflow_id: str) -> list[str]:
    """The activity types a workflow scheduled, in order: what its history says it tried."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return [e.activity_task_scheduled_event_attributes.activity_type.name for e in history.events
            if e.HasField("activity_task_scheduled_event_attributes")]  # fmt: skip
