"""How soon an idle instance answers: time to the first token of a request that arrives while nothing runs, on one
rank and on a 2-rank pipeline of the same model, same run.

    .venv/bin/python -m bench.idle_first_token [--requests 20]

Requests come one at a time, 0.3-0.7 s apart (a random phase of the other ranks' naps between idle headers);
each asks for one token. The pipeline's extra time over one rank is the hidden state's trip between the ranks,
plus, before rank 0 woke the others, up to a nap (0.49 s). Writes bench/out/idle_first_token.json.
"""

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import save
from tests.support.model_factory import make_tiny_model
from tests.support.runners import rank_specs, serving


def first_tokens(endpoint: str, requests: int) -> list[float]:
    pace, out = random.Random(5), []
    with httpx.Client(base_url=endpoint, timeout=60) as http:
        for _ in range(requests + 1):  # the first warms up
            time.sleep(pace.uniform(0.3, 0.7))
            started = time.perf_counter()
            with http.stream("POST", "/generate", json={"prompt": "The quick brown fox", "max_tokens": 1}) as r:
                for line in r.iter_lines():
                    if '"token"' in line:
                        out.append(time.perf_counter() - started)
                        break
    return out[1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "m", model_type="qwen2", num_layers=4, num_files=1)
        results = {}
        for name, specs in (("one rank", rank_specs([model], "single")),
                            ("2-rank pipeline", rank_specs([model, model], "pipeline", [2, 2]))):  # fmt: skip
            with serving(specs, work, name.replace(" ", "-")) as served:
                times = first_tokens(served.endpoint, args.requests)
            results[name] = {"median_ms": statistics.median(times) * 1e3, "max_ms": max(times) * 1e3}
        one, two = results["one rank"], results["2-rank pipeline"]
        results["pipeline extra median ms"] = two["median_ms"] - one["median_ms"]
        print(f"idle first token: one rank {one['median_ms']:.1f} ms (max {one['max_ms']:.1f}), 2-rank pipeline "
              f"{two['median_ms']:.1f} ms (max {two['max_ms']:.1f}): the pipeline adds "
              f"{results['pipeline extra median ms']:.1f} ms")  # fmt: skip
        save(Path(__file__).parent / "out" / "idle_first_token.json", results)


if __name__ == "__main__":
    main()
