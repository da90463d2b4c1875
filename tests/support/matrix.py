"""Run many models over one ring of rank processes (tests/support/matrix_ranks.py), and what plain mlx_lm says."""

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlx_lm import load, stream_generate
from mlx_lm.utils import load_tokenizer

from activities.runner import runner_env
from shardline.engine.spec import RunnerSpec, pipeline_layers
from tests.support.matrix_ranks import MAX_TOKENS
from tests.support.processes import free_port

TIMEOUT_S = 600
TEXTS = [
    "The quick brown fox",
    "A cluster of machines can run a large language model when",
    "Numbers such as 1, 2, 3",
    "When a node fails, the controller moves its layers",
    "Every worker loads its shard of the weights, then waits",
]
FOLLOW_UP = "Please summarize the following text in one short paragraph."


@dataclass(frozen=True)
class Case:
    name: str
    model_dirs: list[Path]  # one per rank (a node's copy of the files its layers need)
    strategy: str  # pipeline | tensor
    splits: list[int] | None = None


def prompts(model_dir: Path) -> dict[str, Any]:
    tokenizer = load_tokenizer(model_dir)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": TEXTS[0]}], add_generation_prompt=True)
    ids = [tokenizer.encode(t) for t in TEXTS]
    return {"alone": ids[0], "batch": ids[1:], "turn": list(chat), "follow_up": tokenizer.encode(FOLLOW_UP)}


def plan_entry(case: Case, hosts: list[str]) -> dict[str, Any]:
    size = len(case.model_dirs)
    specs = [
        RunnerSpec(
            model_path=str(d), strategy=case.strategy, rank=r, world_size=size, hosts=hosts,
            layers=pipeline_layers(case.splits, r) if case.splits else None, splits=case.splits or [],
        )
        for r, d in enumerate(case.model_dirs)
    ]  # fmt: skip
    specs_json = [json.loads(s.to_json()) for s in specs]
    return {"name": case.name, "specs": specs_json, "prompts": prompts(case.model_dirs[0])}


def run_matrix(cases: list[Case], workdir: Path, name: str) -> list[dict[str, Any]]:
    """Every case on one ring of len(model_dirs) rank processes; each rank's results, in rank order."""
    size = len(cases[0].model_dirs)
    assert all(len(c.model_dirs) == size for c in cases)
    hosts = [f"127.0.0.1:{free_port()}" for _ in range(size)]
    plan = {"models": [plan_entry(c, hosts) for c in cases], "hosts": hosts, "out": str(workdir / f"{name}.json")}
    plan_path = workdir / f"{name}-plan.json"
    plan_path.write_text(json.dumps(plan))
    logs = [workdir / f"{name}.rank{r}.log" for r in range(size)]
    procs = []
    env = runner_env("reference")  # as a node starts runners (ranks wait without spinning), on the wheel's BLAS
    for rank in range(size):
        with logs[rank].open("w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "tests.support.matrix_ranks", str(plan_path),
                                           str(rank)], stdout=log, stderr=subprocess.STDOUT, env=env))  # fmt: skip
    deadline = time.monotonic() + TIMEOUT_S
    try:  # until every rank is done, one has failed (the others would wait for it on the ring), or the deadline
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
    finally:
        for proc in procs:
            proc.kill()
    results = []
    for rank in range(size):
        out = workdir / f"{name}.rank{rank}.json"
        assert out.exists(), f"rank {rank} wrote nothing:\n{logs[rank].read_text()[-4000:]}"
        results.append(json.loads(out.read_text()))
    return results


class References:
    """Greedy tokens from plain mlx_lm (the whole model in this process), cached per model and prompt."""

    def __init__(self) -> None:
        self.models: dict[Path, tuple] = {}

    def __call__(self, model_dir: Path, prompt: list[int]) -> list[int]:
        if model_dir not in self.models:
            self.models[model_dir] = load(str(model_dir))
        model, tokenizer = self.models[model_dir]
        return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS)]


def mismatches(result: dict[str, Any], model_dir: Path, references: References) -> list[str]:
    """What the served model answered differently from mlx_lm alone (empty: all equal)."""
    if "error" in result:
        return [result["error"]]
    entry = prompts(model_dir)
    wanted = [("alone", entry["alone"], result["alone"])]
    wanted += [(f"batch[{i}]", p, r) for i, (p, r) in enumerate(zip(entry["batch"], result["batch"], strict=True))]
    wanted += [("turn", entry["turn"], result["turn"]), ("second", result["second_prompt"], result["second"])]
    problems = []
    for label, prompt, got in wanted:
        expected = references(model_dir, prompt)
        if got["tokens"] != expected:
            problems.append(f"{label}: {got['tokens']} != mlx_lm {expected}")
    if result["second"]["cached"] <= len(entry["turn"]):
        problems.append(f"second turn reused only {result['second']['cached']} cached tokens")
    return problems


def describe(case: Case) -> dict[str, Any]:
    return asdict(case)
