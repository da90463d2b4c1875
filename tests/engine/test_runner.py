"""Runner processes on loopback, compared token for token with mlx_lm in this process."""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlx.core as mx
import psutil
import pytest
from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_sampler

from shardline.engine.spec import RunnerSpec, pipeline_layers
from shardline.model_files import INDEX_FILE, files_to_fetch
from tests.support.model_factory import make_tiny_model

START_TIMEOUT_S = 60
PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "Hello! How are you today?"}]


@dataclass
class Runner:
    proc: subprocess.Popen[str]
    log: Path

    def event(self, timeout: float = START_TIMEOUT_S) -> dict:
        with ThreadPoolExecutor(1) as pool:
            line = pool.submit(self.proc.stdout.readline).result(timeout)
        assert line, f"runner exited ({self.proc.poll()}) without an event:\n{self.log.read_text()[-3000:]}"
        return json.loads(line)

    def done_requests(self) -> list[dict]:
        lines = (json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{"))
        return [line for line in lines if line.get("event") == "request.done"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(spec: RunnerSpec, workdir: Path, name: str) -> Runner:
    spec_path = workdir / f"{name}.json"
    spec_path.write_text(spec.to_json(), encoding="utf-8")
    log = workdir / f"{name}.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shardline.engine.runner", str(spec_path)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    return Runner(proc, log)


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


def rank_specs(model_dirs: list[Path], strategy: str, splits: list[int] | None = None) -> list[RunnerSpec]:
    size = len(model_dirs)
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
        )
        for rank, model_dir in enumerate(model_dirs)
    ]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine")


@pytest.fixture(scope="module")
def qwen_dir(workdir: Path) -> Path:
    # One layer per file, so pipeline ranks need different files.
    return make_tiny_model(workdir / "qwen", model_type="qwen2", num_layers=4, num_files=4)


@pytest.fixture(scope="module")
def llama_dir(workdir: Path) -> Path:
    return make_tiny_model(workdir / "llama", model_type="llama", num_layers=4, num_files=2)


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
def serving(specs: list[RunnerSpec], workdir: Path, name: str) -> Iterator[Served]:
    """All ranks at once (the ring needs them all); stopped through rank 0, which must stop the rest."""
    runners = [spawn(spec, workdir, f"{name}-rank{spec.rank}") for spec in specs]
    try:
        events = [runner.event() for runner in runners]
        for rank, event in enumerate(events):
            assert event["event"] == "ready" and event["rank"] == rank, event
            assert event["memory_bytes"] > 0
        assert all(event["endpoint"] is None for event in events[1:])
        yield Served(events[0]["endpoint"], runners, specs)
    finally:
        codes = stop_all(runners)
    assert codes == [0] * len(runners)


@pytest.fixture(scope="module")
def single_llama(workdir: Path, llama_dir: Path) -> Iterator[Served]:
    with serving(rank_specs([llama_dir], "single"), workdir, "single-llama") as served:
        yield served


@pytest.fixture(scope="module")
def single_qwen(workdir: Path, qwen_dir: Path) -> Iterator[Served]:
    with serving(rank_specs([qwen_dir], "single"), workdir, "single-qwen") as served:
        yield served


@pytest.fixture(scope="module")
def pipe2(workdir: Path, qwen_dir: Path) -> Iterator[Served]:
    splits = [1, 3]  # uneven: rank 0 runs layer 3, rank 1 layers 0-2
    dirs = [node_copy(qwen_dir, workdir / f"pipe2-node{rank}", splits, rank) for rank in range(2)]
    with serving(rank_specs(dirs, "pipeline", splits), workdir, "pipe2") as served:
        yield served


@pytest.fixture(scope="module")
def pipe3(workdir: Path, qwen_dir: Path) -> Iterator[Served]:
    with serving(rank_specs([qwen_dir] * 3, "pipeline", [2, 1, 1]), workdir, "pipe3") as served:
        yield served


@pytest.fixture(scope="module")
def tensor2(workdir: Path, llama_dir: Path) -> Iterator[Served]:
    with serving(rank_specs([llama_dir] * 2, "tensor"), workdir, "tensor2") as served:
        yield served


@pytest.fixture(scope="module")
def references() -> Iterator:
    models: dict[Path, tuple] = {}

    def generate(
        model_dir: Path, prompt: str | list[dict], max_tokens: int, **sampling: float
    ) -> list[tuple[str, int]]:
        if model_dir not in models:
            models[model_dir] = load(str(model_dir))
        model, tokenizer = models[model_dir]
        if isinstance(prompt, list):
            prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        mx.random.seed(int(sampling.pop("seed", 0)))
        sampler = make_sampler(sampling.get("temperature", 0.0), sampling.get("top_p", 1.0))
        responses = stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler)
        return [(r.text, r.token) for r in responses]

    return generate


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
        lines = [json.loads(line) async for line in response.aiter_lines() if line]
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


async def test_single_llama_matches_mlx_lm(single_llama: Served, llama_dir: Path, references) -> None:
    async with httpx.AsyncClient(base_url=single_llama.endpoint) as http:
        assert (await http.get("/health")).json() == {"status": "ok"}
    final = await check_greedy(single_llama.endpoint, llama_dir, references, PROMPT)
    assert final["prompt_tokens"] > 0
    await check_greedy(single_llama.endpoint, llama_dir, references, CHAT)


async def test_single_qwen2_matches_mlx_lm(single_qwen: Served, qwen_dir: Path, references) -> None:
    await check_greedy(single_qwen.endpoint, qwen_dir, references, PROMPT)
    await check_greedy(single_qwen.endpoint, qwen_dir, references, CHAT)


def test_pipeline_rank_needs_only_its_files(pipe2: Served) -> None:
    # The ranks loaded from node copies holding only what their layers need.
    assert sorted(p.name for p in Path(pipe2.specs[0].model_path).glob("*.safetensors")) == [
        "model-00001-of-00004.safetensors",  # embeddings (and layer 0)
        "model-00004-of-00004.safetensors",  # layer 3, norm, head
    ]


async def test_pipeline_two_ranks_uneven_split(pipe2: Served, qwen_dir: Path, references) -> None:
    await check_greedy(pipe2.endpoint, qwen_dir, references, PROMPT)
    await check_greedy(pipe2.endpoint, qwen_dir, references, CHAT)


async def test_pipeline_three_ranks(pipe3: Served, qwen_dir: Path, references) -> None:
    await check_greedy(pipe3.endpoint, qwen_dir, references, PROMPT)


async def test_pipeline_seeded_sampling_matches_mlx_lm(pipe3: Served, qwen_dir: Path, references) -> None:
    sampling = {"temperature": 1.5, "top_p": 0.95, "seed": 7}
    expected = references(qwen_dir, PROMPT, 16, **sampling)
    got, _ = await generate(pipe3.endpoint, body(PROMPT, 16, **sampling))
    assert got == expected
    assert len({token for _, token in got}) > 1  # really sampled


async def test_tensor_parallel_two_ranks(tensor2: Served, llama_dir: Path, references) -> None:
    # Exact here, but not guaranteed in general: the ranks' partial sums add up in another order
    # than one matmul does, so a near tie between two logits may break the other way.
    await check_greedy(tensor2.endpoint, llama_dir, references, PROMPT)
    await check_greedy(tensor2.endpoint, llama_dir, references, CHAT)


def straddling_stop(pieces: list[tuple[str, int]]) -> str:
    """Two characters across the boundary of the second and third token's text."""
    boundary = len(pieces[0][0]) + len(pieces[1][0])
    return "".join(text for text, _ in pieces)[boundary - 1 : boundary + 1]


async def test_stop_strings_end_generation_and_are_not_emitted(
    single_llama: Served, llama_dir: Path, references
) -> None:
    expected = references(llama_dir, PROMPT, 24)
    full = "".join(text for text, _ in expected)
    stop = straddling_stop(expected)
    got, final = await generate(single_llama.endpoint, body(PROMPT, 24, stop=["never in the output", stop]))
    assert "".join(text for text, _ in got) == full[: full.find(stop)]
    assert [token for _, token in got] == [token for _, token in expected[: len(got)]]
    assert final["finish_reason"] == "stop"
    assert final["completion_tokens"] == len(got) < 24


async def test_stop_string_never_seen_changes_nothing(single_qwen: Served, qwen_dir: Path, references) -> None:
    got, final = await generate(single_qwen.endpoint, body(PROMPT, 10, stop=["\u00e9\u00e9\u00e9"]))
    assert got == references(qwen_dir, PROMPT, 10)
    assert final["finish_reason"] == "length"


async def test_client_that_disconnects_does_not_block_the_next(pipe2: Served, qwen_dir: Path, references) -> None:
    long_request = body(PROMPT, 5000, temperature=0.0)
    async with (
        httpx.AsyncClient(base_url=pipe2.endpoint, timeout=60) as http,
        http.stream("POST", "/generate", json=long_request) as response,
    ):
        lines = response.aiter_lines()
        for _ in range(3):
            assert "token" in json.loads(await anext(lines))
    # Gone after 3 tokens: the ranks stop together and the next request runs at once, correctly.
    started = time.monotonic()
    await check_greedy(pipe2.endpoint, qwen_dir, references, PROMPT)
    assert time.monotonic() - started < 20
    cancelled = [r for r in pipe2.runners[0].done_requests() if r["finish_reason"] == "cancelled"]
    assert len(cancelled) == 1 and cancelled[0]["completion_tokens"] < 1000


async def test_concurrent_requests_get_their_sequential_answers(pipe2: Served, qwen_dir: Path, references) -> None:
    prompts = [PROMPT, CHAT, "Numbers such as", PROMPT]
    results = await asyncio.gather(*(generate(pipe2.endpoint, body(p, 10, temperature=0.0)) for p in prompts))
    for prompt, (got, final) in zip(prompts, results, strict=True):
        assert got == references(qwen_dir, prompt, 10)
        assert final["completion_tokens"] == 10


async def test_bad_requests_are_refused(single_qwen: Served) -> None:
    async with httpx.AsyncClient(base_url=single_qwen.endpoint) as http:
        neither = await http.post("/generate", json={"max_tokens": 4})
        both = await http.post("/generate", json={"prompt": "a", "messages": CHAT})
        empty = await http.post("/generate", json={"prompt": ""})
    assert neither.status_code == both.status_code == 422
    assert empty.status_code == 400 and "empty" in empty.json()["detail"]


def test_missing_weight_file_fails_with_exit_code_2(workdir: Path, qwen_dir: Path) -> None:
    broken = workdir / "broken"
    shutil.copytree(qwen_dir, broken)
    (broken / "model-00003-of-00004.safetensors").unlink()
    runner = spawn(rank_specs([broken], "single")[0], workdir, "broken")
    event = runner.event()
    assert runner.proc.wait(30) == 2
    assert event["event"] == "error"
    assert "missing weight files" in event["message"] and "model-00003-of-00004.safetensors" in event["message"]


def test_bad_spec_fails_with_exit_code_2(workdir: Path, qwen_dir: Path) -> None:
    spec_path = workdir / "bad.json"
    spec_path.write_text(json.dumps({"model_path": str(qwen_dir), "strategy": "pipeline", "world_size": 1}))
    proc = subprocess.run(
        [sys.executable, "-m", "shardline.engine.runner", str(spec_path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert json.loads(proc.stdout) == {"event": "error", "message": "strategy 'pipeline' does not fit world size 1"}


PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-m", "shardline.engine.runner", sys.argv[1]], stderr=subprocess.DEVNULL)
print(child.pid, flush=True)
time.sleep(600)
"""


def gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_runner_exits_when_its_parent_dies(workdir: Path, qwen_dir: Path) -> None:
    # Rank 0 of two with no rank 1: it waits in the ring's start forever, unless its parent dies.
    spec = rank_specs([qwen_dir] * 2, "pipeline", [2, 2])[0]
    spec_path = workdir / "orphan.json"
    spec_path.write_text(spec.to_json())
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(spec_path)], stdout=subprocess.PIPE, text=True)
    runner_pid = int(parent.stdout.readline())
    time.sleep(1.0)
    assert psutil.Process(runner_pid).is_running()
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    try:
        assert gone(runner_pid, within=10)
    finally:
        if not gone(runner_pid, within=0):
            os.kill(runner_pid, signal.SIGKILL)
