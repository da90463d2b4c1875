"""Speculative decoding's speed-up, on one rank's Batch in this process: the same greedy requests decoded plain
and with drafts (`num_draft_tokens`), 1 stream and 8, on a model of hidden 576 x 12 layers.

    python -m bench.speculative [--tokens 128] [--drafts 4] [--only fresh,fresh-draft]

Workloads:
  edit         a model that writes a text (each token's successor in it is what its head predicts: layers'
               outputs zeroed, lm_head built from the text's bigrams), asked to continue the text it was shown:
               what an agent's edit of a file it read looks like; drafts by prompt lookup
  random       random weights: drafts (prompt lookup) come only from the model's own repetitions
  fresh        the first model, shown only the text's first 8 tokens: nothing to copy yet (prompt lookup)
  fresh-draft  the same, drafts by a draft model (hidden 64 x 2 layers, the same bigrams: a draft that agrees
               with the model, as a well-chosen small model of the same family mostly does)
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


def copying_model(dest: Path, small: bool = False) -> tuple[Path, list[int]]:
    """A model (hidden 576 x 12 layers, or 64 x 2 if `small`) whose greedy text follows SOURCE's bigrams; and
    SOURCE's tokens."""
    from tokenizers import Tokenizer

    from tests.support.model_factory import make_tiny_model, write_chain_weights

    shape = (dict(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2) if small else
             dict(num_layers=12, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3))  # fmt: skip
    make_tiny_model(dest, **shape, vocab_size=1024, num_files=1)  # type: ignore[arg-type]
    tokens = Tokenizer.from_file(str(dest / "tokenizer.json")).encode(SOURCE).ids
    chain = dict(itertools.pairwise(tokens))  # a repeated token keeps its last successor
    write_chain_weights(dest, 1024, chain)
    return dest, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--drafts", type=int, default=4)
    parser.add_argument("--only", default="", help="comma-separated workloads (default: all)")
    args = parser.parse_args()
    from mlx_lm import load

    from shardline.engine.batch import Batch
    from shardline.engine.drafter import DraftModel, load_draft_model
    from tests.support.model_factory import make_tiny_model

    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        edit_dir, source = copying_model(Path(tmp) / "edit")
        draft_dir, _ = copying_model(Path(tmp) / "draft", small=True)
        random_dir = make_tiny_model(Path(tmp) / "random", num_layers=12, hidden_size=576, intermediate_size=1536,
                                     num_heads=9, num_kv_heads=3, vocab_size=1024, num_files=1)  # fmt: skip
        workloads = [
            ("edit", edit_dir, source + source[:8], None),
            ("random", random_dir, source, None),
            ("fresh", edit_dir, source[:8], None),
            ("fresh-draft", edit_dir, source[:8], draft_dir),
        ]
        chosen = set(args.only.split(",")) if args.only else {w[0] for w in workloads}
        for name, model_dir, prompt, drafts_by in (w for w in workloads if w[0] in chosen):
            model, tokenizer = load(str(model_dir))
            drafter = DraftModel(load_draft_model(drafts_by, tokenizer), None, 512) if drafts_by else None
            batch = Batch(model, tokenizer, prefill_step=512, drafter=drafter)
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
    data = {"model": "hidden 576 x 12 layers, vocab 1024", "draft_model": "hidden 64 x 2 layers",
            "tokens": args.tokens, "drafts": args.drafts,
            "rows": rows, "machine": machine()}  # fmt: skip
    print(json.dumps(rows, indent=2))
    save(Path(__file__).parent / "out" / "speculative.json", data)


if __name__ == "__main__":
    main()
