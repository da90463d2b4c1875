"""`shardline up` on a fresh data dir: everything starts, answers, stops together, and comes back."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from shardline.settings import Settings
from shardline.supervisor import port_free
from shardline.temporal import devserver_command
from tests.conftest import TINY
from tests.support.hub_mirror import HubMirror
from tests.support.processes import REPO, free_port, wait_http
from tests.support.serving import MESSAGES, start_instance, wait_state
from tests.support.waits import eventually, start_download, wait_download

pytestmark = pytest.mark.slow(73)  # seconds in make test: tests/conftest.py starts the longest files first


def start_up(home: Path, ports: dict[str, int], hub: str, **settings: str) -> subprocess.Popen[bytes]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SHARDLINE_")},
        "SHARDLINE_HOME": str(home),
        "SHARDLINE_TEMPORAL_PORT": str(ports["temporal"]),
        "SHARDLINE_UI_PORT": str(ports["ui"]),
        "SHARDLINE_API_PORT": str(ports["api"]),
        "SHARDLINE_LOG_JSON": "true",
        "HF_ENDPOINT": hub,
        "PYTHONPATH": str(REPO),
        **settings,
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


async def test_a_killed_up_brings_its_instance_back_ready_by_itself(tmp_path: Path, hub: HubMirror) -> None:
    """A one-node cluster: SIGKILL of `up` takes the runner with it; the next `up` finds the instance's
    workflow waiting to heal, the node back as itself, and serves it again with nobody asking."""
    home = tmp_path / "home"
    ports = {"temporal": free_port(), "ui": free_port(), "api": free_port()}
    quick = {"SHARDLINE_HEARTBEAT_TIMEOUT": "5"}
    up = start_up(home, ports, hub.endpoint, **quick)
    try:
        wait_http(f"http://127.0.0.1:{ports['api']}/healthz", timeout=90)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['api']}", timeout=60) as http:
            await eventually(lambda: online_node(http), 60, "the local node is online")
            instance_id = await start_instance(http, TINY)
            first = await wait_state(http, instance_id, {"ready", "failed"}, timeout=120)
            assert first["state"] == "ready", first
        processes = family(up)  # up, its pieces, the node's fork server and the runner forked from it
        commands = [" ".join(p.cmdline()) for p in processes]
        assert any("shardline.engine.forkserver" in c for c in commands), commands
        assert any("shardline.engine.runner" in c for c in commands), commands
        up.kill()
        up.wait(10)
        _, alive = psutil.wait_procs(processes, timeout=10)
        assert alive == [], f"outlived `up`: {[p.cmdline()[:4] for p in alive]}"
        up = start_up(home, ports, hub.endpoint, **quick)
        wait_http(f"http://127.0.0.1:{ports['api']}/healthz", timeout=90)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['api']}", timeout=60) as http:

            async def healed() -> dict[str, Any] | None:
                # until the runner's heartbeat times out, the workflow still says ready with the dead runner
                status: dict[str, Any] = (await http.get(f"/instances/{instance_id}")).json()
                done = status["state"] == "failed" or (status["state"] == "ready" and status["recoveries"] >= 1)
                return status if done else None

            back = await eventually(healed, 180, "the instance healed after the restart")
            assert back["state"] == "ready", back
            body = {"model": TINY, "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
            reply = await http.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            await http.delete(f"/instances/{instance_id}")
    finally:
        stop_quietly(up)


def start_ready(home: Path, ports: dict[str, int]) -> subprocess.Popen[bytes]:
    """`up` (no hub needed) with its API answering and its node online."""
    up = start_up(home, ports, "http://127.0.0.1:9")
    wait_http(f"http://127.0.0.1:{ports['api']}/healthz", timeout=90)
    return up


async def node_online(ports: dict[str, int]) -> str:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['api']}", timeout=30) as http:
        return await eventually(lambda: online_node(http), 60, "the local node is online")


def stop_quietly(up: subprocess.Popen[bytes]) -> None:
    if up.poll() is None:
        up.send_signal(signal.SIGTERM)
        up.wait(60)


async def test_sigkill_of_up_leaves_nothing_and_up_starts_again(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ports = {"temporal": free_port(), "ui": free_port(), "api": free_port()}
    up = start_ready(home, ports)
    try:
        node_id = await node_online(ports)
        processes = family(up)
        assert len(processes) >= 5  # up, temporal, control, node, api
        up.kill()
        killed = time.monotonic()
        _, alive = psutil.wait_procs(processes, timeout=10)
        wait_ports_free(ports.values(), killed + 10)
        cleared = time.monotonic() - killed
        print(f"everything `up` started was gone, its ports free, {cleared:.2f} s after SIGKILL")
        assert alive == [], f"outlived `up`: {[p.cmdline()[:4] for p in alive]}"
        assert all(port_free("127.0.0.1", port) for port in ports.values())
        assert cleared < 5

        up = start_ready(home, ports)
        assert await node_online(ports) == node_id  # the same node, from the same database
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['api']}", timeout=30) as http:
            nodes = (await http.get("/nodes", params={"departed": True})).json()
        assert node_id in [n["node_id"] for n in nodes]
    finally:
        stop_quietly(up)


async def test_sigterm_stops_everything_cleanly_within_3_s(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ports = {"temporal": free_port(), "ui": free_port(), "api": free_port()}
    up = start_ready(home, ports)
    try:
        await node_online(ports)
        second = start_up(home, {k: free_port() for k in ports}, "http://127.0.0.1:9")
        assert second.wait(30) == 2  # one `up` per data dir: the second says so and leaves

        processes = family(up)
        stop_times: dict[int, float] = {}
        up.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, alive = psutil.wait_procs(
            processes, timeout=15, callback=lambda p: stop_times.setdefault(p.pid, time.monotonic() - sent)
        )
        stopped = max(stop_times.values())
        per_pid = {pid: round(s, 2) for pid, s in stop_times.items()}
        print(f"every piece gone {stopped:.2f} s after SIGTERM (s per pid: {per_pid})")
        assert alive == []
        assert up.wait(5) == 0
        assert stopped < 5  # the requirement is 3 s (STOP_S kills at 2.8); slack for a loaded test machine
        log = (tmp_path / "home-up.log").read_text()
        assert "Fatal Python error" not in log
        assert "another `shardline up`" in log
        report = next(json.loads(line) for line in log.splitlines() if '"cluster.stopped"' in line)
        # Every piece exits by itself, 0. The dev server's own stop takes 1.1-1.5 s here (its frontend drains for
        # at least 1 s); on a starved 2-core CI it once ran past STOP_S and was killed, as documented.
        pieces = {name: code for name, code in report["exit_codes"].items() if name != "temporal"}
        assert set(pieces.values()) == {0} and set(report["killed"]) <= {"temporal"}, report
        assert report["exit_codes"]["temporal"] == (-signal.SIGKILL if report["killed"] else 0), report
    finally:
        stop_quietly(up)


async def test_up_stops_a_stale_dev_server_on_its_database(tmp_path: Path) -> None:
    """What a killed `up` of an older version left behind: a dev server on our database, parent gone."""
    home = tmp_path / "home"
    home.mkdir()
    ports = {"temporal": free_port(), "ui": free_port(), "api": free_port()}
    settings = Settings(home=home, temporal_port=ports["temporal"], ui_port=ports["ui"])
    stale = start_untied_devserver(settings)
    up = None
    try:
        wait_port(ports["temporal"])
        up = start_ready(home, ports)
        assert stale.wait(10) is not None  # stopped by `up`, which then took its port
        assert "temporal.stale_server" in (tmp_path / "home-up.log").read_text()
        await node_online(ports)
    finally:
        stale.kill()
        if up:
            stop_quietly(up)


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while port_free("127.0.0.1", port):
        assert time.monotonic() < deadline, f"nothing listens on {port}"
        time.sleep(0.1)


def wait_ports_free(ports: Iterable[int], deadline: float) -> None:
    while any(not port_free("127.0.0.1", port) for port in ports) and time.monotonic() < deadline:
        time.sleep(0.05)


def start_untied_devserver(settings: Settings) -> subprocess.Popen[bytes]:
    return subprocess.Popen(devserver_command(settings, headless=True), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
