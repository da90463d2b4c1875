"""A rank waiting for its ring peer sleeps: with the ring-wait shim a runner preloads, waiting costs next to no CPU
(MLX's own loop spins a core for as long as the peer takes), and what arrives is what was sent."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from activities.ring_wait import ring_wait_library
from activities.runner import runner_env
from tests.support.processes import free_port

WAIT_S = 1.5  # rank 0 makes rank 1 wait this long for its data
RANK = """
import json, os, resource, sys, time
import mlx.core as mx
group = mx.distributed.init(backend="ring", strict=True)
mx.eval(mx.distributed.all_sum(mx.ones(1), group=group))  # both have joined
used = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
start, began = used(), time.monotonic()
if group.rank() == 0:
    time.sleep(float(sys.argv[1]))
    mx.eval(mx.distributed.send(mx.arange(300_000, dtype=mx.float32), 1, group=group))
    got = mx.distributed.recv_like(mx.zeros(3), 1, group=group)
else:
    got = mx.distributed.recv_like(mx.zeros(300_000), 0, group=group)
    mx.eval(got)
    got = mx.distributed.send(got[-3:], 0, group=group)
mx.eval(got)
print(json.dumps({"cpu_s": used() - start, "wall_s": time.monotonic() - began, "got": got.tolist()}))
"""


def ring(tmp_path: Path, ring_wait: str) -> list[dict]:
    hostfile = tmp_path / f"hosts-{ring_wait}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(2)]))
    env = {**runner_env("reference", ring_wait), "MLX_HOSTFILE": str(hostfile)}
    command = [sys.executable, "-c", RANK, str(WAIT_S)]
    procs = [
        subprocess.Popen(command, env={**env, "MLX_RANK": str(rank)}, stdout=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    return [json.loads(out) for out in outs]


@pytest.mark.skipif(sys.platform != "linux", reason="the shim is for Linux runners (LD_PRELOAD)")
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the shim with (runners spin)")
def test_a_rank_waiting_for_its_peer_sleeps(tmp_path: Path) -> None:
    assert ring_wait_library("poll") is not None, "this machine has a C compiler: the shim must build"
    _, waiting = ring(tmp_path, "poll")
    assert waiting["got"] == [299_997.0, 299_998.0, 299_999.0]  # 1.2 MB arrived whole, and went back
    assert waiting["wall_s"] > 0.8 * WAIT_S, waiting  # it did wait (it may leave the joining all_sum later)
    # MLX's loop alone spins in recv() the whole wait (about WAIT_S of CPU on an idle core, see test below)
    assert waiting["cpu_s"] < 0.1 * WAIT_S, waiting


@pytest.mark.skipif(sys.platform != "linux", reason="the shim is for Linux runners (LD_PRELOAD)")
def test_spin_is_mlx_own_loop(tmp_path: Path) -> None:
    """SHARDLINE_RUNNER_RING_WAIT=spin preloads nothing: the waiting rank busy-polls, as MLX makes it."""
    assert "ring_wait" not in runner_env("reference", "spin").get("LD_PRELOAD", "")
    _, waiting = ring(tmp_path, "spin")
    assert waiting["got"] == [299_997.0, 299_998.0, 299_999.0]
    # what the shim saves: without it the wait is spent spinning (a whole core on an idle machine; on 2 cores
    # shared with make test's other workers, a quarter or more); with it, under 2 %
    assert waiting["cpu_s"] > 0.1 * WAIT_S, waiting
