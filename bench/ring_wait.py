"""What a rank's waiting for its ring peers costs: MLX's own loop (spin) against the shim runners preload on Linux
(poll, shardline/engine/ring_wait.c), same model, same run.

    .venv/bin/python -m bench.ring_wait [--repeats 3]

For 2 and 3 pipeline ranks on this machine, 1 and 8 greedy streams of 200 tokens each: the wall time and the CPU
time of all ranks (median of the repeats), then 5 s idle. When ranks share a machine's cores (as here, and as
`make up` runs them), a spinning rank takes the core another rank computes on. Writes bench/out/ring_wait.json.
"""

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import machine, save
from tests.support.model_factory import make_tiny_model
from tests.support.runners import Served, body, generate, rank_specs, serving

TOKENS = 200
IDLE_S = 5.0


def cpu_s(procs: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def decode(served: Served, streams: int) -> tuple[float, float]:
    """(wall s, CPU s of every rank) for `streams` streams at once."""
    procs = [psutil.Process(r.proc.pid) for r in served.runners]
    request = body("The quick brown fox jumps over", TOKENS, temperature=0.0)

    async def all_streams() -> None:
        await asyncio.gather(*(generate(served.endpoint, request) for _ in range(streams)))

    before, started = cpu_s(procs), time.perf_counter()
    asyncio.run(all_streams())
    return time.perf_counter() - started, cpu_s(procs) - before


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", default="2,3", help="pipeline sizes, comma-separated")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine(), "tokens": TOKENS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "m", model_type="qwen2", num_layers=6, num_files=1)
        for ranks in [int(r) for r in args.ranks.split(",")]:
            for wait in ("spin", "poll"):
                specs = rank_specs([model] * ranks, "pipeline", [6 // ranks] * ranks)
                with serving(specs, work, f"{ranks}-{wait}", ring_wait=wait) as served:
                    decode(served, 1)  # warm-up
                    row: dict[str, float] = {}
                    for streams in (1, 8):
                        runs = [decode(served, streams) for _ in range(args.repeats)]
                        row[f"{streams} streams wall s"] = statistics.median(r[0] for r in runs)
                        row[f"{streams} streams cpu s"] = statistics.median(r[1] for r in runs)
                    procs = [psutil.Process(r.proc.pid) for r in served.runners]
                    before = cpu_s(procs)
                    time.sleep(IDLE_S)
                    row["idle cpu % of a core, all ranks"] = 100 * (cpu_s(procs) - before) / IDLE_S
                results[f"{ranks} ranks {wait}"] = row
            spin, poll = results[f"{ranks} ranks spin"], results[f"{ranks} ranks poll"]
            for streams in (1, 8):
                speed = spin[f"{streams} streams wall s"] / poll[f"{streams} streams wall s"]
                cpu = poll[f"{streams} streams cpu s"] / spin[f"{streams} streams cpu s"]
                results[f"{ranks} ranks {streams} streams: poll speed / spin"] = speed
                print(f"{ranks} ranks, {streams} stream(s) x {TOKENS} tokens: poll {speed:.2f}x the speed of spin, "
                      f"{cpu:.2f}x its CPU ({poll[f'{streams} streams cpu s']:.2f} vs "
                      f"{spin[f'{streams} streams cpu s']:.2f} s)")  # fmt: skip
            print(f"{ranks} ranks idle: poll {poll['idle cpu % of a core, all ranks']:.1f} % of a core, spin "
                  f"{spin['idle cpu % of a core, all ranks']:.1f} %")  # fmt: skip
    save(Path(__file__).parent / "out" / "ring_wait.json", results)


if __name__ == "__main__":
    main()
