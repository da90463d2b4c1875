"""`shardline up` on a fresh data dir: everything starts, answers, stops together, and comes back."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil

from tests.conftest import TINY
from tests.support.cluster import REPO, wait_http
from tests.support.hub_mirror import HubMirror
from tests.support.relay import free_port
from tests.support.waits import eventually, start_download, wait_download


def start_up(home: Path, ports: dict[str, int], hub: str) -> subprocess.Popen[bytes]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SHARDLINE_")},
        "SHARDLINE_HOME": str(home),
        "SHARDLINE_TEMPORAL_PORT": str(ports["temporal"]),
        "SHARDLINE_UI_PORT": str(ports["ui"]),
        "SHARDLINE_API_PORT": str(ports["api"]),
        "SHARDLINE_LOG_JSON": "true",
        "HF_ENDPOINT": hub,
        "PYTHONPATH": str(REPO),
    }
    log = open(home.parent / f"{home.name}-up.log", "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen([sys.executable, "-m", "shardline", "up"], env=env, stdout=log, stderr=subprocess.STDOUT)


def family(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    return [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]


async def online_node(http: httpx.AsyncClient) -> str | None:
    nodes = (await http.get("/nodes")).json()
    return next((n["node_id"] for n in nodes if n["state"] == "online"), None)


async def test_up_runs_everything_and_state_survives_restart(tmp_path: Path, hub: HubMirror) -> None:
    home = tmp_path / "home"
    ports = {"temporal": free_port(), "ui": free_port(), "api": free_port()}
    up = start_up(home, ports, hub.endpoint)
    try:
        wait_http(f"http://127.0.0.1:{ports['api']}/healthz", timeout=90)
        wait_http(f"http://127.0.0.1:{ports['ui']}/", timeout=30)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['api']}", timeout=30) as http:
            node_id = await eventually(lambda: online_node(http), 60, "the local node is online")
            assert (home / "node_id").read_text().strip() == node_id
            workflow_id = await start_download(http, TINY, node_id)
            assert (await wait_download(http, workflow_id))["state"] == "completed"
        assert (home / "temporal.db").exists()

        processes = family(up)
        assert len(processes) >= 5  # up, temporal, control, node, api
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
        _, alive = psutil.wait_procs(processes, timeout=15)
        assert alive == []

        up = start_up(home, ports, hub.endpoint)
        wait_http(f"http://127.0.0.1:{ports['api']}/healthz", timeout=90)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['api']}", timeout=30) as http:
            assert await eventually(lambda: online_node(http), 60, "the node is back") == node_id
            downloads = (await http.get("/downloads")).json()
            assert [(d["workflow_id"], d["state"]) for d in downloads] == [(workflow_id, "completed")]
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(60)
