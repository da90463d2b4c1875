"""What the benchmarks share: the product's default timeouts, the machine's figures, a cluster of real processes
(Temporal dev server, control worker, API, node workers) to time, and ranks of a bench's own on a loopback ring."""

import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.support.hub_mirror import HubMirror
from tests.support.processes import Cluster, free_port

# the product's defaults, not the tests' short TIMEOUTS
DEFAULTS = {"SHARDLINE_HEARTBEAT_TIMEOUT": "30", "SHARDLINE_NODE_WAIT": "300", "SHARDLINE_NODE_GRACE": "600"}


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    return {
        "cpu": model.group(1) if model else platform.processor(),
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }


def wait_for(probe: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = probe()
            if found:
                return found
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"not within {timeout} s: {what}")


def start_cluster(root: Path, hub_endpoint: str) -> Cluster:
    """Temporal, the control worker and the API, with the product's default timeouts."""
    return Cluster(root, hub_endpoint, **DEFAULTS).start_all()


@contextmanager
def cluster_on_mirror(root: Path) -> Iterator[Cluster]:
    """olah serving root/mirrors and a cluster fetching from it; every process stopped on the way out."""
    mirror = HubMirror(root / "mirrors", root / "olah")
    cluster: Cluster | None = None
    try:
        mirror.start()
        cluster = start_cluster(root / "cluster", mirror.endpoint)
        yield cluster
    finally:
        if cluster is not None:
            for name in reversed(list(cluster.procs)):  # nodes first: a worker without Temporal waits to stop
                cluster.stop(name)
        mirror.stop()


def cluster_logs(root: Path) -> list[Path]:
    """The logs of cluster_on_mirror(root)'s processes and of its runners."""
    return [*(root / "cluster" / "logs").glob("*.log"), *(root / "cluster").glob("nodes/*/runs/*/*.log")]


def start_node(cluster: Cluster, node_id: str) -> Path:
    """A node worker, once it is online; its home."""
    home = cluster.start_node(node_id)

    def online() -> bool:
        nodes = httpx.get(f"{cluster.api}/nodes", timeout=30).json()
        return any(n["node_id"] == node_id and n["state"] == "online" for n in nodes)

    wait_for(online, 90, f"node {node_id} online")
    return home


def save(out: Path, data: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(f"\nwritten: {out}")


def rank_result(command: list[str], root: Path, name: str, ranks: int = 2) -> Any:
    """Run `command` as rank 0, with ranks 1.. beside it on a loopback ring started as mlx.launch starts them
    (MLX_RANK, MLX_HOSTFILE), or alone with `ranks` 1; the JSON after rank 0's last `RESULT ` line."""
    env = dict(os.environ)
    peers: list[subprocess.Popen[bytes]] = []
    logs = [root / f"{name}-rank{rank}.log" for rank in range(1, ranks)]
    if ranks > 1:
        hostfile = root / f"{name}-hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(ranks)]))
        env["MLX_HOSTFILE"] = str(hostfile)
        for rank, path in enumerate(logs, start=1):
            with path.open("w") as log:
                peers.append(subprocess.Popen(command, env={**env, "MLX_RANK": str(rank)}, stdout=log,
                                              stderr=subprocess.STDOUT))  # fmt: skip
    out = subprocess.run(command, env={**env, "MLX_RANK": "0"}, capture_output=True, text=True, timeout=1800)
    for peer in peers:
        peer.wait(60)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        others = "".join(f"\n{path.stem}:\n{path.read_text()[-3000:]}" for path in logs)
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}{others}")
    return json.loads(lines[-1].removeprefix("RESULT "))
