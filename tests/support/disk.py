"""A small disk of its own for a node: a tmpfs of a chosen size mounted over a directory. Needs root."""

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def can_mount() -> str | None:
    """None when this machine lets the tests mount a tmpfs, else why not."""
    if os.geteuid() != 0:
        return "mounting a small disk needs root"
    return None


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """`path` becomes a filesystem of `size` (e.g. "16M") until the block ends."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True, timeout=10)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=10)


def fill(path: Path) -> int:
    """Write `path` until its filesystem is full (what another program filling the disk looks like)."""
    written, chunk = 0, b"\0" * 2**20
    with path.open("wb") as out:
        while True:
            try:
                out.write(chunk)
                out.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return written
            written += len(chunk)
