"""Overlapped pipelining (shardline/engine/overlap.py): many streams on a 2-rank pipeline, micro-batches or not.

    .venv/bin/python -m bench.pipeline_overlap [--size 576x12] [--dtype float16] [--streams 8] [--max-tokens 48]
                                               [--rounds 2] [--rank0-layers N] [--no-mlx-server]

Every target runs on this machine, no cluster, and is sent the same `streams` chat requests at once (greedy, short
prompts, so decoding decides), --rounds times:
  one node       one runner holding the whole model
  sequential     a 2-rank pipeline of runners with micro-batches off (RunnerSpec.overlap false): one rank
                 computes at a time, as mlx_lm's pipeline does
  overlapped     the same pipeline as shardline serves it: one micro-batch per rank, every rank busy
  mlx_lm.server --pipeline   on a 2-rank loopback ring (started as bench.batching starts it)
Aggregate tok/s = completion tokens / (last token - first send); decoding tok/s = the tokens after each stream's
first / (last token - the latest first token), prefill left out; medians of the rounds. Prints overlapped ÷
sequential, overlapped ÷ `mlx_lm.server --pipeline` (issue 18's goal: 2x), what fraction of 2 x one node the
pipeline reaches, and whether the two pipelines answered with the same tokens. First it times one decode step of
the whole model in one process at `streams` rows and at half: their ratio is the most micro-batches can gain on
this machine (the fixed cost of a small matmul decides it), and decoding's gain is printed as a fraction of it. Writes
bench/out/pipeline_overlap.json. Reports, never gates.
"""

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.batching import Target, burst, start_mlx_server, stop_group, user_prompt
from bench.common import machine, save
from bench.speed import SIZES, make_model, start_runners, stop_procs

OUT = Path(__file__).resolve().parent / "out" / "pipeline_overlap.json"
REQUEST_S = 900.0


async def generate(client: httpx.AsyncClient, endpoint: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
    tokens: list[int] = []
    started, first = time.perf_counter(), 0.0
    async with client.stream("POST", f"{endpoint}/generate", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            event = json.loads(line) if line else {}
            if "token" in event:
                tokens.append(event["token"])
                first = first or time.perf_counter()
    return {"tokens": tokens, "started": started, "first": first, "last": time.perf_counter()}


async def runner_burst(endpoint: str, prompts: list[list[dict]], max_tokens: int) -> list[dict]:
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=REQUEST_S, limits=limits) as client:
        return list(await asyncio.gather(*(generate(client, endpoint, p, max_tokens) for p in prompts)))


def count(run: dict) -> int:
    return len(run["tokens"]) if isinstance(run["tokens"], list) else run["tokens"]


def aggregate(runs: list[dict]) -> float:
    wall = max(r["last"] for r in runs) - min(r["started"] for r in runs)
    return sum(count(r) for r in runs) / wall


def decoding(runs: list[dict]) -> float:
    """Tokens/s once every stream has its first token: the decoding the micro-batches speed up, without prefill."""
    firsts = [r.get("first") or r["started"] + r["ttft_s"] for r in runs]
    after = sum(count(r) for r in runs) - len(runs)
    return after / (max(r["last"] for r in runs) - max(firsts))


def micro_batch_ceiling(model_dir: Path, rows: int, steps: int = 24) -> dict:
    """The most micro-batches can gain on this machine: with 2 ranks that each compute one micro-batch of half the
    rows at once, a step takes as long as a step of half the rows, against a step of all `rows` on one rank after
    the other. Timed here on the whole model in one process (every rank's layers scale alike)."""
    import mlx.core as mx  # only here: the rest of the bench needs no MLX
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model = load(str(model_dir))[0]

    def step_s(n: int) -> float:
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array([[1 + i % 97 for i in range(32)]] * n), cache=cache))
        token = mx.full((n, 1), 7, dtype=mx.int32)
        for _ in range(4):
            mx.eval(model(token, cache=cache))
        started = time.perf_counter()
        for _ in range(steps):
            mx.eval(model(token, cache=cache))
        return (time.perf_counter() - started) / steps

    whole, micro = step_s(rows), step_s(max(1, rows // 2))
    return {"rows": rows, "step_ms": whole * 1e3, "micro_step_ms": micro * 1e3, "ceiling": whole / micro}


def time_runners(root: Path, model_dir: Path, splits: list[int], overlap: bool, args: argparse.Namespace) -> dict:
    procs, endpoint = start_runners(root, model_dir, splits, overlap)
    try:
        prompts = [[{"role": "user", "content": user_prompt(n)}] for n in range(1, args.streams + 1)]
        asyncio.run(runner_burst(endpoint, prompts[:1], 4))  # warm-up
        rounds = [asyncio.run(runner_burst(endpoint, prompts, args.max_tokens)) for _ in range(args.rounds)]
        stats = httpx.get(f"{endpoint}/stats", timeout=30).json()
    finally:
        stop_procs(procs)
    return {
        "tok_s": statistics.median(aggregate(r) for r in rounds),
        "decode_tok_s": statistics.median(decoding(r) for r in rounds),
        "answers": [r["tokens"] for r in rounds[0]],
        "overlapped_steps": stats.get("overlapped_steps", 0),
    }


def time_mlx_server(root: Path, model_dir: Path, args: argparse.Namespace) -> dict:
    procs, url = start_mlx_server(root, model_dir, 2, "direct")
    try:
        target = Target("mlx_lm.server-2", url, str(model_dir))
        prompts = [[{"role": "user", "content": user_prompt(n)}] for n in range(1, args.streams + 1)]
        asyncio.run(burst(target, prompts[:1], 4))
        rounds = [asyncio.run(burst(target, prompts, args.max_tokens)) for _ in range(args.rounds)]
    finally:
        stop_group(procs)
    return {"tok_s": statistics.median(aggregate(r) for r in rounds),
            "decode_tok_s": statistics.median(decoding(r) for r in rounds)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="576x12")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="float16")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rank0-layers", type=int, help="layers rank 0 holds (default: half)")
    parser.add_argument("--no-mlx-server", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_model(root / "model", args.size, args.dtype)
        layers = SIZES[args.size]["num_layers"]
        first = args.rank0_layers or layers // 2
        ceiling = micro_batch_ceiling(model_dir, args.streams)
        rows: dict[str, dict] = {}
        rows["one node"] = time_runners(root / "one", model_dir, [layers], True, args)
        rows["sequential"] = time_runners(root / "seq", model_dir, [first, layers - first], False, args)
        rows["overlapped"] = time_runners(root / "ovl", model_dir, [first, layers - first], True, args)
        if not args.no_mlx_server:
            rows["mlx_lm.server --pipeline"] = time_mlx_server(root / "mlx", model_dir, args)
    same = rows["sequential"]["answers"] == rows["overlapped"]["answers"]
    ratios = {}
    for key, what in (("tok_s", "aggregate"), ("decode_tok_s", "decoding")):
        ovl = rows["overlapped"][key]
        ratios[f"{what}: overlapped ÷ sequential"] = ovl / rows["sequential"][key]
        ratios[f"{what}: overlapped ÷ (2 x one node)"] = ovl / (2 * rows["one node"][key])
        if "mlx_lm.server --pipeline" in rows:
            ratios[f"{what}: overlapped ÷ mlx_lm.server --pipeline (goal 2.0)"] = (
                ovl / rows["mlx_lm.server --pipeline"][key]
            )
    ratios["decoding: overlapped ÷ sequential, of its ceiling here"] = (
        ratios["decoding: overlapped ÷ sequential"] / ceiling["ceiling"]
    )
    print(f"{args.size} {args.dtype}, {args.streams} streams x {args.max_tokens} tokens, {machine()['cores']} cores, "
          f"rank 0 holds {first} of {layers} layers")  # fmt: skip
    print(
        f"  one decode step of the whole model: {ceiling['step_ms']:.1f} ms for {args.streams} rows, "
        f"{ceiling['micro_step_ms']:.1f} ms for half: micro-batches gain at most {ceiling['ceiling']:.2f}x here"
    )
    for name, row in rows.items():
        print(f"  {name:<26} {row['tok_s']:7.1f} tok/s aggregate, {row['decode_tok_s']:7.1f} decoding")
    for name, ratio in ratios.items():
        print(f"  {name:<62} {ratio:5.2f}")
    steps = rows["overlapped"]["overlapped_steps"], rows["sequential"]["overlapped_steps"]
    print(f"  steps run overlapped: {steps[0]} (sequential: {steps[1]})")
    print(f"  greedy tokens of the two pipelines {'the same' if same else 'DIFFER'}")
    for row in rows.values():
        row.pop("answers", None)
    save(args.out, {"machine": machine(), "size": args.size, "dtype": args.dtype, "streams": args.streams,
                    "max_tokens": args.max_tokens, "rank0_layers": first, "ceiling": ceiling, "rows": rows,
                    "ratios": ratios, "same_tokens": same})  # fmt: skip


if __name__ == "__main__":
    main()
