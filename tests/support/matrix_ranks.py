"""One rank of the architecture matrix: `python -m tests.support.matrix_ranks PLAN_JSON RANK`.

Every rank joins one ring and serves the plan's models one after another through the real engine
(load_shard, Batch, rank 0's Scheduler, the others' follow loop), so a matrix of architectures costs one
process per rank instead of one set of runner processes per model. Rank 0 sends each model the same
requests (alone, four batched, and a second turn that reuses the first's cached prefix) and writes what
came back to the plan's `out` file; a model that fails to load or run is written with its error.
"""

import json
import sys
import tempfile
import threading
import traceback
from dataclasses import replace
from pathlib import Path
from queue import Queue
from typing import Any

import mlx.core as mx

from shardline.engine import protocol, wake
from shardline.engine.batch import Batch
from shardline.engine.generation import Job, Scheduler, follow
from shardline.engine.loading import init_group, load_shard, parameter_bytes
from shardline.engine.pipeline import trimmable
from shardline.engine.prefix_cache import PrefixIndex
from shardline.engine.protocol import Sampling
from shardline.engine.rank import PREFILL_STEP
from shardline.engine.spec import RunnerSpec

MAX_TOKENS = 10
WAIT_S = 120
PENDING: "set[Request]" = set()  # rank 0's unanswered requests


class Request:
    def __init__(self, tokens: list[int]) -> None:
        self.tokens: list[int] = []
        self.final: dict[str, Any] = {}
        self.done = threading.Event()
        self.job = Job(list(tokens), Sampling(MAX_TOKENS, 0.0, 1.0, 0), [], self.emit)
        PENDING.add(self)

    def emit(self, event: dict) -> None:
        if "token" in event:
            self.tokens.append(event["token"])
        if "finish_reason" in event or "error" in event:
            self.final = event
            PENDING.discard(self)
            self.done.set()

    def result(self) -> dict[str, Any]:
        if not self.done.wait(WAIT_S):
            raise TimeoutError("no answer")
        if "error" in self.final:
            raise RuntimeError(self.final["error"])
        return {"tokens": self.tokens, "cached": self.final.get("cached_tokens", 0)}


def submit(jobs: "Queue[Job]", requests: list[Request]) -> None:
    """All at once, so the scheduler admits them in one step: one batch."""
    with jobs.mutex:
        jobs.queue.extend(r.job for r in requests)
        jobs.unfinished_tasks += len(requests)
        jobs.not_empty.notify()


def ask(jobs: "Queue[Job]", prompts: list[list[int]]) -> list[dict[str, Any]]:
    requests = [Request(p) for p in prompts]
    submit(jobs, requests)
    return [r.result() for r in requests]


def lead(batch: Batch, tokenizer: Any, group: Any, model: Any, prompts: dict[str, Any]) -> dict[str, Any]:
    jobs: Queue[Job] = Queue()
    index = PrefixIndex(1 << 30, trimmable(model))
    scheduler = Scheduler(batch, tokenizer, group, jobs, max_batch=8, index=index)
    stop = threading.Event()

    def serve() -> None:
        try:
            scheduler.serve(stop)
        except Exception as exc:  # noqa: BLE001 (a distributed step that raises ends the runner: here, the model)
            traceback.print_exc()
            for request in list(PENDING):
                request.emit({"error": f"{type(exc).__name__}: {exc}"})

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        alone = ask(jobs, [prompts["alone"]])[0]
        batched = ask(jobs, prompts["batch"])
        first = ask(jobs, [prompts["turn"]])[0]
        second_prompt = prompts["turn"] + first["tokens"] + prompts["follow_up"]
        second = ask(jobs, [second_prompt])[0]
        return {"alone": alone, "batch": batched, "turn": first, "second": second, "second_prompt": second_prompt}
    finally:
        stop.set()
        thread.join(WAIT_S)


def serve_model(
    entry: dict[str, Any], rank: int, group: Any, hosts: list[str], alarm: Any, phase: int
) -> dict[str, Any]:
    spec = RunnerSpec.from_json(json.dumps(entry["specs"][rank]))
    # the ranks wait for each other at the runner's barriers (not spinning: wake.py), one pair of phases a model
    model, tokenizer = load_shard(spec, group, loaded=lambda: wake.barrier(alarm, hosts, rank, phase))
    nbytes = parameter_bytes(model)
    if group is not None:
        wake.barrier(alarm, hosts, rank, phase + 1)
        protocol.share(group, [1] if rank == 0 else None, 1)
    batch = Batch(model, tokenizer, prefill_step=PREFILL_STEP)
    try:
        if rank == 0:
            return {"memory_bytes": nbytes, **lead(batch, tokenizer, group, model, entry["prompts"])}
        follow(batch, group)
        return {"memory_bytes": nbytes}
    finally:
        batch.close()
        del model, batch
        mx.clear_cache()


def main(plan_path: str, rank: int) -> None:
    plan = json.loads(Path(plan_path).read_text())
    first = RunnerSpec.from_json(json.dumps(plan["models"][0]["specs"][rank]))
    # a directory of this rank's own, as the runner uses: ranks writing one shared hostfile raced (one read it empty)
    with tempfile.TemporaryDirectory(prefix="matrix-ring-") as workdir:
        group = init_group(replace(first, hosts=plan["hosts"]), Path(workdir))
    results: dict[str, Any] = {}
    alarm = wake.listen(plan["hosts"][rank]) if group is not None else None
    for i, entry in enumerate(plan["models"]):
        try:
            results[entry["name"]] = serve_model(entry, rank, group, plan["hosts"], alarm, 2 * i + 1)
        except Exception as exc:  # noqa: BLE001 (reported in the results) a rank that fails leaves the ring unusable: the rest of the plan fails too
            traceback.print_exc()
            results[entry["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
            break
    out = Path(plan["out"]).with_suffix(f".rank{rank}.json")
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    sys.stdout.flush()
    sys.stderr.flush()
