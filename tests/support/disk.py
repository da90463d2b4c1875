"""A small disk of its own for a node: a tmpfs of a chosen size mounted over a directory. Needs root."""

import errno
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def can_mount() -> str | None:
    """None when this machine lets the tests mount a tmpfs, else why not."""
    if shutil.which("mount") is None:
        return "the mount command is not installed"
    with tempfile.TemporaryDirectory() as probe:
        try:
            with small_disk(Path(probe), "1M"):
                return None
        except subprocess.CalledProcessError as exc:
            return f"cannot mount a small disk here (needs root): {exc.stderr.decode(errors='replace').strip()}"
        except OSError as exc:
            return f"cannot mount a small disk here: {exc}"


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """`path` becomes a filesystem of `size` (e.g. "16M") until the block ends."""
    path.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    subprocess.run(mount, check=True, capture_output=True, timeout=10)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=10)


def fill(path: Path) -> None:
    """Write `path` until its filesystem is full (what another program filling the disk looks like)."""
    chunk = b"\0" * 2**20
    with path.open("wb") as out:
        while True:
            try:
                out.write(chunk)
                out.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return
