"""Children that die with the process that started them, even when it is killed with SIGKILL.

`shardline up` starts every piece this way, so an `up` killed by anything (SIGKILL, the OOM killer)
leaves nothing behind: no dev server holding the port and the database, no worker polling.

- Linux: the kernel sends the child SIGKILL when its parent dies (`prctl(PR_SET_PDEATHSIG)`). The Go dev
  server gets it between fork and exec (`preexec`); a Python piece asks for it first thing (`hold`).
  The kernel fires it when the *thread* that forked exits, so `up` spawns from its main thread.
- Elsewhere (macOS): a Python piece (and every runner and fetch) forks a watchdog that SIGKILLs it within
  POLL_S of its parent's death. Not a thread: MLX's ring start holds the GIL while it waits for its peers,
  and a thread would never run. The Go dev server runs under a leash instead:
  `python -m shardline.lifeline PARENT_PID CMD...` runs CMD, passes it SIGTERM/SIGINT/SIGHUP, and SIGKILLs
  it within POLL_S of the parent's death.
"""

import ctypes
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import psutil

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_S = 0.5
ORPHANED = 3  # exit status of a process whose parent was already gone


@functools.cache
def _libc() -> ctypes.CDLL | None:
    return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def set_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel for `sig` when our parent dies; False where there is no such thing (not Linux)."""
    libc = _libc()
    return libc is not None and libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0


def preexec(parent: int) -> Callable[[], None]:
    """A Popen `preexec_fn` that ties the child to `parent` (the caller) on Linux."""
    _libc()  # loaded here, before the fork: the child does as little as it can

    def tie() -> None:
        set_death_signal()
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(ORPHANED)

    return tie


def hold(parent: int) -> None:
    """Die with `parent` (by SIGKILL), whatever the main thread is doing: called first by every process we start
    that must not outlive its starter (`up`'s pieces get its pid; runners and fetches pass `os.getppid()`).
    Call before starting threads or importing MLX: elsewhere than Linux it forks."""
    tied = set_death_signal()
    if os.getppid() != parent:  # it died while we started
        os._exit(ORPHANED)
    if not tied:
        watchdog(parent)


def watchdog(parent: int) -> None:
    """Fork a process that SIGKILLs this one when it is no longer `parent`'s child, and ends with it."""
    ward = os.getpid()
    if os.fork() != 0:
        return
    try:
        while os.getppid() == ward:
            try:
                if psutil.Process(ward).ppid() != parent:
                    os.kill(ward, signal.SIGKILL)
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(POLL_S)
    finally:
        os._exit(0)


def spawn_tied(cmd: list[str], **popen: object) -> subprocess.Popen[bytes]:
    """Start `cmd` (any program) so that it dies with this process: by prctl on Linux, else on a leash.
    Call from the main thread (see the module docstring)."""
    if _libc() is not None:
        return subprocess.Popen(cmd, preexec_fn=preexec(os.getpid()), **popen)  # type: ignore[call-overload]
    return subprocess.Popen(leash_command(cmd), **popen)  # type: ignore[call-overload]


def leash_command(cmd: list[str]) -> list[str]:
    return [sys.executable, "-m", "shardline.lifeline", str(os.getpid()), *cmd]


def leash(parent: int, cmd: list[str]) -> int:
    """Run `cmd` until it exits, or kill it when `parent` dies; its exit status, shell-style."""
    if os.getppid() != parent:
        return ORPHANED
    child = subprocess.Popen(cmd)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _: child.send_signal(signum))
    while True:
        try:
            code = child.wait(POLL_S)
        except subprocess.TimeoutExpired:
            if os.getppid() != parent:
                child.kill()
                child.wait()
                return ORPHANED
            continue
        return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(leash(int(sys.argv[1]), sys.argv[2:]))
