"""The processes of a shardline cluster, started and killed the way an operator would."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from shardline.settings import Settings
from shardline.temporal import devserver_command

REPO = Path(__file__).resolve().parents[2]
# short timeouts so that failure tests finish quickly; the defaults are 30 / 300 / 600 s
TIMEOUTS = {"SHARDLINE_HEARTBEAT_TIMEOUT": "3", "SHARDLINE_NODE_WAIT": "6", "SHARDLINE_NODE_GRACE": "12"}


class Cluster:
    """The processes of a shardline cluster, started and killed the way an operator would."""

    def __init__(self, root: Path, hub: str, **overrides: str) -> None:
        self.overrides = overrides  # env for every process, over the short test TIMEOUTS
        self.root = root
        self.temporal_port, self.api_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.temporal_port}"
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.hub = hub
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        (root / "logs").mkdir(parents=True, exist_ok=True)

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "SHARDLINE_TEMPORAL_ADDRESS": self.address,
            "SHARDLINE_HOME": str(self.root / "home"),  # the control worker's cache: its own, not ~/.shardline
            "SHARDLINE_API_PORT": str(self.api_port),
            "SHARDLINE_LOG_JSON": "true",
            "HF_ENDPOINT": self.hub,
            "HF_HOME": str(self.root / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONPATH": str(REPO),
            **TIMEOUTS,
            **self.overrides,
            **extra,
        }

    def spawn(self, name: str, args: list[str], **extra: str) -> subprocess.Popen[bytes]:
        log = open(self.root / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(args, env=self.env(**extra), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self.procs[name] = proc
        return proc

    def start_server(self) -> None:
        settings = Settings(home=self.root, temporal_port=self.temporal_port, ui_port=free_port())
        self.spawn("temporal", devserver_command(settings, headless=True))

    def start_all(self) -> "Cluster":
        """Temporal, the control worker and the API: a cluster with no node yet."""
        try:
            self.start_server()
            self.start_control()
            self.start_api()
        except BaseException:
            self.stop_all()  # a cluster that never came up leaves no process behind for later runs to share cores with
            raise
        return self

    def start_control(self) -> None:
        self.spawn("control", [sys.executable, "-m", "shardline", "control"])

    def start_api(self) -> None:
        self.spawn("api", [sys.executable, "-m", "shardline", "api"])
        wait_http(self.api + "/healthz")

    def node_home(self, node_id: str) -> Path:
        return self.root / "nodes" / node_id

    def start_node(self, node_id: str, hub: str | None = None, launcher: list[str] | None = None, **extra: str) -> Path:
        """`launcher` runs it some other way, e.g. `ip netns exec <namespace>`: on another network."""
        home = self.node_home(node_id)
        extra = {"SHARDLINE_NODE_ID": node_id, "SHARDLINE_HOME": str(home), **extra}
        if hub:
            extra["HF_ENDPOINT"] = hub
        self.spawn(f"node-{node_id}", [*(launcher or []), sys.executable, "-m", "shardline", "node"], **extra)
        return home

    def signal(self, name: str, sig: signal.Signals) -> None:
        self.procs[name].send_signal(sig)
        if sig == signal.SIGKILL:
            self.procs[name].wait(10)

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            stop_process(proc)

    def stop_all(self) -> None:
        """Every process at once, then the server: workers exit at once while it is up."""
        procs = [self.procs.pop(name) for name in list(self.procs) if name != "temporal"]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in procs:
            stop_process(proc)
        self.stop("temporal")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (another process may still take it before it is bound)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], grace: float = 15) -> None:
    """SIGTERM, and SIGKILL if it has not exited within `grace` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def fetch_processes(home: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if "activities.fetch" in cmdline and (proc.info["environ"] or {}).get("SHARDLINE_HOME") == home:
                found.append(proc)
        except psutil.Error:
            continue
    return found
