"""Many users at once: shardline vs `mlx_lm.server`, 1 node and 2-node pipeline, same model files and BLAS, same run.

    .venv/bin/python -m bench.batching [--size 8m] [--max-tokens 32] [--levels 1,4,8,16] [--prefix-tokens 2000]
                                       [--prefix-rounds 2] [--single-runs 3] [--launcher direct|mlx.launch]
                                       [--no-pipeline] [--out bench/out/batching.json]
    .venv/bin/python -m bench.batching --size 576x12 --dtype float16 --levels 1,8 --out bench/out/speed_goals.json

Targets (every request: a streaming OpenAI chat completion, greedy, fixed max_tokens, a prompt no
other request shares, so no prefix-cache hit flatters a load level):
  shardline-1          /v1/chat/completions (SSE) of a 1-node instance, through a real cluster
  mlx_lm.server-1      `python -m mlx_lm.server --model DIR` (its BatchGenerator, LRU prompt cache)
  shardline-2          a 2-node pipeline instance (two node workers on this machine)
  mlx_lm.server-2      `mlx_lm.server --pipeline` on a 2-rank ring over loopback
Load levels: N requests sent at once; aggregate tok/s = completion tokens / (last token - first send);
first token (TTFT) p50 / p95 (nearest rank) / max over the N. Level 1 is --single-runs requests one
after another; single-stream decode tok/s = (tokens - 1) / (last token - first token), median.
Second turn: a ~--prefix-tokens system prompt and a question (turn 1, cold, warms the cache), then
the conversation so far plus a new question (turn 2): its first token is what a chat user waits for
(max_tokens 1 for both turns). Load-level prompts are screened (see screen) so the first token shows text.
The 2-rank mlx_lm.server is started as `mlx.launch --backend ring -n 2` starts it (MLX_RANK,
MLX_HOSTFILE of two loopback ports) unless --launcher mlx.launch: mlx.launch's I/O loop selects on each
child's always-writable stdin and so spins about a core, which on a small machine is the benchmark.
Reports, never gates: prints tables and shardline ÷ mlx_lm.server ratios against the goals of issue 8, and
issue 18's (one stream at mlx_lm's pace on 1 node and on a pipeline; 8 streams on 2 nodes 2x `--pipeline`; what
fraction of 2 x one node's 8-stream throughput the pipeline reaches), and writes bench/out/batching.json. The
second command (in `make bench`) is issue 18's measure: a model where compute, not overhead, decides.
"""

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tokenizers import Tokenizer

from activities.runner import optimized_blas, runner_env
from bench.common import cluster_logs, cluster_on_mirror, machine, save, start_node
from bench.speed import REPO_ID, SIZES, busy, foreign, log_tails, make_model, model_figures, settle, start_instance
from tests.support.hub_mirror import publish_model
from tests.support.model_factory import CORPUS
from tests.support.processes import REPO, Cluster, free_port

OUT = Path(__file__).resolve().parent / "out" / "batching.json"
CACHE_BYTES = 1 << 30  # mlx_lm.server's --prompt-cache-bytes: shardline's default SHARDLINE_PROMPT_CACHE_BYTES
READY_TIMEOUT = 900.0
REQUEST_TIMEOUT = 900.0
GOALS = {  # issue 8, shardline ÷ mlx_lm.server
    "aggregate tok/s at 8 streams": (">=", 1.0),
    "single-stream decode tok/s": (">=", 0.97),
    "second-turn first token": ("<=", 1.1),
    "slowest first token at 8 streams": ("<=", 1.2),
}
Run = dict[str, Any]


@dataclass
class Target:
    name: str
    url: str
    model: str  # the chat request's "model"
    numbers: list[int] = field(default_factory=list)  # screened prompt numbers, used in order (see screen)
    used: int = 0

    def fresh(self) -> int:
        self.used += 1
        return self.numbers[self.used - 1] if self.used <= len(self.numbers) else 100_000 + self.used


# --- prompts -----------------------------------------------------------------------------------


def user_prompt(n: int) -> str:
    """A prompt no other request of the run starts the same way (after the chat template's few tokens)."""
    a, b = CORPUS[n % len(CORPUS)], CORPUS[(n * 7 + 3) % len(CORPUS)]
    return f"Request {n}. {a} {b} What happens next?"


def system_prompt(tokenizer: Tokenizer, tokens: int, salt: str) -> str:
    """About `tokens` tokens of numbered corpus sentences; `salt` first, so each round has its own prefix."""
    parts, i = [f"Conversation {salt}. You are a careful assistant. Background notes follow."], 0
    while len(tokenizer.encode(" ".join(parts)).ids) < tokens:
        parts.append(f"({i}) {CORPUS[i % len(CORPUS)]}")
        i += 1
    return " ".join(parts)


def screen(model_dir: Path, want: int, max_tokens: int) -> list[int]:
    """Prompt numbers whose greedy answer shows text by its second token (of four, so not the final flush).
    A random model often answers with byte tokens that are no UTF-8 alone: every server's streaming
    detokenizer then holds all text back to the end, and "first token" would time the whole answer."""
    from mlx_lm import load, stream_generate  # only here: the bench needs MLX for nothing else
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(str(model_dir))[:2]
    good: list[int] = []
    for n in range(1, want * 30):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_prompt(n)}], add_generation_prompt=True
        )
        texts = [r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=4, sampler=make_sampler(0.0))]
        if any(texts[:2]):
            good.append(n)
            if len(good) == want:
                break
    return good


# --- one streaming request ---------------------------------------------------------------------


def timing(started: float, first: float, last: float, tokens: int) -> Run:
    decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
    return {"ttft_s": first - started, "decode_tps": decode, "tokens": tokens, "started": started, "last": last}


async def request(client: httpx.AsyncClient, target: Target, messages: list[dict[str, str]], max_tokens: int) -> Run:
    """Send one streaming request; its timing, text, and cached_tokens when the server tells."""
    first = last = 0.0
    count, text, usage = 0, [], {}
    path = "/v1/chat/completions"
    body = {"model": target.model, "messages": messages, "temperature": 0, "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    started = time.perf_counter()
    async with client.stream("POST", target.url + path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"{target.name}: HTTP {response.status_code}: {response.text[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line.removeprefix("data: "))
            if event.get("usage"):
                details = event["usage"].get("prompt_tokens_details") or {}
                usage = {
                    "completion_tokens": event["usage"]["completion_tokens"],
                    "cached": details.get("cached_tokens"),
                }
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece or (choice.get("finish_reason") and not first):  # a 1-token answer with no text
                    now = time.perf_counter()
                    first, last, count = first or now, now, count + 1
                    text.append(piece or "")
    if not first:
        raise RuntimeError(f"{target.name}: no token came back")
    tokens = usage.get("completion_tokens", count)
    return {**timing(started, first, last, tokens), "cached_tokens": usage.get("cached"), "text": "".join(text)}


async def burst(target: Target, prompts: list[list[dict[str, str]]], max_tokens: int) -> list[Run]:
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT, limits=limits) as client:
        return list(await asyncio.gather(*(request(client, target, p, max_tokens) for p in prompts)))


def one(target: Target, messages: list[dict[str, str]], max_tokens: int) -> Run:
    return asyncio.run(burst(target, [messages], max_tokens))[0]


# --- load levels and the second turn -----------------------------------------------------------


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def level(target: Target, streams: int, max_tokens: int, rounds: int, settle_s: float) -> dict[str, Any]:
    """`rounds` bursts of `streams` concurrent requests (level 1: `rounds` requests one after another)."""
    runs: list[Run] = []
    aggregates, others = [], []
    for _ in range(rounds):
        settle(settle_s)
        snap = busy()
        prompts = [[{"role": "user", "content": user_prompt(target.fresh())}] for _ in range(streams)]
        got = asyncio.run(burst(target, prompts, max_tokens))
        others.append(foreign(snap, busy()))
        wall = max(r["last"] for r in got) - min(r["started"] for r in got)
        aggregates.append(sum(r["tokens"] for r in got) / wall)
        runs += got
    ttfts = [r["ttft_s"] for r in runs]
    return {
        "streams": streams,
        "rounds": rounds,
        "aggregate_tps": statistics.median(aggregates),
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p95_s": nearest_rank(ttfts, 0.95),
        "ttft_max_s": max(ttfts),
        "decode_tps_median": statistics.median(r["decode_tps"] for r in runs),
        "tokens": [r["tokens"] for r in runs],
        "foreign_cores": max(others),
        "ttfts_s": [round(t, 4) for t in ttfts],
    }


def second_turn(
    target: Target, tokenizer: Tokenizer, prefix_tokens: int, rounds: int, settle_s: float
) -> dict[str, Any]:
    """Turn 1 (cold: the whole system prompt) then turn 2 (the conversation so far + a question); max_tokens 1
    for both, so the first token's time is seen exactly whatever the random model says."""
    turns: list[dict[str, Any]] = []
    for i in range(rounds):
        system = system_prompt(tokenizer, prefix_tokens, f"{target.name}-{i}-{uuid.uuid4().hex[:6]}")
        first = [{"role": "system", "content": system}, {"role": "user", "content": user_prompt(target.fresh())}]
        settle(settle_s)
        snap = busy()
        turn1 = one(target, first, 1)
        history = [*first, {"role": "assistant", "content": turn1["text"]}]
        turn2 = one(target, [*history, {"role": "user", "content": user_prompt(target.fresh())}], 1)
        turns.append({"turn1_ttft_s": turn1["ttft_s"], "turn2_ttft_s": turn2["ttft_s"],
                      "turn2_cached_tokens": turn2["cached_tokens"],
                      "foreign_cores": foreign(snap, busy())})  # fmt: skip
    return {
        "prefix_tokens": len(tokenizer.encode(system).ids),
        "turns": turns,
        "turn1_ttft_s": statistics.median(t["turn1_ttft_s"] for t in turns),
        "turn2_ttft_s": statistics.median(t["turn2_ttft_s"] for t in turns),
        "turn2_cached_tokens": turns[-1]["turn2_cached_tokens"],
    }


@dataclass
class Plan:
    levels: list[int]
    max_tokens: int
    single_runs: int
    prefix_tokens: int
    prefix_rounds: int
    settle_s: float
    numbers: list[int] = field(default_factory=list)


def measure(target: Target, plan: Plan, tokenizer: Tokenizer) -> dict[str, Any]:
    """Warm-ups (one request, then two at once), every load level, then the second-turn test."""
    target.numbers = plan.numbers  # every target gets the same prompts in the same order
    one(target, [{"role": "user", "content": user_prompt(target.fresh())}], plan.max_tokens)
    prompts = [[{"role": "user", "content": user_prompt(target.fresh())}] for _ in range(2)]
    asyncio.run(burst(target, prompts, plan.max_tokens))
    levels: dict[str, Any] = {}
    result: dict[str, Any] = {"levels": levels}
    for streams in plan.levels:
        try:
            levels[str(streams)] = found = level(
                target, streams, plan.max_tokens, plan.single_runs if streams == 1 else 1, plan.settle_s
            )
        except (RuntimeError, httpx.HTTPError) as error:  # keep the levels done; a report, not a gate
            result["error"] = f"{streams} streams: {type(error).__name__}: {error}"
            print(f"  {target.name} x{streams}: failed: {result['error'][:300]}", flush=True)
            break
        print(f"  {target.name} x{streams}: {found['aggregate_tps']:.1f} tok/s, first token p50 "
              f"{found['ttft_p50_s']:.2f} s max {found['ttft_max_s']:.2f} s", flush=True)  # fmt: skip
    if plan.prefix_rounds and "error" not in result:
        result["second_turn"] = turn = second_turn(
            target, tokenizer, plan.prefix_tokens, plan.prefix_rounds, plan.settle_s
        )
        print(f"  {target.name} second turn: first token {turn['turn2_ttft_s']:.2f} s "
              f"(turn 1 {turn['turn1_ttft_s']:.2f} s, cached {turn['turn2_cached_tokens']})", flush=True)  # fmt: skip
    return result


# --- mlx_lm.server, one process or a 2-rank pipeline ------------------------------------------


def server_command(model_dir: Path, port: int, pipeline: bool) -> list[str]:
    return [sys.executable, "-m", "mlx_lm.server", "--model", str(model_dir), "--port", str(port),
            "--prompt-cache-bytes", str(CACHE_BYTES), "--log-level", "WARNING",
            *(["--pipeline"] if pipeline else [])]  # fmt: skip


def start_mlx_server(
    root: Path, model_dir: Path, ranks: int, launcher: str
) -> tuple[list[subprocess.Popen[bytes]], str]:
    """mlx_lm.server with the BLAS shardline gives its runners; its processes and URL once /health answers."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = server_command(model_dir, port, pipeline=ranks > 1)
    env = {**runner_env("auto"), "PYTHONPATH": str(REPO)}
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(args: list[str], name: str, **extra: str) -> None:
        with open(root / f"{name}.log", "ab") as log:
            procs.append(subprocess.Popen(args, env={**env, **extra}, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip

    if ranks == 1:
        spawn(command, "server")
    elif launcher == "mlx.launch":
        launch = Path(sys.executable).parent / "mlx.launch"
        spawn([str(launch), "--backend", "ring", "-n", str(ranks), "--starting-port", str(free_port()), "--", *command],
              "launch")  # fmt: skip
    else:  # what mlx.launch's ring launcher sets for each rank on loopback, without its spinning I/O loop
        hostfile = root / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(ranks)]))
        for rank in range(ranks):
            spawn(command, f"rank{rank}", MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            stop_group(procs)
            raise RuntimeError(f"mlx_lm.server exited {dead[0].returncode} before answering: {logs(root)}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return procs, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_group(procs)
            raise RuntimeError(f"mlx_lm.server not up within {READY_TIMEOUT} s: {logs(root)}")
        time.sleep(0.5)


def logs(root: Path, chars: int = 600) -> str:
    return " | ".join(f"{p.name}: {p.read_text(errors='replace')[-chars:]!r}" for p in sorted(root.glob("*.log")))


def stop_group(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process group (each was started in its own session), SIGKILL what is left after 10 s."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def bench_mlx_server(root: Path, model_dir: Path, ranks: int, launcher: str, plan: Plan, tok: Tokenizer) -> Run:
    started = time.perf_counter()
    procs, url = start_mlx_server(root, model_dir, ranks, launcher)
    try:
        target = Target(f"mlx_lm.server-{ranks}", url, "default_model")
        result = measure(target, plan, tok)  # the first request also waits for the model to load
        return {**result, "launcher": launcher if ranks > 1 else None, "up_s": time.perf_counter() - started}
    except (RuntimeError, httpx.HTTPError) as error:
        raise RuntimeError(f"{type(error).__name__}: {error}; logs: {logs(root)}") from error
    finally:
        stop_group(procs)


# --- shardline ---------------------------------------------------------------------------------


def bench_shardline(cluster: Cluster, nodes: list[str], plan: Plan, tok: Tokenizer) -> dict[str, Run]:
    instance = start_instance(cluster.api, nodes)
    n = len(nodes)
    try:
        # (a runner answers only its API, with the instance's secret: time the API, which users reach)
        results = {f"shardline-{n}": measure(Target(f"shardline-{n}", cluster.api, REPO_ID), plan, tok)}
    finally:
        httpx.delete(f"{cluster.api}/instances/{instance['instance_id']}", timeout=90)
    splits = [s["layers"][1] - s["layers"][0] for s in sorted(instance["shards"], key=lambda s: s["rank"])]
    for result in results.values():
        result.update({"ready_s": instance["ready_s"], "splits": splits})
    return results


# --- summary -----------------------------------------------------------------------------------


def figures(row: Run | None) -> dict[str, float | None]:
    """The four numbers the goals are about, for one target."""
    if not row:
        return dict.fromkeys(GOALS)
    levels, turn = row["levels"], row.get("second_turn") or {}
    return {
        "aggregate tok/s at 8 streams": levels["8"]["aggregate_tps"] if "8" in levels else None,
        "single-stream decode tok/s": levels["1"]["decode_tps_median"] if "1" in levels else None,
        "second-turn first token": turn.get("turn2_ttft_s"),
        "slowest first token at 8 streams": levels["8"]["ttft_max_s"] if "8" in levels else None,
    }


def ratios(rows: dict[str, Run]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for n in (1, 2):
        ours, theirs = figures(rows.get(f"shardline-{n}")), figures(rows.get(f"mlx_lm.server-{n}"))
        for key, (op, goal) in GOALS.items():
            x, y = ours[key], theirs[key]
            ratio = x / y if x is not None and y else None
            met = None if ratio is None else (ratio >= goal if op == ">=" else ratio <= goal)
            out.setdefault(key, {"goal": f"{op} {goal}"})[f"{n}-node"] = {"shardline": x, "mlx_lm.server": y,
                                                                          "ratio": ratio, "met": met}  # fmt: skip
    return out


SPEED_GOALS = {  # issue 18: shardline ÷ mlx_lm.server (1 node) or mlx_lm.server --pipeline (2 nodes)
    "single-stream decode, 1 node": ("single-stream decode tok/s", 1, 0.97),
    "single-stream decode, 2-node pipeline": ("single-stream decode tok/s", 2, 0.9),
    "aggregate tok/s at 8 streams, 2-node pipeline": ("aggregate tok/s at 8 streams", 2, 2.0),
}


def speed_goals(rows: dict[str, Run]) -> dict[str, Any]:
    """Issue 18's goals, and what fraction of N x one node's 8-stream throughput the 2-node pipeline reaches."""
    out: dict[str, Any] = {}
    for name, (key, n, goal) in SPEED_GOALS.items():
        x, y = figures(rows.get(f"shardline-{n}"))[key], figures(rows.get(f"mlx_lm.server-{n}"))[key]
        ratio = x / y if x is not None and y else None
        out[name] = {"goal": f">= {goal}", "ratio": ratio, "met": None if ratio is None else ratio >= goal}
    one, two = (figures(rows.get(f"shardline-{n}"))["aggregate tok/s at 8 streams"] for n in (1, 2))
    out["8 streams, 2 nodes ÷ (2 x 1 node)"] = {"goal": "report", "ratio": two / (2 * one) if one and two else None,
                                                "met": None}  # fmt: skip
    return out


def fmt(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def report(data: dict[str, Any]) -> None:
    m, model = data["machine"], data["model"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GiB RAM, Python {m['python']}")
    print(f"model: qwen2 {model['params_m']:.0f}M params, {model['dtype']}, {model['num_layers']} layers, hidden "
          f"{model['hidden_size']}; max_tokens {data['max_tokens']}; BLAS for both: "
          f"{data['blas'] or 'reference (the wheel)'}")  # fmt: skip
    print(f"\n{'target':<20} {'streams':>7} {'agg tok/s':>9} {'TTFT p50':>9} {'p95':>7} {'max':>7} "
          f"{'decode/s':>8} {'other':>6}")  # fmt: skip
    for name, row in data["rows"].items():
        for streams, lv in row["levels"].items():
            print(f"{name:<20} {streams:>7} {lv['aggregate_tps']:>9.1f} {lv['ttft_p50_s']:>8.2f}s "
                  f"{lv['ttft_p95_s']:>6.2f}s {lv['ttft_max_s']:>6.2f}s {lv['decode_tps_median']:>8.1f} "
                  f"{lv['foreign_cores']:>6.2f}")  # fmt: skip
    print(f"\n{'second turn':<20} {'prefix':>7} {'turn 1 TTFT':>12} {'turn 2 TTFT':>12} {'cached':>7}")
    for name, row in data["rows"].items():
        if turn := row.get("second_turn"):
            print(f"{name:<20} {turn['prefix_tokens']:>7} {turn['turn1_ttft_s']:>11.2f}s "
                  f"{turn['turn2_ttft_s']:>11.3f}s {fmt(turn['turn2_cached_tokens'], 'd'):>7}")  # fmt: skip
    print(f"\n{'shardline ÷ mlx_lm.server':<36} {'goal':>7} {'1 node':>8} {'':>4} {'2 nodes':>8}")
    for key, cells in data["ratios"].items():
        line = f"{key:<36} {cells['goal']:>7}"
        for n in ("1-node", "2-node"):
            met = cells[n]["met"]
            line += f" {fmt(cells[n]['ratio'], '.3f'):>8} {'' if met is None else ('ok' if met else 'MISS'):>4}"
        print(line)
    print(f"\n{'issue 18 (vs --pipeline on 2 nodes)':<48} {'goal':>7} {'ratio':>8}")
    for key, cell in data["speed_goals"].items():
        met = "" if cell["met"] is None else ("ok" if cell["met"] else "MISS")
        print(f"{key:<48} {cell['goal']:>7} {fmt(cell['ratio'], '.3f'):>8} {met:>4}")
    print("(other = cores busy outside this benchmark meanwhile: other work on the machine makes numbers noisy)")
    for name, why in data["problems"].items():
        print(f"skipped/problem: {name}: {why[:1500]}")


# --- the run -----------------------------------------------------------------------------------


def bench(root: Path, size: str, dtype: str, plan: Plan, launcher: str, pipeline: bool) -> Run:
    model_dir = make_model(root / "src", size, dtype)
    publish_model(model_dir, root / "mirrors", REPO_ID)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    plan.numbers = screen(model_dir, 3 + plan.single_runs + sum(n for n in plan.levels if n > 1), plan.max_tokens)
    print(f"prompts: {len(plan.numbers)} screened", flush=True)
    rows: dict[str, Run] = {}
    problems: dict[str, str] = {}

    def attempt(name: str, work: Callable[[], Run]) -> None:
        print(f"{name} ...", flush=True)
        try:
            rows[name] = work()
            if "error" in rows[name]:
                problems[name] = rows[name]["error"]
        except (RuntimeError, TimeoutError, httpx.HTTPError, OSError) as error:
            problems[name] = f"{type(error).__name__}: {error}"
            print(f"{name}: skipped: {problems[name][:500]}", flush=True)

    attempt("mlx_lm.server-1", lambda: bench_mlx_server(root / "mlx1", model_dir, 1, launcher, plan, tok))
    with cluster_on_mirror(root) as cluster:
        nodes = [f"n{uuid.uuid4().hex[:6]}" for _ in range(2)]
        start_node(cluster, nodes[0])
        for n in (1, 2) if pipeline else (1,):
            if n == 2:
                start_node(cluster, nodes[1])
            print(f"shardline-{n} ...", flush=True)
            try:
                rows.update(found := bench_shardline(cluster, nodes[:n], plan, tok))
                problems.update({name: row["error"] for name, row in found.items() if "error" in row})
            except (RuntimeError, TimeoutError, httpx.HTTPError) as error:
                problems[f"shardline-{n}"] = f"{type(error).__name__}: {error}"
                log_tails(cluster_logs(root))
    if pipeline:
        attempt("mlx_lm.server-2", lambda: bench_mlx_server(root / "mlx2", model_dir, 2, launcher, plan, tok))
    order = ["shardline-1", "shardline-1-direct", "mlx_lm.server-1", "shardline-2", "shardline-2-direct",
             "mlx_lm.server-2"]  # fmt: skip
    rows = {name: rows[name] for name in order if name in rows}
    return {
        "machine": machine(),
        "model": model_figures(model_dir, size, dtype),
        "blas": optimized_blas("auto"),
        "max_tokens": plan.max_tokens,
        "plan": plan.__dict__,
        "launcher": launcher,
        "rows": rows,
        "problems": problems,
        "ratios": ratios(rows),
        "speed_goals": speed_goals(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="8m")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--levels", default="1,4,8,16", help="concurrent streams, comma separated")
    parser.add_argument("--single-runs", type=int, default=3, help="requests one after another at level 1")
    parser.add_argument("--prefix-tokens", type=int, default=2000)
    parser.add_argument("--prefix-rounds", type=int, default=2, help="second-turn tests per target (0: none)")
    parser.add_argument("--settle", type=float, default=5.0, help="wait at most this long for a quiet machine")
    parser.add_argument("--launcher", choices=["direct", "mlx.launch"], default="direct")
    parser.add_argument("--no-pipeline", action="store_true", help="1-node targets only")
    parser.add_argument("--out", type=Path, default=OUT, help="where the results go (JSON)")
    args = parser.parse_args()
    plan = Plan([int(n) for n in args.levels.split(",")], args.max_tokens, args.single_runs, args.prefix_tokens,
                args.prefix_rounds, args.settle)  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks stop every process
    with tempfile.TemporaryDirectory(prefix="shardline-bench-") as tmp:
        data = bench(Path(tmp), args.size, args.dtype, plan, args.launcher, not args.no_pipeline)
    report(data)
    save(args.out, data)


if __name__ == "__main__":
    main()
