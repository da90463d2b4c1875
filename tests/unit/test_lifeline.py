"""shardline.lifeline on real processes: a parent is SIGKILLed, and what it started dies with it, by each
mechanism (prctl on Linux, the leash and the watchdog that macOS uses); and `up`'s start-up checks."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
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


# Holds the GIL while it waits, as MLX's ring start does for its peers: a watching thread would never run.
GIL_HOLDER = "import ctypes; ctypes.PyDLL(None).sleep(60)"


def test_watchdog_ends_a_child_that_holds_the_gil() -> None:
    """The path elsewhere than Linux (taken here too, by calling it directly): a forked watchdog."""
    code = f"import sys; from shardline import lifeline; lifeline.watchdog(int(sys.argv[1])); {GIL_HOLDER}"
    dies_with_parent(f"child = subprocess.Popen([sys.executable, '-c', {code!r}, str(os.getpid())]).pid")


def test_watchdog_ends_with_its_ward() -> None:
    code = "import sys, time; from shardline import lifeline; lifeline.watchdog(int(sys.argv[1])); time.sleep(1)"
    ward = subprocess.Popen([sys.executable, "-c", code, str(os.getpid())])
    while not psutil.Process(ward.pid).children():
        time.sleep(0.05)
    dog = psutil.Process(ward.pid).children()[0]
    assert ward.wait(10) == 0  # the watchdog did not kill a ward whose parent lives
    _, alive = psutil.wait_procs([dog], timeout=5)
    assert alive == []


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
