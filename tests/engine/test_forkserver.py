"""Runners forked by the fork server: the same runner, owned, signalled and reaped as a child would be."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from temporalio.testing import ActivityEnvironment

from activities.runner import ForkedProcess, ShardActivities, runner_env, stop_process
from shardline.engine.forkserver import ForkServer, ForkServerGone
from shardline.settings import Settings
from tests.engine.test_runner import gone
from tests.support.runners import rank_specs

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="runners are forked on Linux only"),
    pytest.mark.slow(22),  # seconds in make test: tests/conftest.py starts the longest files first
]


def waiting_spec(workdir: Path, qwen_dir: Path, name: str) -> Path:
    """Rank 0 of two with no rank 1: it waits in the ring's start until it is killed."""
    path = workdir / f"{name}.json"
    path.write_text(rank_specs([qwen_dir] * 2, "pipeline", [2, 2])[0].to_json())
    return path


def test_a_forked_runner_looks_and_ends_like_one_started_as_a_command(workdir: Path, qwen_dir: Path) -> None:
    server = ForkServer(runner_env("reference"))
    try:
        spec = waiting_spec(workdir, qwen_dir, "forked-waits")
        with (workdir / "forked-waits.log").open("wb") as log:
            child = server.start([str(spec)], log.fileno())
        runner = psutil.Process(child.pid)
        assert runner.ppid() == server.process.pid
        command = f"-m shardline.engine.runner {spec}"  # what ps and the tests see, once the child has set it
        deadline = time.monotonic() + 10
        while not " ".join(runner.cmdline()).endswith(command) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert " ".join(runner.cmdline()).endswith(command)
        child.kill()
        assert child.wait(10) == -signal.SIGKILL  # Popen's convention, reported by the server that reaped it
        assert gone(child.pid, within=2) and server.process.poll() is None  # the server goes on
    finally:
        server.close()


def test_each_runner_s_events_exit_and_log_reach_its_own_owner(workdir: Path) -> None:
    server = ForkServer(runner_env("reference"))
    try:

        def run(n: int) -> tuple[dict, int, str]:
            log_path = workdir / f"missing-{n}.log"
            with log_path.open("wb") as log:
                child = server.start([str(workdir / f"missing-{n}.json")], log.fileno())
            with open(child.stdout_fd, encoding="utf-8") as events:
                event = json.loads(events.readline())
            return event, child.wait(30), log_path.read_text()

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(run, range(4)))
    finally:
        server.close()
    for n, (event, code, log) in enumerate(results):
        assert code == 2  # could not start
        assert event["event"] == "error" and f"missing-{n}.json" in event["message"]
        assert f"missing-{n}.json" in log and "FileNotFoundError" in log


PARENT = """
import sys, time
from activities.runner import runner_env
from shardline.engine.forkserver import ForkServer
server = ForkServer(runner_env("reference"))
child = server.start([sys.argv[1]], 2)
print(server.process.pid, child.pid, flush=True)
time.sleep(600)
"""


def test_server_and_runners_die_with_their_owner(workdir: Path, qwen_dir: Path) -> None:
    spec = waiting_spec(workdir, qwen_dir, "owner-dies")
    owner = subprocess.Popen([sys.executable, "-c", PARENT, str(spec)], stdout=subprocess.PIPE, text=True)
    server_pid, runner_pid = map(int, owner.stdout.readline().split())  # type: ignore[union-attr]
    assert psutil.Process(runner_pid).is_running()
    os.kill(owner.pid, signal.SIGKILL)  # a node worker killed with -9
    owner.wait()
    try:
        assert gone(server_pid, within=10) and gone(runner_pid, within=10)
    finally:
        for pid in (server_pid, runner_pid):
            if not gone(pid, within=0):
                os.kill(pid, signal.SIGKILL)


def test_a_killed_server_takes_its_runners_and_says_so(workdir: Path, qwen_dir: Path) -> None:
    server = ForkServer(runner_env("reference"))
    with (workdir / "server-killed.log").open("wb") as log:
        child = server.start([str(waiting_spec(workdir, qwen_dir, "server-killed"))], log.fileno())
    os.kill(server.process.pid, signal.SIGKILL)
    assert child.wait(15) == -signal.SIGKILL  # killed with the server, and its owner knows
    assert gone(child.pid, within=5)
    with pytest.raises(ForkServerGone):
        server.start(["/nowhere.json"], 2)


async def test_a_node_forks_its_runners_and_starts_them_anew_when_it_cannot(tmp_path: Path) -> None:
    async def start(shards: ShardActivities, name: str) -> tuple[object, dict, int]:
        with (tmp_path / f"{name}.log").open("ab") as log:
            proc = await shards._start_runner(tmp_path / f"{name}.json", log.fileno())  # no such spec: exit 2
        assert proc.stdout is not None
        event = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
        code = await asyncio.wait_for(proc.wait(), 30)
        if isinstance(proc, ForkedProcess):
            proc.close()
        return proc, event, code

    settings = Settings(home=tmp_path, runner_blas="reference")
    shards = ShardActivities(None, settings, "n1")  # type: ignore[arg-type] - starting runners needs no client
    try:
        forked, event, code = await start(shards, "first")
        assert isinstance(forked, ForkedProcess) and code == 2 and "first.json" in event["message"]
        server = shards._forkserver
        assert server is not None
        os.kill(server.process.pid, signal.SIGKILL)
        await asyncio.to_thread(server.process.wait)
        await asyncio.sleep(0.5)  # the server's end reaches its client
        fallback, event, code = await start(shards, "second")  # started as a command, and a new server next time
        assert isinstance(fallback, asyncio.subprocess.Process) and code == 2 and "second.json" in event["message"]
        again, _, code = await start(shards, "third")
        assert isinstance(again, ForkedProcess) and code == 2 and shards._forkserver is not server
        await stop_process(again)  # already ended: nothing to signal
    finally:
        if shards._forkserver is not None:
            shards._forkserver.close()
    plain = ShardActivities(None, Settings(home=tmp_path, runner_fork=False), "n2")  # type: ignore[arg-type]
    proc, _, code = await start(plain, "fourth")
    assert isinstance(proc, asyncio.subprocess.Process) and code == 2

    # a server that dies before it ever forks a runner (a system without pidfds, say) is not started again
    broken = ShardActivities(None, settings, "n3")  # type: ignore[arg-type]
    broken._forkserver = ForkServer(runner_env("reference"))
    broken._forkserver.process.kill()
    await asyncio.to_thread(broken._forkserver.process.wait)
    for name in ("fifth", "sixth"):
        proc, _, code = await start(broken, name)
        assert isinstance(proc, asyncio.subprocess.Process) and code == 2 and broken._forkserver is None


async def test_a_node_heartbeats_while_its_first_runner_starts_and_a_cancel_then_leaves_none(
    workdir: Path, qwen_dir: Path, tmp_path: Path
) -> None:
    def running(spec: Path) -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"]) if str(spec) in " ".join(p.info["cmdline"] or [])]

    beats: list[tuple] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details)
    shards = ShardActivities(None, Settings(home=tmp_path, runner_blas="reference"), "n1")  # type: ignore[arg-type]
    try:
        spec = waiting_spec(workdir, qwen_dir, "first-start")
        began = time.monotonic()
        with (tmp_path / "first.log").open("ab") as log:
            proc = await env.run(shards._start_beating, spec, log.fileno())  # the fork server starts: over a second
        took = time.monotonic() - began
        assert beats and set(beats) == {("starting",)} and len(beats) >= int(took), (took, beats)  # one a second
        await stop_process(proc)
        assert proc.returncode is not None

        cancelled = waiting_spec(workdir, qwen_dir, "cancelled-start")
        shards._forkserver.close()  # type: ignore[union-attr]
        shards._forkserver = None  # so that the next start waits for a new server's imports, and is cancelled then
        with (tmp_path / "cancelled.log").open("ab") as log:
            start = asyncio.create_task(env.run(shards._start_beating, cancelled, log.fileno()))
            await asyncio.sleep(0.3)
            env.cancel()
            with pytest.raises(asyncio.CancelledError):
                await start
        assert not running(cancelled)  # started after all, then stopped: no runner is left behind
    finally:
        if shards._forkserver is not None:
            shards._forkserver.close()
