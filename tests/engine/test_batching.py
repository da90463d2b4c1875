"""Continuous batching, the prefix cache and per-request isolation, on real runners against plain mlx_lm."""

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import pytest

from tests.support.runners import (
    CHAT,
    PROMPT,
    Served,
    body,
    generate,
    node_copy,
    rank_specs,
    serving,
    spawn,
)  # fmt: skip

pytestmark = pytest.mark.slow(31)  # seconds in make test: tests/conftest.py starts the longest files first

PROMPTS: list[str | list[dict]] = [
    PROMPT,
    CHAT,
    "Numbers such as",
    "A cluster of machines",
    [{"role": "user", "content": "Tell me about the river bank."}],
    "Every worker loads its shard",
    "When a node fails, the controller",
    [{"role": "user", "content": "What does the scheduler keep?"}],
]


@dataclass
class Timed:
    tokens: list[tuple[str, int]] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    first_at: float = 0.0
    done_at: float = 0.0


async def timed(endpoint: str, request: dict, cancel_after: int | None = None) -> Timed:
    out = Timed()
    async with (
        httpx.AsyncClient(base_url=endpoint, timeout=120) as http,
        http.stream("POST", "/generate", json=request) as response,
    ):
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line:
                continue
            event = json.loads(line)
            if event.get("accepted"):  # the first line, before the prefill
                continue
            if "token" in event:
                out.first_at = out.first_at or time.monotonic()
                out.tokens.append((event["text"], event["token"]))
                if cancel_after is not None and len(out.tokens) >= cancel_after:
                    break  # the client goes away mid-stream
            else:
                out.final = event
    out.done_at = time.monotonic()
    return out


async def stats(endpoint: str) -> dict:
    async with httpx.AsyncClient(base_url=endpoint) as http:
        return (await http.get("/stats")).json()


@pytest.fixture(scope="module")
def batch_pipe2(workdir: Path, qwen_dir: Path) -> Iterator[Served]:
    splits = [2, 2]
    dirs = [node_copy(qwen_dir, workdir / f"batch-pipe2-node{rank}", splits, rank) for rank in range(2)]
    with serving(rank_specs(dirs, "pipeline", splits, draft_max_batch=8), workdir, "batch-pipe2") as served:
        yield served


@pytest.mark.parametrize(("instance", "model"), [("single_qwen", "qwen_dir"), ("batch_pipe2", "qwen_dir"),
                                                 ("tensor2", "llama_dir")])  # fmt: skip
async def test_eight_concurrent_requests_batch_and_match_mlx_lm_alone(
    instance: str, model: str, request: pytest.FixtureRequest, references
) -> None:
    served: Served = request.getfixturevalue(instance)
    model_dir: Path = request.getfixturevalue(model)
    max_tokens = 24
    results = await asyncio.gather(*(timed(served.endpoint, body(p, max_tokens)) for p in PROMPTS))
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.tokens == references(model_dir, prompt, max_tokens), prompt
        assert result.final["finish_reason"] == "length"
    # they ran together: most first tokens came before the first request was done
    first_done = min(r.done_at for r in results)
    assert sum(r.first_at < first_done for r in results) >= 6
    assert (await stats(served.endpoint))["requests"] >= len(PROMPTS)


def without_drafts(sampling: dict) -> dict:
    return {k: v for k, v in sampling.items() if k != "num_draft_tokens"}


LENGTHS = [24, 5, 17, 9, 24, 12, 3, 20]  # rows leave the batch at different steps
SEEDED = {1: 11, 4: 12, 6: 13}  # these rows sample, each from its own seed


@pytest.mark.parametrize("instance", ["batch_pipe2", "pipe3"])
async def test_a_pipeline_overlaps_micro_batches_and_answers_as_mlx_lm_alone(
    instance: str, request: pytest.FixtureRequest, qwen_dir: Path, references
) -> None:
    """Every rank busy on its own micro-batch (overlap.py): greedy and seeded rows, leaving at different steps and
    joining while others decode, answer exactly as mlx_lm alone. On 3 ranks two greedy rows also ask for prompt-
    lookup drafts: speculation stops while more requests decode than its max_batch (4 there), micro-batches take
    over, and speculation resumes once few are left."""
    served: Served = request.getfixturevalue(instance)
    before = (await stats(served.endpoint))["overlapped_steps"]
    sampling = [{"temperature": 1.2, "top_p": 0.95, "seed": SEEDED[i]} if i in SEEDED else {} for i in range(8)]
    if instance == "pipe3":
        sampling[0]["num_draft_tokens"] = sampling[2]["num_draft_tokens"] = 3

    async def one(i: int) -> Timed:
        if i >= 5:
            await asyncio.sleep(0.3)  # joins a batch already decoding
        return await timed(served.endpoint, body(PROMPTS[i], LENGTHS[i], **sampling[i]))

    results = await asyncio.gather(*(one(i) for i in range(8)))
    for i, result in enumerate(results):
        expected = references(qwen_dir, PROMPTS[i], LENGTHS[i], **without_drafts(sampling[i]))
        assert result.tokens == expected, PROMPTS[i]
    assert len({tuple(results[i].tokens) for i in SEEDED}) == len(SEEDED)
    assert (await stats(served.endpoint))["overlapped_steps"] - before >= 10
    # rows that finished in micro-batches left their KV state in the prefix cache, exactly their tokens; two
    # prompts that reuse it are prefilled as micro-batches too
    again = await asyncio.gather(*(timed(served.endpoint, body(PROMPTS[i], 6)) for i in (0, 2)))
    for i, result in zip((0, 2), again, strict=True):
        assert result.final["cached_tokens"] > 0
        assert result.tokens == references(qwen_dir, PROMPTS[i], 6), PROMPTS[i]


@pytest.fixture(scope="module")
def draft_pipe2(workdir: Path, qwen_dir: Path) -> Iterator[Served]:
    """A 2-rank pipeline whose drafts a draft model writes on rank 0 (the model itself: its drafts are mostly right)."""
    splits = [2, 2]
    dirs = [node_copy(qwen_dir, workdir / f"draft-pipe2-node{rank}", splits, rank) for rank in range(2)]
    specs = rank_specs(dirs, "pipeline", splits, draft_model=qwen_dir, draft_max_batch=8)
    with serving(specs, workdir, "draft-pipe2") as served:
        yield served


@pytest.fixture(scope="module")
def draft_tensor2(workdir: Path, llama_dir: Path, qwen_dir: Path) -> Iterator[Served]:
    """2 tensor ranks whose drafts a draft model writes on rank 0: another model with the same tokenizer."""
    specs = rank_specs([llama_dir] * 2, "tensor", draft_model=qwen_dir, draft_max_batch=8)
    with serving(specs, workdir, "draft-tensor2") as served:
        yield served


@pytest.mark.parametrize(("instance", "model"), [("single_qwen", "qwen_dir"), ("batch_pipe2", "qwen_dir"),
                                                 ("tensor2", "llama_dir"), ("draft_pipe2", "qwen_dir"),
                                                 ("draft_tensor2", "llama_dir")])  # fmt: skip
async def test_speculative_requests_match_mlx_lm_batched_alone_and_from_the_prefix_cache(
    instance: str, model: str, request: pytest.FixtureRequest, references
) -> None:
    """Prompt-lookup speculation (`num_draft_tokens`) on one rank, a 2-rank pipeline and 2 tensor ranks, and a draft
    model's on a 2-rank pipeline (the model itself: mostly right) and 2 tensor ranks (an unrelated model: mostly
    wrong): 8 concurrent requests and a second turn that starts from the prefix cache give mlx_lm's greedy text,
    while drafts were offered (and, but for the unrelated draft model, accepted)."""
    served: Served = request.getfixturevalue(instance)
    model_dir: Path = request.getfixturevalue(model)
    before = await stats(served.endpoint)
    max_tokens = 24
    results = await asyncio.gather(
        *(timed(served.endpoint, body(p, max_tokens, num_draft_tokens=4)) for p in PROMPTS)
    )  # fmt: skip
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.tokens == references(model_dir, prompt, max_tokens), prompt
        assert result.final["finish_reason"] == "length" and result.final["completion_tokens"] == max_tokens
    first = [{"role": "user", "content": "Repeat after me: the cluster keeps its state in workflows."}]
    one = await timed(served.endpoint, body(first, 16, num_draft_tokens=4))
    conversation = [*first, {"role": "assistant", "content": "".join(t for t, _ in one.tokens)},
                    {"role": "user", "content": "Again, please."}]  # fmt: skip
    two = await timed(served.endpoint, body(conversation, 16, num_draft_tokens=4))
    assert two.final["cached_tokens"] >= one.final["prompt_tokens"]
    assert two.tokens == references(model_dir, conversation, 16)
    after = await stats(served.endpoint)
    drafted = after["draft_tokens"] - before["draft_tokens"]
    accepted = after["accepted_draft_tokens"] - before["accepted_draft_tokens"]
    print(f"{instance}: {accepted} of {drafted} draft tokens accepted")
    assert drafted > 0 and (accepted > 0 or instance == "draft_tensor2") and accepted <= drafted


async def test_a_cancelled_stream_leaves_the_others_unchanged(single_qwen: Served, qwen_dir: Path, references) -> None:
    max_tokens = 20
    requests = [timed(single_qwen.endpoint, body(p, max_tokens), cancel_after=3 if i == 2 else None)
                for i, p in enumerate(PROMPTS)]  # fmt: skip
    results = await asyncio.gather(*requests)
    assert len(results[2].tokens) == 3 and not results[2].final
    for i, (prompt, result) in enumerate(zip(PROMPTS, results, strict=True)):
        if i != 2:
            assert result.tokens == references(qwen_dir, prompt, max_tokens), prompt


async def test_a_long_prompt_is_prefilled_between_the_others_decoding_steps(single_qwen: Served) -> None:
    gaps: list[float] = []
    flowing, long_done = asyncio.Event(), asyncio.Event()

    async def running() -> None:
        async with (
            httpx.AsyncClient(base_url=single_qwen.endpoint, timeout=120) as http,
            http.stream("POST", "/generate", json=body(PROMPT, 3000)) as response,
        ):
            last = None
            async for line in response.aiter_lines():
                if '"token"' in line:
                    now = time.monotonic()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                    if len(gaps) >= 5:
                        flowing.set()
                if long_done.is_set():
                    return

    decoding = asyncio.create_task(running())
    await asyncio.wait_for(flowing.wait(), 60)
    before, started = len(gaps), time.monotonic()
    long = await timed(single_qwen.endpoint, body("river " * 1100, 1))  # ~3,300 tokens: 7 chunks of prefill
    long_done.set()
    await decoding
    during = gaps[before:]
    print(
        f"a {long.final['prompt_tokens']}-token prompt's first token after {long.first_at - started:.2f} s; "
        f"the running stream made {len(during)} tokens meanwhile, longest gap {max(during):.2f} s"
    )
    assert long.final["prompt_tokens"] > 3000, long.final
    assert len(during) >= 5  # it kept decoding while the long prompt was prefilled, chunk by chunk


async def test_seeded_requests_keep_their_own_randomness_in_a_batch(
    single_qwen: Served, qwen_dir: Path, references
) -> None:
    sampled = [{"temperature": 1.3, "top_p": 0.9, "seed": seed} for seed in (1, 2, 3)]
    requests = [body(PROMPT, 12, **s) for s in sampled] + [body(p, 12) for p in PROMPTS[1:4]]
    results = await asyncio.gather(*(timed(single_qwen.endpoint, r) for r in requests))
    for s, result in zip(sampled, results, strict=False):
        assert result.tokens == references(qwen_dir, PROMPT, 12, **s)
    assert len({tuple(r.tokens) for r in results[:3]}) == 3  # three seeds, three answers
    for prompt, result in zip(PROMPTS[1:4], results[3:], strict=True):
        assert result.tokens == references(qwen_dir, prompt, 12)


async def second_turn(endpoint: str, first: list[dict], max_tokens: int = 16) -> tuple[Timed, Timed, list[dict]]:
    one = await timed(endpoint, body(first, max_tokens))
    answer = "".join(text for text, _ in one.tokens)
    conversation = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    started = time.monotonic()
    two = await timed(endpoint, body(conversation, max_tokens))
    two.first_at -= started
    return one, two, conversation


async def test_second_turn_reuses_the_first_from_the_prefix_cache(
    single_qwen: Served, qwen_dir: Path, references
) -> None:
    system = {"role": "system", "content": " ".join(["The cluster keeps its state in workflows."] * 30)}
    one, two, conversation = await second_turn(single_qwen.endpoint, [system, {"role": "user", "content": "Hello!"}])
    assert one.final["cached_tokens"] <= 2  # at most the template's opening, shared with other chats
    # the whole first turn's prompt is reused (its answer too, up to where the template differs)
    assert two.final["cached_tokens"] >= one.final["prompt_tokens"]
    assert two.tokens == references(qwen_dir, conversation, 16)  # the same text as without a cache
    print(f"second turn: {two.final['cached_tokens']} of {two.final['prompt_tokens']} prompt tokens cached, "
          f"first token after {two.first_at:.3f} s")  # fmt: skip
    seen = await stats(single_qwen.endpoint)
    assert seen["cache_hits"] >= 1 and seen["cache_bytes"] > 0 and seen["cached_tokens"] >= one.final["prompt_tokens"]


async def test_prefix_cache_evicts_the_least_recently_used_within_its_budget(
    workdir: Path, qwen_dir: Path, single_qwen: Served
) -> None:
    a = [{"role": "user", "content": "Tell me about the river bank and the lazy dog."}]
    b = [{"role": "user", "content": "What does the scheduler keep in its workflows?"}]
    before = (await stats(single_qwen.endpoint))["cache_bytes"]
    await timed(single_qwen.endpoint, body(a, 8))
    entry = (await stats(single_qwen.endpoint))["cache_bytes"] - before  # one conversation's KV state
    budget = int(entry * 1.5)  # room for one conversation, not two
    with serving(rank_specs([qwen_dir], "single", prompt_cache_bytes=budget), workdir, "small-cache") as small:
        first_a = await timed(small.endpoint, body(a, 8))
        await timed(small.endpoint, body(b, 8))  # evicts a
        again_b = await timed(small.endpoint, body(b, 8))
        again_a = await timed(small.endpoint, body(a, 8))
        seen = await stats(small.endpoint)
    assert again_b.final["cached_tokens"] == again_b.final["prompt_tokens"] - 1  # all but the last
    assert again_a.final["cached_tokens"] < first_a.final["prompt_tokens"] // 2  # only what it shares with b
    assert 0 < seen["cache_bytes"] <= budget and seen["cache_entries"] == 1


@pytest.fixture(scope="module")
def strict_dir(workdir: Path, qwen_dir: Path) -> Path:
    """A short context, and a chat template that refuses a role, as real ones do."""
    dest = workdir / "strict"
    shutil.copytree(qwen_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    tokenizer_config = json.loads((dest / "tokenizer_config.json").read_text())
    refuse = "{% if messages[0]['role'] == 'tool' %}{{ raise_exception('a tool message cannot come first') }}"
    refuse += "{% endif %}"
    tokenizer_config["chat_template"] = refuse + tokenizer_config["chat_template"]
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return dest


@pytest.fixture(scope="module")
def strict(workdir: Path, strict_dir: Path) -> Iterator[Served]:
    specs = rank_specs([strict_dir], "single", max_batch=1, max_queue=1)
    with serving(specs, workdir, "strict") as served:
        yield served


async def test_bad_requests_fail_alone_and_the_runner_serves_on(strict: Served, strict_dir: Path, references) -> None:
    async with httpx.AsyncClient(base_url=strict.endpoint, timeout=60) as http:
        too_long = await http.post("/generate", json=body("fox " * 80, 4))
        template = await http.post("/generate", json=body([{"role": "tool", "content": "x"}], 4))
    assert too_long.status_code == 400 and "context is 64" in too_long.json()["detail"]
    assert template.status_code == 400 and "a tool message cannot come first" in template.json()["detail"]
    got, final = await generate(strict.endpoint, body(PROMPT, 500))
    # max_tokens past the context ends at the context
    assert final["finish_reason"] == "length" and final["prompt_tokens"] + final["completion_tokens"] == 64
    assert got == references(strict_dir, PROMPT, final["completion_tokens"])


async def until(http: httpx.AsyncClient, counter: str) -> None:
    for _ in range(1000):
        if (await http.get("/stats")).json()[counter] > 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the runner's {counter} stayed empty")


async def attempt(endpoint: str, request: dict) -> tuple[httpx.Response, dict]:
    """One request to its end: the response, and its final line when it was served (else its JSON body)."""
    async with (
        httpx.AsyncClient(base_url=endpoint, timeout=120) as http,
        http.stream("POST", "/generate", json=request) as response,
    ):
        lines = [json.loads(line) async for line in response.aiter_lines() if line]
    return response, lines[-1]


@pytest.fixture(scope="module")
def one_place(workdir: Path, qwen_dir: Path) -> Iterator[Served]:
    with serving(rank_specs([qwen_dir], "single", max_batch=1, max_queue=1), workdir, "one-place") as served:
        yield served


async def test_a_full_queue_is_refused_with_429(one_place: Served) -> None:
    # a request that would run for thousands of tokens holds the one batch place until its client goes away: a
    # short one could end before the next is queued (it did, on an idle machine)
    running = asyncio.create_task(timed(one_place.endpoint, body(PROMPT, 4000)))
    async with httpx.AsyncClient(base_url=one_place.endpoint, timeout=60) as http:
        await until(http, "batch")
        waiting = asyncio.create_task(timed(one_place.endpoint, body(PROMPT, 4)))
        await until(http, "queue")
        burst = await asyncio.gather(*(attempt(one_place.endpoint, body(PROMPT, 4)) for _ in range(6)))
    assert [response.status_code for response, _ in burst] == [429] * 6
    assert all(response.headers["Retry-After"] == "1" for response, _ in burst)
    assert all("waiting" in last["detail"] for _, last in burst)
    assert not running.done()
    running.cancel()  # its client hangs up: the queued request takes the place
    assert (await waiting).final["finish_reason"] == "length"


async def test_a_runner_with_a_secret_answers_only_its_bearer(workdir: Path, qwen_dir: Path) -> None:
    specs = [replace(spec, secret="s3cret") for spec in rank_specs([qwen_dir], "single")]
    with serving(specs, workdir, "secret") as served:
        async with httpx.AsyncClient(base_url=served.endpoint, timeout=60) as http:
            refused = await http.post("/generate", json=body(PROMPT, 2))
            wrong = await http.post("/generate", json=body(PROMPT, 2), headers={"Authorization": "Bearer nope"})
            stats = await http.get("/stats")
            health = await http.get("/health")
            served_ok = await http.post("/generate", json=body(PROMPT, 2), headers={"Authorization": "Bearer s3cret"})
    assert refused.status_code == wrong.status_code == stats.status_code == 401
    assert health.status_code == 200 and served_ok.status_code == 200


def test_a_model_mlx_cannot_run_fails_loading_with_mlx_reason(workdir: Path, qwen_dir: Path) -> None:
    broken = workdir / "odd-heads"
    shutil.copytree(qwen_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    # the same weight shapes, but heads of size 1: it loads, and RoPE refuses to run
    config.update(num_attention_heads=64, num_key_value_heads=32, head_dim=1)
    (broken / "config.json").write_text(json.dumps(config))
    runner = spawn(rank_specs([broken], "single")[0], workdir, "odd-heads")
    event = runner.event()
    assert runner.proc.wait(30) == 3  # the model itself: retrying cannot help
    assert event["event"] == "error" and event["refused"] and "dims must be even" in event["message"]
