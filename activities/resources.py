"""What a node has: memory, backend, disk, models on disk."""

import platform
import shutil
import socket
import sys
from pathlib import Path

import psutil

from activities.completion import local_weight_map, read_completion
from shardline.model_files import COMPLETE_MARKER, Completion, held_layers
from shardline.types import NodeResources, PartialModel


def backend() -> str:
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "metal"
    if shutil.which("nvidia-smi"):
        return "cuda"
    return "cpu"


def chip() -> str:
    if sys.platform == "linux":
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def models_on_disk(models_dir: Path) -> list[str]:
    """Models downloaded whole (their completion marker says every file is complete; a layer range is not)."""
    return sorted(done.model_id for _, done in completions(models_dir) if done.full)


def partial_models(models_dir: Path) -> list[PartialModel]:
    """Models of which only some layer ranges are complete here (a serve's downloads), with those ranges."""
    found = []
    for dest, done in completions(models_dir):
        weight_map = local_weight_map(dest)
        if done.full or weight_map is None:
            continue
        if layers := held_layers(weight_map, done.complete):
            found.append(PartialModel(done.model_id, layers))
    return sorted(found, key=lambda p: p.model_id)


def completions(models_dir: Path) -> list[tuple[Path, Completion]]:
    """Each model directory with a readable completion marker, and what the marker says."""
    if not models_dir.is_dir():
        return []
    found = []
    for marker in models_dir.glob(f"**/{COMPLETE_MARKER}"):
        if (done := read_completion(marker.parent)) is not None:
            found.append((marker.parent, done))
    return found


class CacheLedger:
    """The prefix-cache bytes each runner of this node last reported (run_shard writes, presence reads)."""

    def __init__(self) -> None:
        self.by_runner: dict[str, int] = {}

    def total(self) -> int:
        return sum(self.by_runner.values())


def read_resources(
    node_id: str, home: Path, host: str = "127.0.0.1", memory_cap: int | None = None, cache_bytes: int = 0
) -> NodeResources:
    memory = psutil.virtual_memory()
    available = min(memory.available, memory_cap) if memory_cap else memory.available
    home.mkdir(parents=True, exist_ok=True)
    return NodeResources(
        node_id=node_id,
        hostname=socket.gethostname(),
        backend=backend(),
        chip=chip(),
        memory_total=memory.total,
        memory_available=available,
        disk_free=shutil.disk_usage(home).free,
        models=models_on_disk(home / "models"),
        partial_models=partial_models(home / "models"),
        host=host,
        prompt_cache_bytes=cache_bytes,
    )
