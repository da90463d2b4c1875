"""What both benchmarks share: the product's default timeouts, the machine's figures, and a cluster of
real processes (Temporal dev server, control worker, API, node workers) to time."""

import json
import os
import platform
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.support.hub_mirror import HubMirror
from tests.support.processes import Cluster

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
