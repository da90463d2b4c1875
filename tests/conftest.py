"""One real cluster per test session: Temporal dev server, control worker and API as processes,
a hub mirror (olah) on loopback serving models made on the spot, and node workers per test."""

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client

from shardline.settings import Settings
from shardline.temporal import connect, devserver_command
from tests.support.hub_mirror import HubMirror, publish_model
from tests.support.model_factory import make_tiny_model
from tests.support.throttle import ThrottledProxy, free_port

REPO = Path(__file__).resolve().parents[1]
TINY = "test-org/tiny"  # 4 layers in 3 files: quick
CHUNKY = "test-org/chunky"  # ~40 MB in 4 files: slow enough, behind the throttle, to act mid-download
TIMEOUTS = {"SHARDLINE_HEARTBEAT_TIMEOUT": "3", "SHARDLINE_NODE_WAIT": "6", "SHARDLINE_NODE_GRACE": "12"}


class Cluster:
    """The processes of a shardline cluster, started and killed the way an operator would."""

    def __init__(self, root: Path, hub: str) -> None:
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
            "SHARDLINE_API_PORT": str(self.api_port),
            "SHARDLINE_LOG_JSON": "true",
            "HF_ENDPOINT": self.hub,
            "HF_HOME": str(self.root / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONPATH": str(REPO),
            **TIMEOUTS,
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

    def start_control(self) -> None:
        self.spawn("control", [sys.executable, "-m", "shardline", "control"])

    def start_api(self) -> None:
        self.spawn("api", [sys.executable, "-m", "shardline", "api"])
        wait_http(self.api + "/healthz")

    def start_node(self, node_id: str, hub: str | None = None, **extra: str) -> Path:
        home = self.root / "nodes" / node_id
        extra = {"SHARDLINE_NODE_ID": node_id, "SHARDLINE_HOME": str(home), **extra}
        if hub:
            extra["HF_ENDPOINT"] = hub
        self.spawn(f"node-{node_id}", [sys.executable, "-m", "shardline", "node"], **extra)
        return home

    def signal(self, name: str, sig: signal.Signals) -> None:
        self.procs[name].send_signal(sig)
        if sig == signal.SIGKILL:
            self.procs[name].wait(10)

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


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


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubMirror]:
    root = tmp_path_factory.mktemp("hub")
    mirrors = root / "mirrors"
    publish_model(make_tiny_model(root / "src-tiny", num_layers=4, num_files=3), mirrors, TINY)
    chunky = make_tiny_model(root / "src-chunky", num_layers=4, hidden_size=512, intermediate_size=1536,
                             vocab_size=512, num_files=4)  # fmt: skip
    publish_model(chunky, mirrors, CHUNKY)
    mirror = HubMirror(mirrors, root / "olah")
    mirror.start()
    yield mirror
    mirror.stop()


@pytest.fixture(scope="session")
def slow_link(hub: HubMirror) -> Iterator[ThrottledProxy]:
    proxy = ThrottledProxy(int(hub.endpoint.rsplit(":", 1)[1]), bytes_per_s=4 * 2**20).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, hub: HubMirror) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"), hub.endpoint)
    c.start_server()
    c.start_control()
    c.start_api()
    yield c
    c.stop_all()


@pytest.fixture(scope="session")
async def client(cluster: Cluster) -> Client:
    return await connect(Settings(temporal_address=cluster.address), wait_s=30)


@pytest.fixture
async def api(cluster: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=cluster.api, timeout=60) as http:
        yield http


@pytest.fixture
def node_id(cluster: Cluster) -> Iterator[str]:
    """A fresh node id; its worker (if the test starts one) is stopped afterwards."""
    node = f"n{uuid.uuid4().hex[:8]}"
    yield node
    cluster.stop(f"node-{node}")
