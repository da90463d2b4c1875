"""Runner processes on loopback, and the requests tests send them (tests/engine)."""

import functools
import json
import shutil
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import httpx

from activities.runner import runner_env
from shardline.engine.forkserver import Forked, ForkServer
from shardline.engine.spec import RunnerSpec, pipeline_layers
from shardline.model_files import INDEX_FILE, files_to_fetch
from tests.support.processes import free_port

START_TIMEOUT_S = 60
PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "Hello! How are you today?"}]


@dataclass
class Runner:
    proc: Forked
    events: TextIO
    log: Path

    def event(self, timeout: float = START_TIMEOUT_S) -> dict:
        with ThreadPoolExecutor(1) as pool:
            line = pool.submit(self.events.readline).result(timeout)
        assert line, f"runner exited ({self.proc.poll()}) without an event:\n{self.log.read_text()[-3000:]}"
        return json.loads(line)

    def done_requests(self) -> list[dict]:
        lines = (json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{"))
        return [line for line in lines if line.get("event") == "request.done"]


@functools.cache
def forkserver(ring_wait: str) -> ForkServer:
    """As a node starts runners (forked; SHARDLINE_RUNNER_RING_WAIT), on the wheel's BLAS: one per pytest worker."""
    return ForkServer(runner_env("reference", ring_wait))


def spawn(spec: RunnerSpec, workdir: Path, name: str, ring_wait: str = "poll") -> Runner:
    spec_path = workdir / f"{name}.json"
    spec_path.write_text(spec.to_json(), encoding="utf-8")
    log = workdir / f"{name}.log"
    with log.open("w") as err:
        proc = forkserver(ring_wait).start([str(spec_path)], err.fileno())
    return Runner(proc, open(proc.stdout_fd, encoding="utf-8"), log)


def stop_all(runners: list[Runner]) -> list[int | None]:
    runners[0].proc.send_signal(signal.SIGTERM)  # rank 0 tells the others to stop
    codes = []
    for runner in runners:
        try:
            codes.append(runner.proc.wait(15))
        except subprocess.TimeoutExpired:
            runner.proc.kill()
            codes.append(None)
    return codes


def rank_specs(
    model_dirs: list[Path],
    strategy: str,
    splits: list[int] | None = None,
    draft_model: Path | None = None,
    **options: int,
) -> list[RunnerSpec]:
    """Every rank's spec; `draft_model`: drafts written by it, on rank 0."""
    size = len(model_dirs)
    drafts = {"draft_method": "draft_model"} if draft_model else {}
    hosts = [f"127.0.0.1:{free_port()}" for _ in range(size)] if size > 1 else []
    return [
        RunnerSpec(
            model_path=str(model_dir),
            strategy=strategy,
            rank=rank,
            world_size=size,
            layers=pipeline_layers(splits, rank) if splits else None,
            splits=splits or [],
            hosts=hosts,
            **drafts,
            draft_model_path=str(draft_model) if draft_model and rank == 0 else "",
            **options,
        )
        for rank, model_dir in enumerate(model_dirs)
    ]


def node_copy(model_dir: Path, dest: Path, splits: list[int], rank: int) -> Path:
    """What a node would download for this rank: support files and only its layers' weight files."""
    weight_map = json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]
    files = [p.name for p in model_dir.iterdir()]
    dest.mkdir()
    for name in files_to_fetch(files, weight_map, pipeline_layers(splits, rank)):
        shutil.copy(model_dir / name, dest / name)
    return dest


@dataclass
class Served:
    endpoint: str
    runners: list[Runner]
    specs: list[RunnerSpec]


@contextmanager
def serving(
    specs: list[RunnerSpec], workdir: Path, name: str, start_s: float = START_TIMEOUT_S, ring_wait: str = "poll"
) -> Iterator[Served]:
    """All ranks at once (the ring needs them all); stopped through rank 0, which must stop the rest."""
    runners = [spawn(spec, workdir, f"{name}-rank{spec.rank}", ring_wait) for spec in specs]
    try:
        events = [runner.event(start_s) for runner in runners]
        for rank, event in enumerate(events):
            assert event["event"] == "ready" and event["rank"] == rank, event
            assert event["memory_bytes"] > 0
        assert all(event["endpoint"] is None for event in events[1:])
        yield Served(events[0]["endpoint"], runners, specs)
    finally:
        codes = stop_all(runners)
    assert codes == [0] * len(runners)


def body(prompt: str | list[dict], max_tokens: int, **extra: object) -> dict:
    key = "messages" if isinstance(prompt, list) else "prompt"
    return {key: prompt, "max_tokens": max_tokens, **extra}


async def generate(endpoint: str, request: dict) -> tuple[list[tuple[str, int]], dict]:
    async with (
        httpx.AsyncClient(base_url=endpoint, timeout=60) as http,
        http.stream("POST", "/generate", json=request) as response,
    ):
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("application/x-ndjson")
        accepted, *lines = [json.loads(line) async for line in response.aiter_lines() if line]
    assert accepted["accepted"] and accepted["prompt_tokens"] > 0  # sent at once, before the prefill
    *tokens, final = lines
    return [(line["text"], line["token"]) for line in tokens], final


async def check_greedy(endpoint: str, model_dir: Path, references, prompt: str | list[dict], max_tokens: int = 12):
    expected = references(model_dir, prompt, max_tokens)
    assert len({token for _, token in expected}) > 2  # a random model stuck on one token would prove little
    got, final = await generate(endpoint, body(prompt, max_tokens, temperature=0.0))
    assert got == expected
    assert final["finish_reason"] == "length"
    assert final["completion_tokens"] == max_tokens
    return final
