"""Runner processes on loopback, compared token for token with mlx_lm in this process."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from shardline.engine.runner import command
from tests.support.runners import (
    CHAT,
    PROMPT,
    Served,
    body,
    check_greedy,
    generate,
    rank_specs,
    spawn,
)  # fmt: skip

pytestmark = pytest.mark.slow(16)  # seconds in make test: tests/conftest.py starts the longest files first


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
        lines = (line async for line in response.aiter_lines() if line)  # not the heartbeats
        assert json.loads(await anext(lines))["accepted"]  # the first line comes before the prefill
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
    assert event["event"] == "error" and not event["refused"]  # a download may bring it back
    assert "missing weight files" in event["message"] and "model-00003-of-00004.safetensors" in event["message"]


def test_bad_spec_fails_with_exit_code_2(workdir: Path, qwen_dir: Path) -> None:
    spec_path = workdir / "bad.json"
    spec_path.write_text(json.dumps({"model_path": str(qwen_dir), "strategy": "pipeline", "world_size": 1}))
    proc = subprocess.run(command(str(spec_path)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    message = "strategy 'pipeline' does not fit world size 1"
    assert json.loads(proc.stdout) == {"event": "error", "message": message, "refused": False}


PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-m", "shardline.engine.runner", sys.argv[1]], stderr=subprocess.DEVNULL)
print(child.pid, flush=True)
time.sleep(600)
"""


def gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def test_runner_exits_when_its_parent_dies(workdir: Path, qwen_dir: Path) -> None:
    # Rank 0 of two with no rank 1: it waits in the ring's start forever, unless its parent dies.
    spec = rank_specs([qwen_dir] * 2, "pipeline", [2, 2])[0]
    spec_path = workdir / "orphan.json"
    spec_path.write_text(spec.to_json())
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(spec_path)], stdout=subprocess.PIPE, text=True)
    runner_pid = int(parent.stdout.readline())
    time.sleep(5.0)  # into the ring's start, which holds the GIL while it waits (CI: a watching thread never ran)
    assert psutil.Process(runner_pid).is_running()
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    try:
        assert gone(runner_pid, within=10)  # the kernel kills it at once
    finally:
        if not gone(runner_pid, within=0):
            os.kill(runner_pid, signal.SIGKILL)


def test_what_counts_as_the_model_s_own_refusal() -> None:
    from shardline.engine.loading import refused

    assert refused(ValueError("[rope] dims must be even but got 9."), distributed=True)
    assert refused(RuntimeError("[load_safetensors] Invalid json header length"), distributed=False)
    assert not refused(RuntimeError("[ring] Connection reset"), distributed=True)  # the ring fails so too
    assert not refused(FileNotFoundError("missing weight files"), distributed=False)  # a download may fix it
    assert not refused(MemoryError(), distributed=False)
