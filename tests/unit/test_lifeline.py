"""shardline.lifeline on real processes: a parent is SIGKILLed, and what it started dies with it, by each
mechanism (prctl on Linux, the leash and the parent watch that macOS uses); and `up`'s start-up checks."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from shardline.settings import Settings
from shardline.supervisor import UpError, check_ports, claim_home

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def run_parent(body: str) -> tuple[subprocess.Popen[str], int]:
    """A parent process that starts one child (`body` sets `child`: a pid), prints its pid, and waits."""
    code = "import os, subprocess, sys, time\nfrom shardline import lifeline\n" + textwrap.dedent(body)
    code += "\nprint(child, flush=True)\ntime.sleep(60)\n"
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    return parent, int(parent.stdout.readline())


def dies_with_parent(body: str) -> None:
    parent, child = run_parent(body)
    assert psutil.pid_exists(child)
    parent.kill()
    parent.wait()
    _, alive = psutil.wait_procs([psutil.Process(child)], timeout=3)
    assert alive == [], "the child outlived its SIGKILLed parent"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_spawn_tied_child_dies_with_parent_by_prctl() -> None:
    dies_with_parent(f"child = lifeline.spawn_tied({SLEEPER!r}, start_new_session=True).pid")


def test_leashed_child_dies_with_parent() -> None:
    """The macOS path for the Go dev server: a leash process between parent and child."""
    dies_with_parent(f"""
        leash = subprocess.Popen(lifeline.leash_command({SLEEPER!r}), start_new_session=True)
        import psutil
        while not psutil.Process(leash.pid).children():
            time.sleep(0.05)
        child = psutil.Process(leash.pid).children()[0].pid
    """)


def test_held_python_child_dies_with_parent() -> None:
    hold = "import os, sys, time; from shardline.lifeline import hold; hold(int(sys.argv[1])); time.sleep(60)"
    dies_with_parent(f"child = subprocess.Popen([sys.executable, '-c', {hold!r}, str(os.getpid())]).pid")


def test_parent_watch_thread_ends_child() -> None:
    """The macOS path for a Python piece: a thread that watches the parent pid."""
    watch = "import sys, time, threading; from shardline import lifeline\n"
    watch += "threading.Thread(target=lifeline._watch, args=(int(sys.argv[1]),), daemon=True).start(); time.sleep(60)"
    dies_with_parent(f"child = subprocess.Popen([sys.executable, '-c', {watch!r}, str(os.getpid())]).pid")


def test_leash_passes_sigterm_and_exit_status() -> None:
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(7)); print(1, flush=True); "
    code += "time.sleep(60)"
    leash = subprocess.Popen(
        [sys.executable, "-m", "shardline.lifeline", str(os.getpid()), sys.executable, "-c", code],
        stdout=subprocess.PIPE,
    )
    assert leash.stdout is not None
    leash.stdout.readline()
    leash.send_signal(signal.SIGTERM)
    assert leash.wait(5) == 7


def test_one_up_per_data_dir(tmp_path: Path) -> None:
    with claim_home(tmp_path), pytest.raises(UpError, match=rf"another `shardline up` \(pid {os.getpid()}\)"):
        probe = "from pathlib import Path; import sys\nfrom shardline.supervisor import claim_home\n"
        probe += "with claim_home(Path(sys.argv[1])): pass"
        done = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True)
        raise UpError(done.stderr.strip().splitlines()[-1])
    with claim_home(tmp_path):  # released with its holder
        pass


def test_taken_port_is_named_with_its_setting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(home=tmp_path, temporal_port=port)
        with pytest.raises(UpError, match=rf"port {port} \(SHARDLINE_TEMPORAL_PORT\) is taken by pid {os.getpid()}"):
            check_ports(settings)
