"""Structured output's cost per token: the same seeded sampled requests decoded with and without a JSON-schema
grammar (llguidance masks applied as a logits processor), on one rank's Batch, in this process.

    python -m bench.grammar [--batch 8] [--tokens 64] [--rounds 6]

On a model of hidden 576 x 12 layers by default; writes bench/out/grammar.json (the goal: constrained <= 1.1x free).
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import machine, save

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 12}}},
          "required": ["items"]}  # fmt: skip


def decode(batch: object, prompt: list[int], size: int, tokens: int, grammar: str, first_seed: int = 0) -> float:
    """Seconds per decoded token (all requests' tokens counted) for `size` requests joining at once."""
    from shardline.engine.protocol import Join, Sampling, Step

    joins = [Join(prompt, Sampling(tokens, 1.0, 1.0, seed, grammar=grammar))
             for seed in range(first_seed, first_seed + size)]  # fmt: skip
    out = batch.apply(Step(joins=joins))  # type: ignore[attr-defined]
    count, started = 0, time.perf_counter()
    while True:
        count += len(out.responses)
        if batch.idle():  # type: ignore[attr-defined]
            break
        out = batch.apply(Step())  # type: ignore[attr-defined]
    return (time.perf_counter() - started) / max(count, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=6, help="free and constrained runs, interleaved (medians)")
    args = parser.parse_args()
    from mlx_lm import load

    from shardline.engine.batch import Batch
    from shardline.engine.grammar import grammar_for
    from tests.support.model_factory import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp) / "m", num_layers=args.layers, num_files=1, vocab_size=4096,
                                    hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3, num_heads=9,
                                    num_kv_heads=3)  # fmt: skip
        model, tokenizer = load(str(model_dir))
        batch = Batch(model, tokenizer, prefill_step=512)
        grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "b", "schema": SCHEMA}})
        prompt = tokenizer.encode("The quick brown fox")
        decode(batch, prompt, 1, 8, grammar)  # warm-up: builds llguidance's tokenizer view
        rows = {}
        for size in (1, args.batch):
            # interleaved rounds, other seeds each round, medians: one stream on a busy CPU varies by +-15%
            free, constrained = [], []
            for round_ in range(args.rounds):
                free.append(decode(batch, prompt, size, args.tokens, "", round_ * size))
                constrained.append(decode(batch, prompt, size, args.tokens, grammar, round_ * size))
            free_s, constrained_s = statistics.median(free), statistics.median(constrained)
            rows[size] = {"free_ms": round(free_s * 1e3, 2), "grammar_ms": round(constrained_s * 1e3, 2),
                          "ratio": round(constrained_s / free_s, 3), "rounds": args.rounds}  # fmt: skip
        model = f"hidden {args.hidden} x {args.layers} layers, vocab 4096"
        data = {"model": model, "per_token": rows, "goal_ratio": 1.1, "machine": machine()}
        print(json.dumps(data, indent=2))
        save(Path(__file__).parent / "out" / "grammar.json", data)


if __name__ == "__main__":
    main()
