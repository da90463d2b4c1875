"""`shardline up`: the embedded Temporal server and one process per piece, stopped together."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import structlog

from shardline.settings import Settings
from shardline.temporal import connect, ensure_search_attributes, start_devserver

log = structlog.get_logger(__name__)
PIECES = ("control", "node", "api")


def piece_env(piece: str, settings: Settings) -> dict[str, str]:
    """Each process serving SDK metrics needs a port of its own: SHARDLINE_METRICS_PORT for control, +1 for the node."""
    env = os.environ.copy()
    offsets = {"control": 0, "node": 1}
    if settings.metrics_port is not None and piece in offsets:
        env["SHARDLINE_METRICS_PORT"] = str(settings.metrics_port + offsets[piece])
    return env


def spawn(piece: str, settings: Settings) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "shardline", piece], env=piece_env(piece, settings))


def stop(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_all(settings: Settings) -> int:
    server = start_devserver(settings) if settings.embedded else None
    if server:
        log.info(
            "temporal.started",
            address=settings.target,
            ui=f"http://127.0.0.1:{settings.ui_port}",
        )

    async def prepare() -> None:
        client = await connect(settings, wait_s=60)
        await ensure_search_attributes(client, settings.namespace)

    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        asyncio.run(prepare())
        children = [spawn(piece, settings) for piece in PIECES]
        log.info("cluster.up", api=f"http://{settings.api_host}:{settings.api_port}")
        while not stopping and all(c.poll() is None for c in children):
            time.sleep(0.5)
        failed = [p for p, c in zip(PIECES, children, strict=True) if c.poll() not in (None, 0)]
        if failed:
            log.error("cluster.piece_exited", pieces=failed)
        return 1 if failed else 0
    finally:
        for child in reversed(children):
            stop(child)
        if server:
            stop(server)
