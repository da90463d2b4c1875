"""`shardline up`: the embedded Temporal server and one process per piece, stopped together.

Every child is tied to `up` (shardline.lifeline): none outlives it, even when `up` is killed with SIGKILL.
Each sits in a session of its own, so Ctrl-C in a terminal reaches `up` alone, and `up` stops them all
at once: SIGINT, SIGTERM or SIGHUP stop everything within STOP_S.
"""

import asyncio
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import structlog

from shardline.discovery import Advertiser
from shardline.settings import Settings
from shardline.temporal import connect, ensure_search_attributes, start_devserver

log = structlog.get_logger(__name__)
PIECES = ("control", "node", "api")
SERVER_AFTER_S = 1.0  # the dev server stops once the pieces have, or this long after them at the latest
STOP_S = 2.8  # then whatever still runs is killed: all of it is gone within 3 s of the signal
STALE_STOP_S = 5.0


class UpError(RuntimeError):
    """`up` cannot start; the message says what to do."""


def piece_env(piece: str, settings: Settings) -> dict[str, str]:
    """Each process serving SDK metrics needs a port of its own: SHARDLINE_METRICS_PORT for control, +1 for the node.
    Our node knows where Temporal is (it browses for no cluster); with --lan, what `lan_settings` chose goes too."""
    env = os.environ.copy()
    offsets = {"control": 0, "node": 1}
    if settings.metrics_port is not None and piece in offsets:
        env["SHARDLINE_METRICS_PORT"] = str(settings.metrics_port + offsets[piece])
    if piece == "node":
        env["SHARDLINE_DISCOVER_S"] = "0"
    if settings.lan:
        env |= {"SHARDLINE_LAN": "true", "SHARDLINE_API_HOST": settings.api_host,
                "SHARDLINE_NODE_HOST": settings.node_host or "",
                "SHARDLINE_TEMPORAL_UI_URL": settings.temporal_ui}  # fmt: skip
    return env


def spawn(piece: str, settings: Settings) -> subprocess.Popen[bytes]:
    """The piece ties itself to us (`--parent-pid`: shardline.lifeline.hold) as its first act."""
    cmd = [sys.executable, "-m", "shardline", piece, "--parent-pid", str(os.getpid())]
    return subprocess.Popen(cmd, env=piece_env(piece, settings), start_new_session=True)


def run_all(settings: Settings) -> int:
    try:
        with claim_home(settings.home):
            if settings.embedded:
                stop_stale_devserver(settings)
            check_ports(settings)
            return asyncio.run(supervise(settings))
    except UpError as err:
        log.error("up.cannot_start", reason=str(err))
        return 2


@contextmanager
def claim_home(home: Path) -> Iterator[None]:
    """One `up` per data dir. The lock dies with this process however it ends (children do not inherit it)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "up.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise UpError(
                f"another `shardline up` (pid {lock.read().strip() or '?'}) is running on {home}: stop it first"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def stop_stale_devserver(settings: Settings) -> None:
    """A dev server on our database that no `shardline up` owns (left by an `up` killed before dev servers were
    tied to it) is ours to stop: we hold the data dir's lock, and it serves our database file."""
    db = str(settings.home / "temporal.db")
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "start-dev" not in cmd or db not in cmd:
            continue
        parent = proc.parent()
        if parent is not None and "shardline" in " ".join(parent.cmdline()):
            raise UpError(f"{db} is in use by the Temporal dev server (pid {proc.pid}) of another `shardline up` "
                          f"(pid {parent.pid}): stop that one first")  # fmt: skip
        log.warning("temporal.stale_server", pid=proc.pid, database=db, action="stopping it")
        proc.terminate()
        _, alive = psutil.wait_procs([proc], timeout=STALE_STOP_S)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=STALE_STOP_S)


def check_ports(settings: Settings) -> None:
    ports = [(settings.api_host, settings.api_port, "SHARDLINE_API_PORT")]
    if settings.embedded:
        ports += [(settings.bind_host, settings.temporal_port, "SHARDLINE_TEMPORAL_PORT"),
                  (settings.bind_host, settings.ui_port, "SHARDLINE_UI_PORT")]  # fmt: skip
    for host, port, variable in ports:
        if not port_free(host, port):
            raise UpError(f"port {port} ({variable}) is taken{holder(port)}: stop that, or set {variable}")


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no obstacle
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def holder(port: int) -> str:
    """' by pid N (command)', where this user may see who listens on `port`."""
    try:
        pids = {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.pid}
        return "".join(f" by pid {pid} ({' '.join(psutil.Process(pid).cmdline()[:4])})" for pid in sorted(pids))
    except (psutil.Error, OSError):
        return ""


async def supervise(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    server = start_devserver(settings) if settings.embedded else None  # first: no other thread runs yet
    pieces: dict[str, subprocess.Popen[bytes]] = {}
    advertiser: Advertiser | None = None
    try:
        advertiser = Advertiser(settings) if settings.lan else None
        if server:
            log.info("temporal.started", address=f"{settings.bind_host}:{settings.temporal_port}",
                     ui=settings.temporal_ui, authentication="none")  # fmt: skip
        if not await until_stopped(prepare(settings), stop):
            return 0
        pieces = {piece: spawn(piece, settings) for piece in PIECES}
        log.info("cluster.up", api=f"http://{settings.api_host}:{settings.api_port}")
        if advertiser:
            log.warning("lan.exposed", hosts=list(advertiser.advert.hosts), temporal_port=settings.temporal_port,
                        ui=settings.temporal_ui, api_port=settings.api_port, api_key=settings.api_key is not None,
                        note="Temporal and its UI take no authentication: anyone on this network can run the "
                        "cluster (README: Several machines on a LAN)")  # fmt: skip
            if not await until_stopped(advertiser.start(), stop):
                return 0
        while not stop.is_set() and all(p.poll() is None for p in pieces.values()):
            await until_stopped(asyncio.sleep(1), stop)
        failed = [name for name, p in pieces.items() if p.poll() not in (None, 0)]
        if failed:
            log.error("cluster.piece_exited", pieces=failed)
        return 1 if failed else 0
    finally:
        await asyncio.gather(stop_all(pieces, server), unadvertise(advertiser))


async def unadvertise(advertiser: Advertiser | None) -> None:
    """The goodbye, so nodes forget the cluster at once; bounded, as `up` stops within 3 s."""
    if advertiser:
        with suppress(TimeoutError, OSError):
            await asyncio.wait_for(advertiser.stop(), SERVER_AFTER_S)


async def prepare(settings: Settings) -> None:
    client = await connect(settings, wait_s=60)
    await ensure_search_attributes(client, settings.namespace)


async def until_stopped(work: object, stop: asyncio.Event) -> bool:
    """Run `work` (a coroutine) unless `stop` comes first; whether it finished."""
    task = asyncio.ensure_future(work)  # type: ignore[arg-type]
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not task.done():
        task.cancel()
        return False
    task.result()
    return True


async def stop_all(pieces: dict[str, subprocess.Popen[bytes]], server: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM to every piece at once; to the dev server once they are gone (their last reports reach it),
    or SERVER_AFTER_S later at the latest; SIGKILL to whatever still runs at STOP_S."""
    started = time.monotonic()
    for proc in pieces.values():
        terminate(proc)
    await exited(pieces.values(), started + SERVER_AFTER_S)
    everything = {**pieces, **({"temporal": server} if server else {})}
    if server:
        terminate(server)
    await exited(everything.values(), started + STOP_S)
    killed = [name for name, proc in everything.items() if proc.poll() is None]
    for name in killed:
        everything[name].kill()
    for proc in everything.values():
        proc.wait()
    if everything:
        codes = {name: proc.returncode for name, proc in everything.items()}
        log.info("cluster.stopped", seconds=round(time.monotonic() - started, 2), exit_codes=codes, killed=killed)


def terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()


async def exited(procs: Iterable[subprocess.Popen[bytes]], deadline: float) -> None:
    running = list(procs)
    while time.monotonic() < deadline:
        if all(p.poll() is not None for p in running):
            return
        await asyncio.sleep(0.05)
