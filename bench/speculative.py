"""Prompt-lookup speculation's speed-up, on one rank's Batch in this process: the same greedy requests decoded
plain and with drafts (`num_draft_tokens`), 1 stream and 8, on a model of hidden 576 x 12 layers.

    python -m bench.speculative [--tokens 128] [--drafts 4]

Two workloads:
  edit     a model that copies (each token's successor in a text is what its head predicts: layers' outputs
           zeroed, lm_head built from the text's bigrams), asked to continue text it was shown: what an agent's
           edit of a file it read looks like
  random   random weights: drafts come only from the model's own repetitions
Greedy output is checked identical both ways. Writes bench/out/speculative.json.
"""

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine, save

STREAMS = (1, 8)
SOURCE = """def place(model, nodes):
    free = sorted(nodes, key=lambda n: n.memory, reverse=True)
    layers = model.layers
    share = [n.memory / sum(m.memory for m in free) for n in free]
    return [round(layers * s) for s in share]
"""


def decode(batch: Any, prompts: list[list[int]], tokens: int, drafts: int) -> tuple[float, list[list[int]], int, int]:
    """Tokens/s over all requests, their tokens, drafts offered and accepted."""
    from shardline.engine.protocol import Join, Sampling, Step

    before = (batch.tally.drafted, batch.tally.accepted)
    started = time.perf_counter()
    out = batch.apply(Step(joins=[Join(p, Sampling(tokens, 0.0, 1.0, 0, draft_tokens=drafts)) for p in prompts]))
    got: dict[int, list[int]] = {uid: [] for uid in out.joined}
    order = list(out.joined)
    while True:
        for response in out.responses:
            got[response.uid].append(response.token)
        if batch.idle():
            break
        out = batch.apply(Step())
    seconds = time.perf_counter() - started
    count = sum(len(t) for t in got.values())
    return count / seconds, [got[u] for u in order], batch.tally.drafted - before[0], batch.tally.accepted - before[1]


def copying_model(dest: Path) -> tuple[Path, list[int]]:
    """A model whose greedy text follows SOURCE's bigrams; and SOURCE's tokens."""
    from tokenizers import Tokenizer

    from tests.support.model_factory import make_tiny_model, write_chain_weights

    make_tiny_model(dest, num_layers=12, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3,
                    vocab_size=1024, num_files=1)  # fmt: skip
    tokens = Tokenizer.from_file(str(dest / "tokenizer.json")).encode(SOURCE).ids
    chain = dict(itertools.pairwise(tokens))  # a repeated token keeps its last successor
    write_chain_weights(dest, 1024, chain)
    return dest, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--drafts", type=int, default=4)
    args = parser.parse_args()
    from mlx_lm import load

    from shardline.engine.batch import Batch
    from tests.support.model_factory import make_tiny_model

    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        edit_dir, source = copying_model(Path(tmp) / "edit")
        random_dir = make_tiny_model(Path(tmp) / "random", num_layers=12, hidden_size=576, intermediate_size=1536,
                                     num_heads=9, num_kv_heads=3, vocab_size=1024, num_files=1)  # fmt: skip
        for name, model_dir, prompt in (("edit", edit_dir, source + source[:8]), ("random", random_dir, source)):
            model, tokenizer = load(str(model_dir))
            batch = Batch(model, tokenizer, prefill_step=512)
            decode(batch, [prompt], 8, 0)  # warm-up
            for streams in STREAMS:
                prompts = [prompt[: len(prompt) - i] for i in range(streams)]  # not all alike
                plain = [decode(batch, prompts, args.tokens, 0) for _ in range(2)]
                spec = [decode(batch, prompts, args.tokens, args.drafts) for _ in range(2)]
                assert all(s[1] == plain[0][1] for s in spec), "speculation changed greedy output"
                best_plain, best_spec = max(p[0] for p in plain), max(s[0] for s in spec)
                drafted, accepted = spec[-1][2], spec[-1][3]
                rows[f"{name}-{streams}"] = {
                    "plain_tok_s": round(best_plain, 1), "speculative_tok_s": round(best_spec, 1),
                    "ratio": round(best_spec / best_plain, 2), "acceptance": round(accepted / max(drafted, 1), 2),
                }  # fmt: skip
                print(f"{name:7s} {streams} stream(s): {rows[f'{name}-{streams}']}")
    data = {"model": "hidden 576 x 12 layers, vocab 1024", "tokens": args.tokens, "drafts": args.drafts,
            "rows": rows, "machine": machine()}  # fmt: skip
    print(json.dumps(rows, indent=2))
    save(Path(__file__).parent / "out" / "speculative.json", data)


if __name__ == "__main__":
    main()
