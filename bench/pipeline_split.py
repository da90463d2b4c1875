"""shardline's pipeline split against mlx-lm's own (PipelineMixin), same model, same two ranks, same run.

    .venv/bin/python -m bench.pipeline_split [--size 30m] [--dtype bfloat16] [--max-tokens 64] [--runs 3]

Both variants load a qwen2 model (mlx-lm pipelines qwen2 itself) in two processes on one loopback ring,
split it 50/50 and decode greedily with mlx_lm's stream_generate; rank 0 reports decode tokens/s. The
ratio shardline / mlx-lm says whether mlx-lm's own path is worth keeping where it exists. Writes
bench/out/pipeline_split.json.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import rank_result, save
from bench.speed import SIZES, make_model

PROMPT = "The scheduler keeps the state of the cluster in durable workflows, so nothing is lost on restart."


def rank_main(variant: str, model_dir: str, max_tokens: int, runs: int) -> None:
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.utils import load_model, load_tokenizer

    from shardline.engine.pipeline import split_pipeline
    from shardline.engine.spec import pipeline_layers

    group = mx.distributed.init(backend="ring", strict=True)
    model, config = load_model(Path(model_dir), lazy=True)
    splits = [config["num_hidden_layers"] // 2] * 2
    if variant == "mlx-lm":
        model.model.pipeline(group, splits)
    else:
        split_pipeline(model, sum(splits), pipeline_layers(splits, group.rank()), group.rank(), 2, group)
    mx.eval(model.parameters())
    tokenizer = load_tokenizer(Path(model_dir))
    rates = []
    for _ in range(runs + 1):  # the first is a warm-up
        started, count = None, 0
        for _ in stream_generate(model, tokenizer, PROMPT, max_tokens=max_tokens):
            count += 1
            if started is None:
                started = time.perf_counter()
        rates.append((count - 1) / (time.perf_counter() - started))
    if group.rank() == 0:
        print("RESULT " + json.dumps(rates[1:]), flush=True)


def run_variant(variant: str, model_dir: Path, max_tokens: int, runs: int, root: Path) -> list[float]:
    command = [sys.executable, "-m", "bench.pipeline_split", "rank", variant, str(model_dir)]
    return list(rank_result([*command, str(max_tokens), str(runs)], root, variant))


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "rank":
        rank_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="30m")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shardline-bench-") as tmp:
        root = Path(tmp)
        model_dir = make_model(root / "model", args.size, args.dtype)
        rates = {v: run_variant(v, model_dir, args.max_tokens, args.runs, root) for v in ("mlx-lm", "shardline")}
    medians = {v: statistics.median(r) for v, r in rates.items()}
    ratio = medians["shardline"] / medians["mlx-lm"]
    for variant, rate in medians.items():
        print(f"{variant:>10}  {rate:8.1f} decode tok/s  (runs: {', '.join(f'{r:.1f}' for r in rates[variant])})")
    print(f"shardline / mlx-lm pipeline: {ratio:.3f}x")
    result = {"size": args.size, "dtype": args.dtype, "rates": rates, "ratio": ratio}
    save(Path(__file__).parent / "out" / "pipeline_split.json", result)


if __name__ == "__main__":
    main()
