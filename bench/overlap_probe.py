"""What overlapped micro-batches could give a 2-rank pipeline here: a probe, not the engine.

    .venv/bin/python -m bench.overlap_probe [--size 576x12] [--dtype float16] [--rows 8] [--steps 24]

Two processes on one loopback ring hold half the layers each of a qwen2 model (rank 1 the first half and the
embedding, rank 0 the rest and the head, as shardline splits), and decode `rows` greedy rows with plain
point-to-point messages: rank 1 sends the hidden state down, rank 0 sends the sampled tokens back.
  sequential  all rows in one batch: each rank waits while the other computes (today's pipeline)
  overlapped  two micro-batches out of phase: rank 1 computes B while rank 0 computes A, then A's next
              token while rank 0 computes B, so both ranks work all the time
  one node    the whole model in one process, all rows in one batch
Prints aggregate tok/s of each, overlapped ÷ sequential, and pipeline ÷ (2 x one node); checks the greedy
tokens of the two pipelines are the same. Writes bench/out/overlap_probe.json.
"""

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine, rank_result, save
from bench.speed import SIZES, make_model

PROMPT_TOKENS = 16
OUT = Path(__file__).resolve().parent / "out" / "overlap_probe.json"


def prompts(rows: int, vocab: int) -> list[list[int]]:
    return [[(7 * r + 13 * i + 1) % vocab for i in range(PROMPT_TOKENS)] for r in range(rows)]


def run_layers(layers: list[Any], h: Any, caches: list[Any]) -> Any:
    from mlx_lm.models.base import create_attention_mask

    mask = create_attention_mask(h, caches[0])
    for layer, cache in zip(layers, caches, strict=True):
        h = layer(h, mask, cache)
    return h


def rank_main(mode: str, model_dir: str, rows: int, steps: int) -> None:
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache
    from mlx_lm.utils import load_model

    model, config = load_model(Path(model_dir), lazy=True)
    inner, layers = model.model, model.model.layers
    tokens = prompts(rows, config["vocab_size"])

    def head(h: Any) -> Any:
        return mx.argmax(model.lm_head(inner.norm(h))[:, -1], axis=-1)[:, None].astype(mx.int32)

    if mode == "single":
        mx.eval(model.parameters())
        caches = [KVCache() for _ in layers]
        tok = head(run_layers(layers, inner.embed_tokens(mx.array(tokens)), caches))
        mx.eval(tok)
        started, out = time.perf_counter(), []
        for _ in range(steps):
            tok = head(run_layers(layers, inner.embed_tokens(tok), caches))
            mx.eval(tok)
            out.append(tok.tolist())
        print("RESULT " + json.dumps({"seconds": time.perf_counter() - started}), flush=True)
        return

    group = mx.distributed.init(backend="ring", strict=True)
    rank, half = group.rank(), len(layers) // 2
    mine = layers[half:] if rank == 0 else layers[:half]
    mx.eval([layer.parameters() for layer in mine])
    mx.eval(model.lm_head.parameters(), inner.norm.parameters()) if rank == 0 else mx.eval(
        inner.embed_tokens.parameters()
    )
    parts = [list(range(rows))] if mode == "sequential" else [list(range(rows // 2)), list(range(rows // 2, rows))]
    caches = [[KVCache() for _ in mine] for _ in parts]
    hidden, dtype = config["hidden_size"], inner.embed_tokens.weight.dtype
    seen: list[list[int]] = [[] for _ in range(rows)]

    def rank1(index: int, tok: Any) -> None:
        mx.eval(mx.distributed.send(run_layers(mine, inner.embed_tokens(tok), caches[index]), 0, group=group))

    def rank0(index: int, length: int) -> None:
        h = mx.distributed.recv((len(parts[index]), length, hidden), dtype, 1, group=group)
        tok = head(run_layers(mine, h, caches[index]))
        mx.eval(mx.distributed.send(tok, 1, group=group))
        for row, t in zip(parts[index], tok.tolist(), strict=True):
            seen[row] += t

    def recv_tokens(index: int) -> Any:
        return mx.distributed.recv((len(parts[index]), 1), mx.int32, 0, group=group)

    for index, part in enumerate(parts):  # prefill: every micro-batch goes down before any token comes back
        if rank == 1:
            rank1(index, mx.array([tokens[r] for r in part]))
        else:
            rank0(index, PROMPT_TOKENS)
    started = time.perf_counter()
    for _ in range(steps):
        for index in range(len(parts)):
            if rank == 1:
                rank1(index, recv_tokens(index))
            else:
                rank0(index, 1)
    if rank == 1:  # the last tokens rank 0 sent
        mx.eval([recv_tokens(index) for index in range(len(parts))])
    seconds = time.perf_counter() - started
    if rank == 0:
        digest = hashlib.sha256(json.dumps(seen).encode()).hexdigest()[:16]
        print("RESULT " + json.dumps({"seconds": seconds, "tokens": digest}), flush=True)


def run(mode: str, model_dir: Path, rows: int, steps: int, root: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.overlap_probe", "rank", mode, str(model_dir), str(rows), str(steps)]
    result: dict[str, Any] = rank_result(command, root, mode, ranks=1 if mode == "single" else 2)
    result["tok_s"] = rows * steps / result["seconds"]
    return result


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "rank":
        rank_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="576x12")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="float16")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_model(root / "model", args.size, args.dtype)
        results = {mode: run(mode, model_dir, args.rows, args.steps, root)
                   for mode in ("single", "sequential", "overlapped")}  # fmt: skip
    same = results["sequential"]["tokens"] == results["overlapped"]["tokens"]
    ratios = {
        "overlapped ÷ sequential": results["overlapped"]["tok_s"] / results["sequential"]["tok_s"],
        "sequential ÷ (2 x one node)": results["sequential"]["tok_s"] / (2 * results["single"]["tok_s"]),
        "overlapped ÷ (2 x one node)": results["overlapped"]["tok_s"] / (2 * results["single"]["tok_s"]),
    }
    print(f"{args.size} {args.dtype}, {args.rows} rows x {args.steps} steps, {machine()['cores']} cores")
    for mode, result in results.items():
        print(f"  {mode:<11} {result['tok_s']:7.1f} tok/s")
    for name, ratio in ratios.items():
        print(f"  {name:<28} {ratio:5.2f}")
    print(f"  greedy tokens of the two pipelines {'the same' if same else 'DIFFER'}")
    save(args.out, {"machine": machine(), "size": args.size, "dtype": args.dtype, "rows": args.rows,
                    "steps": args.steps, "results": results, "ratios": ratios, "same_tokens": same})  # fmt: skip


if __name__ == "__main__":
    main()
