"""The ring-wait shim (shardline/engine/ring_wait.c), built once per machine and preloaded into runners on Linux,
so that a rank waiting for its peers sleeps instead of keeping a core busy."""

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


def cache_dir() -> Path:
    """Machine-wide, not per node home: every node worker on this machine shares one build."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shardline"


@functools.cache
def ring_wait_library(choice: str, where: Path | None = None) -> str | None:
    """The shim to preload for `choice` ('poll'), or None: 'spin' (MLX's own loop), not Linux, or no C compiler
    (runners then spin as MLX makes them; logged once)."""
    if choice != "poll" or sys.platform != "linux":
        return None
    source = (resources.files("shardline.engine") / "ring_wait.c").read_bytes()
    folder = where or cache_dir()
    target = folder / f"ring_wait-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if target.exists():
        return str(target)
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("runner.ring_wait_unavailable", reason="no C compiler (cc) to build it: ranks will spin")
        return None
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src, out = Path(tmp) / "ring_wait.c", Path(tmp) / "ring_wait.so"
        src.write_bytes(source)
        try:
            built = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(out), str(src), "-ldl"],
                                   capture_output=True, text=True, timeout=120)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("runner.ring_wait_unavailable", reason=str(exc))
            return None
        if built.returncode != 0:
            log.warning("runner.ring_wait_unavailable", reason=built.stderr.strip()[-500:])
            return None
        os.replace(out, target)  # atomic: node workers building at once each install a whole file
    log.info("runner.ring_wait_built", library=str(target))
    return str(target)
