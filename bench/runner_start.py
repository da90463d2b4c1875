"""How long a runner takes to start, and the CPU it spends doing so: a new `python -m shardline.engine.runner`
(exec) against one forked by the fork server (shardline/engine/forkserver.py), same model, same run.

    .venv/bin/python -m bench.runner_start [--repeats 7]

A tiny qwen2 model on one rank: seconds from start to the runner's ready event and the runner's own CPU seconds by
then (median of the repeats); the fork server's first start (its imports) is reported apart. Writes
bench/out/runner_start.json.
"""

import argparse
import json
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import psutil

from activities.runner import runner_env
from bench.common import machine, save
from shardline.engine import runner
from shardline.engine.forkserver import ForkServer
from tests.support.model_factory import make_tiny_model
from tests.support.runners import rank_specs

Start = Callable[[Path, IO[bytes]], tuple[Any, IO[str]]]


def exec_start(spec: Path, log: IO[bytes]) -> tuple[Any, IO[str]]:
    proc = subprocess.Popen(runner.command(str(spec)), stdout=subprocess.PIPE, stderr=log, text=True,
                            env=runner_env("reference"))  # fmt: skip
    assert proc.stdout is not None
    return proc, proc.stdout


def fork_start(server: ForkServer) -> Start:
    def start(spec: Path, log: IO[bytes]) -> tuple[Any, IO[str]]:
        child = server.start([str(spec)], log.fileno())
        return child, open(child.stdout_fd, encoding="utf-8")

    return start


def one_start(start: Start, spec: Path, log: IO[bytes], since: float | None = None) -> tuple[float, float]:
    """(seconds to ready, from `since` or from the start; the runner's CPU seconds by then)"""
    began = since or time.perf_counter()
    proc, events = start(spec, log)
    event = json.loads(events.readline())
    ready_s = time.perf_counter() - began
    assert event["event"] == "ready", event
    cpu = sum(psutil.Process(proc.pid).cpu_times()[:2])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    events.close()
    return ready_s, cpu


def measure(start: Start, spec: Path, log: IO[bytes], repeats: int) -> dict[str, float]:
    runs = [one_start(start, spec, log) for _ in range(repeats)]
    return {"ready_s": statistics.median(r[0] for r in runs), "cpu_s": statistics.median(r[1] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine(), "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = work / "spec.json"
        spec.write_text(rank_specs([make_tiny_model(work / "m", model_type="qwen2")], "single")[0].to_json())
        with (work / "runner.log").open("ab") as log:
            results["exec"] = measure(exec_start, spec, log, args.repeats)
            began = time.perf_counter()
            server = ForkServer(runner_env("reference"))
            try:
                first = one_start(fork_start(server), spec, log, since=began)
                results["fork_first"] = {"ready_s": first[0], "cpu_s": first[1]}
                results["fork"] = measure(fork_start(server), spec, log, args.repeats)
            finally:
                server.close()
    for mode in ("exec", "fork_first", "fork"):
        print(f"{mode:>10}: ready in {results[mode]['ready_s']:.2f} s, runner CPU {results[mode]['cpu_s']:.2f} s")
    results["ready_ratio"] = results["fork"]["ready_s"] / results["exec"]["ready_s"]
    results["cpu_ratio"] = results["fork"]["cpu_s"] / results["exec"]["cpu_s"]
    print(f"fork/exec: ready {results['ready_ratio']:.2f}x the time, {results['cpu_ratio']:.2f}x the CPU")
    save(Path(__file__).parent / "out" / "runner_start.json", results)


if __name__ == "__main__":
    main()
