"""Serving speed: shardline (1 node, 2-node pipeline) vs plain mlx_lm and the bare 2-rank pipeline, same run.

    .venv/bin/python -m bench.speed [--size 100m] [--dtype bfloat16] [--max-tokens 64] [--runs 2]

Rows (each: a warm-up request, then --runs timed ones, greedy, the same chat prompt):
  mlx_lm            stream_generate in one process (a child, so it can also run with OpenBLAS preloaded)
  mlx_lm+openblas   the same with LD_PRELOAD of cmeel-openblas (what runners get when its probe passes)
  mlx_lm-f32[+openblas]  weights cast to float32, the one dtype whose matmuls MLX hands to BLAS (sgemm)
  shardline-1       /v1/chat/completions (SSE) of a 1-node instance; `-direct` = its runner's /generate
  shardline-2       the same for a 2-node pipeline instance
  runner-2          two `python -m shardline.engine.runner` processes with shardline's splits, no cluster
  mlx_lm-2          mlx_lm's own pipeline (sharded_load, even split, stream_generate) in two processes
TTFT = request sent -> first token; decode tok/s = (tokens - 1) / (last token - first token), wall clock.
Prints a table, ratios and the machine's figures, and writes bench/out/speed.json.
"""

import argparse
import asyncio
import contextlib
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
from temporalio.client import Client

from activities.runner import blas_works, optimized_blas, runner_env
from bench.common import cluster_logs, cluster_on_mirror, machine, save, start_node, wait_for
from shardline.engine.runner import command as runner_command
from shardline.engine.spec import RunnerSpec, pipeline_layers
from tests.support.hub_mirror import publish_model
from tests.support.model_factory import make_tiny_model
from tests.support.processes import REPO, Cluster, free_port, stop_process
from workflows.client import instance_status

REPO_ID = "bench-org/serve-model"
OUT = Path(__file__).resolve().parent / "out" / "speed.json"
MESSAGES = [{"role": "user", "content": "Tell me about the quiet river that runs past the old mill at night."}]
SIZES: dict[str, dict[str, int]] = {  # qwen2, vocab 4096, untied head
    "8m": {"num_layers": 4, "hidden_size": 256, "intermediate_size": 704, "num_heads": 4, "num_kv_heads": 2},
    # issue 18's size: compute, not overhead, decides (SmolLM2-135M's shape)
    "576x12": {"num_layers": 12, "hidden_size": 576, "intermediate_size": 1536, "num_heads": 9, "num_kv_heads": 3},
    "30m": {"num_layers": 8, "hidden_size": 512, "intermediate_size": 1408, "num_heads": 8, "num_kv_heads": 4},
    "100m": {"num_layers": 16, "hidden_size": 768, "intermediate_size": 2048, "num_heads": 12, "num_kv_heads": 4},
    "150m": {"num_layers": 12, "hidden_size": 1024, "intermediate_size": 2816, "num_heads": 16, "num_kv_heads": 4},
    "200m": {"num_layers": 16, "hidden_size": 1024, "intermediate_size": 2816, "num_heads": 16, "num_kv_heads": 4},
}
OPENBLAS = Path(sysconfig.get_paths()["purelib"]) / "cmeel.prefix" / "lib" / "libopenblas.so.0"
MARK = "BENCH "  # prefix of the result lines children print
READY_TIMEOUT = 900.0
SETTLE_S = 600.0  # before each timed request (or child), wait this long at most for other work to leave the machine
Run = dict[str, Any]


# --- the model -------------------------------------------------------------------------------


def make_model(dest: Path, size: str, dtype: str) -> Path:
    """The factory writes float16; MLX's CPU float16 matmuls are far slower than bfloat16, so cast."""
    model_dir = make_tiny_model(dest, model_type="qwen2", vocab_size=4096, num_files=4, **SIZES[size])
    if dtype != "float16":
        import mlx.core as mx  # only here: the bench itself needs MLX for nothing else

        total = 0
        for path in sorted(model_dir.glob("model*.safetensors")):
            loaded: dict[str, mx.array] = mx.load(str(path))  # type: ignore[assignment]
            arrays = {k: v.astype(getattr(mx, dtype)) for k, v in loaded.items()}
            mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})
            total += sum(a.nbytes for a in arrays.values())
        for name, key, value in (("config.json", "torch_dtype", dtype), ("model.safetensors.index.json", "", total)):
            data = json.loads((model_dir / name).read_text())
            data.update({key: value} if key else {"metadata": {"total_size": value}})
            (model_dir / name).write_text(json.dumps(data, indent=2))
    return model_dir


def model_figures(model_dir: Path, size: str, dtype: str) -> dict[str, Any]:
    total = json.loads((model_dir / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    itemsize = 4 if dtype == "float32" else 2
    return {"repo_id": REPO_ID, "size": size, "dtype": dtype, "bytes": total, "params_m": total / itemsize / 1e6,
            **SIZES[size]}  # fmt: skip


# --- children: plain mlx_lm, in one process or two (pipeline) ----------------------------------


def child(kind: str, model_dir: str, max_tokens: int, runs: int, cast: str) -> None:
    """A warm-up and `runs` timed generations (weights cast to `cast` unless "-"); rank 0 prints a MARK line each."""
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.utils import sharded_load

    if kind == "child-pipeline":
        group = mx.distributed.init(backend="ring", strict=True)
        model, tokenizer = sharded_load(model_dir, pipeline_group=group)
        rank, layers = group.rank(), [model.model.start_idx, model.model.end_idx]
    else:
        model, tokenizer = load(model_dir)[:2]
        rank, layers = 0, None
    if cast != "-":
        model.set_dtype(getattr(mx, cast))
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    for i in range(runs + 1):
        started, times, final = time.perf_counter(), [], None
        for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(0.0)):
            times.append(time.perf_counter())
            final = response
        if rank == 0 and i > 0 and final is not None:
            own = {"prompt_tps": final.prompt_tps, "generation_tps": final.generation_tps}
            run = {**timing(started, times[0], times[-1], len(times)), **own, "layers": layers}
            print(MARK + json.dumps(run), flush=True)
    if kind == "child-pipeline":  # generate_step leaves one step in flight: a rank that exits now breaks its peer
        mx.synchronize()
        mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))


def collect(command: list[str], env: dict[str, str], timeout: float) -> tuple[list[Run], int, str]:
    """The MARK lines a child printed, its exit code and the tail of its stderr; the child's group dies after."""
    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    runs = [json.loads(line[len(MARK) :]) for line in out.splitlines() if line.startswith(MARK)]
    return runs, proc.returncode, err.strip()[-400:]


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def time_mlx_lm(model_dir: Path, max_tokens: int, runs: int, preload: str | None, cast: str = "-") -> dict[str, Any]:
    env = child_env(LD_PRELOAD=preload) if preload else child_env()
    command = [sys.executable, "-m", "bench.speed", "child-mlx-lm", str(model_dir), str(max_tokens), str(runs), cast]
    settle(SETTLE_S)
    snap = busy()
    results, code, err = collect(command, env, timeout=1800)
    results = [{**r, "foreign_cores": foreign(snap, busy())} for r in results]
    crash = None if code == 0 else f"exit {code}" + (f" ({signal.Signals(-code).name})" if code < 0 else "")
    return {"runs": results, "crashed": crash, "stderr_tail": err if crash else ""}


def time_pipeline(root: Path, model_dir: Path, max_tokens: int, runs: int) -> dict[str, Any]:
    """mlx_lm's own pipeline in two processes, started the way mlx.launch starts them (MLX_RANK, MLX_HOSTFILE).
    Not mlx.launch itself: its I/O loop selects on each child's always-writable stdin and so spins a core."""
    root.mkdir(parents=True, exist_ok=True)
    hostfile = root / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(2)]))
    command = [sys.executable, "-m", "bench.speed", "child-pipeline", str(model_dir), str(max_tokens), str(runs), "-"]
    env = child_env(MLX_HOSTFILE=str(hostfile))
    settle(SETTLE_S)
    snap = busy()
    with open(root / "rank1.log", "ab") as log:
        peer = subprocess.Popen(command, env={**env, "MLX_RANK": "1"}, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=log, start_new_session=True)  # fmt: skip
    try:
        results, code, err = collect(command, {**env, "MLX_RANK": "0"}, timeout=1800)
        with contextlib.suppress(subprocess.TimeoutExpired):
            peer.wait(30)
    finally:
        if peer.poll() is None:
            os.killpg(peer.pid, signal.SIGKILL)
            peer.wait()
    results = [{**r, "foreign_cores": foreign(snap, busy())} for r in results]
    crash = None if code == peer.returncode == 0 and len(results) == runs else f"exit {code} and {peer.returncode}"
    return {"runs": results, "crashed": crash, "stderr_tail": err if crash else "",
            "total_s": busy()[0] - snap[0]}  # fmt: skip


# --- HTTP clients: the API's SSE and a runner's NDJSON ----------------------------------------


def timing(started: float, first: float, last: float, tokens: int) -> Run:
    return {"ttft_s": first - started, "decode_tps": (tokens - 1) / (last - first) if tokens > 1 else 0.0,
            "tokens": tokens, "seconds": last - started}  # fmt: skip


def time_chat(api: str, max_tokens: int) -> Run:
    body = {"model": REPO_ID, "messages": MESSAGES, "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    first = last = 0.0
    usage: dict[str, int] = {}
    started = time.perf_counter()
    with httpx.stream("POST", f"{api}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line.removeprefix("data: "))
            usage = event.get("usage") or usage
            choice = event["choices"][0] if event["choices"] else {}
            if choice.get("delta", {}).get("content") and not first:
                first = time.perf_counter()
            if choice.get("finish_reason"):  # sent right after the last token's text
                last = time.perf_counter()
    return timing(started, first, last, usage["completion_tokens"])


def time_generate(endpoint: str, max_tokens: int, secret: str = "") -> Run:
    body = {"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0}
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    times: list[float] = []
    started = time.perf_counter()
    with httpx.stream("POST", f"{endpoint}/generate", json=body, headers=headers, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if '"token"' in line:
                times.append(time.perf_counter())
    return timing(started, times[0], times[-1], len(times))


def cpu_seconds(procs: dict[str, psutil.Process]) -> dict[str, float]:
    seconds = {}
    for name, proc in procs.items():
        try:
            t = proc.cpu_times()
            seconds[name] = t.user + t.system
        except psutil.Error:
            seconds[name] = 0.0
    return seconds


Snapshot = tuple[float, float, float]


def busy() -> Snapshot:
    """(now, CPU seconds the machine has been busy, CPU seconds of this bench and every process under it)."""
    t = psutil.cpu_times()
    machine_s = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    me, own = psutil.Process(), 0.0
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            c = proc.cpu_times()
            own += c.user + c.system + c.children_user + c.children_system
    return time.perf_counter(), machine_s, own


def foreign(before: Snapshot, after: Snapshot) -> float:
    """Cores busy outside this bench between two snapshots: other work sharing the machine."""
    return round(max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]), 2)


def settle(limit: float, quiet: float = 0.2, window: float = 3.0) -> float:
    """Wait (at most `limit` s) until other work leaves the machine: under `quiet` cores for `window` s."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        snap = busy()
        time.sleep(window)
        if foreign(snap, busy()) < quiet:
            break
    return time.perf_counter() - started


def warm_up(request: Callable[[], Run], attempts: int = 3) -> list[str]:
    """One untimed request; the errors of failed attempts (a retry waits out the API's 1 s instance cache)."""
    errors: list[str] = []
    while True:
        try:
            request()
            return errors
        except httpx.HTTPError as error:
            errors.append(f"{type(error).__name__}: {error}")
            if len(errors) == attempts:
                raise
            time.sleep(1.5)


def measure(request: Callable[[], Run], runs: int, watch: dict[str, psutil.Process]) -> list[Run]:
    """`runs` timed requests; each records the cores every watched process used meanwhile."""
    results = []
    for _ in range(runs):
        settle(SETTLE_S)
        before, snap = cpu_seconds(watch), busy()
        run = request()
        after, end = cpu_seconds(watch), busy()
        cores = {n: round((after[n] - before[n]) / (end[0] - snap[0]), 2) for n in watch}
        results.append({**run, "cores": cores, "foreign_cores": foreign(snap, end)})
    return results


# --- shardline ---------------------------------------------------------------------------------


def start_instance(api: str, nodes: list[str]) -> dict[str, Any]:
    """POST /instances pinned to `nodes`; the instance once ready, with `ready_s` since the POST."""
    started = time.perf_counter()
    response = httpx.post(f"{api}/instances", json={"model": REPO_ID, "strategy": "pipeline", "nodes": nodes},
                          timeout=30)  # fmt: skip
    response.raise_for_status()
    instance_id = response.json()["instance_id"]

    def probe() -> dict[str, Any] | None:
        body: dict[str, Any] = httpx.get(f"{api}/instances/{instance_id}", timeout=30).json()
        if body["state"] == "failed":
            raise RuntimeError(f"instance failed: {body.get('reason')}")
        return body if body["state"] == "ready" else None

    instance = wait_for(probe, READY_TIMEOUT, f"{instance_id} ready")
    return {**instance, "ready_s": time.perf_counter() - started}


def runner_secret(cluster: Cluster, instance_id: str) -> str:
    """What the API sends rank 0's runner: only the serving workflow's status (Temporal access) tells it."""

    async def query() -> str:
        client = await Client.connect(cluster.address)
        return (await instance_status(client, instance_id)).secret

    return asyncio.run(query())


def runner_procs(cluster: Cluster) -> dict[str, psutil.Process]:
    """Every long-lived process of the cluster, and the MLX runners under the node workers."""
    procs = {name: psutil.Process(p.pid) for name, p in cluster.procs.items()}
    for name in [n for n in procs if n.startswith("node-")]:
        for i, kid in enumerate(procs[name].children(recursive=True)):
            procs[f"{name}/runner{i}"] = kid
    return procs


def time_shardline(cluster: Cluster, nodes: list[str], max_tokens: int, runs: int) -> dict[str, Any]:
    instance = start_instance(cluster.api, nodes)
    watch = runner_procs(cluster)
    try:
        warmup_errors = warm_up(lambda: time_chat(cluster.api, max_tokens))
        api_runs = measure(lambda: time_chat(cluster.api, max_tokens), runs, watch)
        secret = runner_secret(cluster, instance["instance_id"])
        direct = measure(lambda: time_generate(instance["endpoint"], max_tokens, secret), runs, watch)
    finally:
        httpx.delete(f"{cluster.api}/instances/{instance['instance_id']}", timeout=90)
    shards = sorted(instance["shards"], key=lambda s: s["rank"])
    splits = [s["layers"][1] - s["layers"][0] for s in shards]
    return {"api": api_runs, "direct": direct, "ready_s": instance["ready_s"], "splits": splits,
            "warmup_errors": warmup_errors}  # fmt: skip


# --- the same pipeline without shardline: the engine's runners alone ------------------------


def read_event(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if readable else b""
    if not line:
        raise RuntimeError(f"runner {proc.pid} said nothing within {timeout} s (exit {proc.poll()})")
    event: dict[str, Any] = json.loads(line)
    if event.get("event") != "ready":
        raise RuntimeError(f"runner {proc.pid}: {event}")
    return event


def stop_procs(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:  # rank 0 first: SIGTERM to it stops every rank
        stop_process(proc)


def start_runners(
    root: Path, model_dir: Path, splits: list[int], overlap: bool = True
) -> tuple[list[subprocess.Popen[bytes]], str]:
    """Runner processes of one instance, no cluster: one holding the whole model (`splits` of one rank) or a
    pipeline with shardline's split; the processes and rank 0's endpoint once it is ready."""
    root.mkdir(parents=True, exist_ok=True)
    hosts = [f"127.0.0.1:{free_port()}" for _ in splits] if len(splits) > 1 else []
    env = {**runner_env("auto"), "PYTHONPATH": str(REPO)}  # the BLAS a node would give its runners
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for rank in range(len(splits)):
            spec = RunnerSpec(str(model_dir))
            if len(splits) > 1:
                spec = RunnerSpec(str(model_dir), "pipeline", rank, len(splits), pipeline_layers(splits, rank),
                                  splits, hosts, overlap=overlap)  # fmt: skip
            spec_path = root / f"rank{rank}.json"
            spec_path.write_text(spec.to_json())
            command = runner_command(str(spec_path))
            with open(root / f"rank{rank}.log", "ab") as log:
                procs.append(subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=log))
        return procs, read_event(procs[0], READY_TIMEOUT)["endpoint"]
    except Exception:
        stop_procs(procs)
        raise


def time_runners(root: Path, model_dir: Path, splits: list[int], max_tokens: int, runs: int) -> dict[str, Any]:
    started = time.perf_counter()
    procs, endpoint = start_runners(root, model_dir, splits)
    try:
        ready_s = time.perf_counter() - started
        watch = {f"rank{i}": psutil.Process(p.pid) for i, p in enumerate(procs)}
        warm_up(lambda: time_generate(endpoint, max_tokens), attempts=1)
        return {"runs": measure(lambda: time_generate(endpoint, max_tokens), runs, watch), "ready_s": ready_s}
    finally:
        stop_procs(procs)


# --- summary -----------------------------------------------------------------------------------


def median(runs: list[Run], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(rows: dict[str, list[Run]]) -> dict[str, Any]:
    med = {name: {k: median(runs, k) for k in ("ttft_s", "decode_tps", "prompt_tps", "generation_tps", "foreign_cores")}
           for name, runs in rows.items() if runs}  # fmt: skip

    def ratio(a: str, b: str, key: str, key_b: str = "") -> float | None:
        x, y = med.get(a, {}).get(key), med.get(b, {}).get(key_b or key)
        return x / y if x and y else None

    ratios = {
        "shardline-1 decode / mlx_lm decode": ratio("shardline-1", "mlx_lm", "decode_tps"),
        "shardline-1 decode / mlx_lm generation_tps": ratio("shardline-1", "mlx_lm", "decode_tps", "generation_tps"),
        "shardline-1 TTFT / mlx_lm TTFT": ratio("shardline-1", "mlx_lm", "ttft_s"),
        "shardline-2 decode / runner-2 decode": ratio("shardline-2", "runner-2", "decode_tps"),
        "shardline-2 TTFT / runner-2 TTFT": ratio("shardline-2", "runner-2", "ttft_s"),
        "shardline-2 decode / mlx_lm-2 decode": ratio("shardline-2", "mlx_lm-2", "decode_tps"),
        "shardline-2 TTFT / mlx_lm-2 TTFT": ratio("shardline-2", "mlx_lm-2", "ttft_s"),
        "runner-2 decode / mlx_lm-2 decode": ratio("runner-2", "mlx_lm-2", "decode_tps"),
        "shardline-2 decode / shardline-1 decode": ratio("shardline-2", "shardline-1", "decode_tps"),
        "mlx_lm+openblas decode / mlx_lm decode": ratio("mlx_lm+openblas", "mlx_lm", "decode_tps"),
        "mlx_lm-f32+openblas decode / mlx_lm-f32 decode": ratio("mlx_lm-f32+openblas", "mlx_lm-f32", "decode_tps"),
    }
    deltas = {
        "API+SSE, 1 node (shardline-1 - shardline-1-direct)": ("shardline-1", "shardline-1-direct"),
        "runner, 1 node (shardline-1-direct - mlx_lm)": ("shardline-1-direct", "mlx_lm"),
        "API+SSE, 2 nodes (shardline-2 - shardline-2-direct)": ("shardline-2", "shardline-2-direct"),
        "cluster, 2 nodes (shardline-2-direct - runner-2)": ("shardline-2-direct", "runner-2"),
        "engine, 2 ranks (runner-2 - mlx_lm-2)": ("runner-2", "mlx_lm-2"),
    }
    ttft_ms = {}
    for k, (a, b) in deltas.items():
        x, y = med.get(a, {}).get("ttft_s"), med.get(b, {}).get("ttft_s")
        if x is not None and y is not None:
            ttft_ms[k] = (x - y) * 1000
    return {"medians": med, "ratios": ratios, "ttft_delta_ms": ttft_ms}


def fmt(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def report(data: dict[str, Any]) -> None:
    m, model = data["machine"], data["model"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GiB RAM, Python {m['python']}")
    print(
        f"model: qwen2 {model['params_m']:.0f}M params, {model['dtype']}, {model['num_layers']} layers, "
        f"hidden {model['hidden_size']}; max_tokens {data['max_tokens']}, {data['runs_per_row']} runs/row"
    )
    print(
        f"runner BLAS: {data['blas']['runner_blas'] or 'reference (the wheel)'}; "
        f"OpenBLAS probe: {'works' if data['blas']['probe_works'] else 'fails'}"
    )
    columns = (("TTFT ms", "ttft_s", ".0f", 1000), ("decode/s", "decode_tps", ".2f", 1),
               ("mlx p/s", "prompt_tps", ".1f", 1), ("mlx g/s", "generation_tps", ".2f", 1),
               ("other", "foreign_cores", ".2f", 1))  # fmt: skip
    head = " ".join(f"{title:>8}" for title, *_ in columns)
    print(f"\n{'row':<20} {head}  per run: TTFT ms / decode/s  [cores used, last run]")
    for name, runs in data["rows"].items():
        med = data["summary"]["medians"].get(name)
        if not med:
            print(f"{name:<20} crashed: {data['problems'].get(name)}")
            continue
        cells = " ".join(f"{fmt(med[key] * scale if med[key] is not None else None, spec):>8}"
                         for _, key, spec, scale in columns)  # fmt: skip
        each = "  ".join(f"{r['ttft_s'] * 1000:.0f}/{r['decode_tps']:.2f}" for r in runs)
        cores = "; ".join(f"{k} {v}" for k, v in (runs[-1].get("cores") or {}).items() if v >= 0.05)
        print(f"{name:<20} {cells}  {each}" + (f"  [{cores}]" if cores else ""))
    print("\nratios (medians):")
    for k, v in data["summary"]["ratios"].items():
        print(f"  {k:<45} {fmt(v, '.3f')}")
    print("TTFT differences (medians):")
    for k, v in data["summary"]["ttft_delta_ms"].items():
        print(f"  {k:<55} {v:+.0f} ms")
    print("start-up: " + ", ".join(f"{k} {v:.1f} s" for k, v in data["ready_s"].items()))
    print(f"splits: shardline {data['splits']}, mlx_lm-2 rank 0 layers {data['mlx_lm_2_layers']}")
    for name, err in data["problems"].items():
        tail = data["stderr"].get(name, "")[-200:]
        print(f"problem: {name}: {err}" + (f": {tail!r}" if tail else ""))


def log_tails(paths: list[Path], chars: int = 1500) -> None:
    for path in paths:
        print(f"--- {path.name}:\n{path.read_text(errors='replace')[-chars:]}", file=sys.stderr)


# --- the run -----------------------------------------------------------------------------------


def bench(root: Path, size: str, dtype: str, max_tokens: int, runs: int) -> dict[str, Any]:
    model_dir = make_model(root / "src", size, dtype)
    publish_model(model_dir, root / "mirrors", REPO_ID)
    rows: dict[str, list[Run]] = {}
    problems: dict[str, str] = {}
    stderr: dict[str, str] = {}
    ready: dict[str, float] = {}

    def child_row(name: str, result: dict[str, Any]) -> None:
        rows[name] = result["runs"]
        if result["crashed"]:
            problems[name], stderr[name] = result["crashed"], result["stderr_tail"]
        print(f"{name}: {len(result['runs'])} runs" + (f", crashed: {result['crashed']}" if result["crashed"] else ""),
              flush=True)  # fmt: skip

    child_row("mlx_lm", time_mlx_lm(model_dir, max_tokens, runs, None))
    blas = {"library": str(OPENBLAS), "probe_works": OPENBLAS.exists() and blas_works(str(OPENBLAS)),
            "runner_blas": optimized_blas("auto")}  # fmt: skip
    if OPENBLAS.exists():  # MLX's CPU matmul calls BLAS (sgemm) for float32 only: half floats never reach it
        child_row("mlx_lm+openblas", time_mlx_lm(model_dir, max_tokens, runs, str(OPENBLAS)))
        child_row("mlx_lm-f32", time_mlx_lm(model_dir, max_tokens, runs, None, "float32"))
        child_row("mlx_lm-f32+openblas", time_mlx_lm(model_dir, max_tokens, runs, str(OPENBLAS), "float32"))
    try:
        with cluster_on_mirror(root) as cluster:
            nodes = [f"n{uuid.uuid4().hex[:6]}" for _ in range(2)]
            start_node(cluster, nodes[0])
            for n in (1, 2):
                if n == 2:
                    start_node(cluster, nodes[1])
                result = time_shardline(cluster, nodes[:n], max_tokens, runs)
                rows[f"shardline-{n}"], rows[f"shardline-{n}-direct"] = result["api"], result["direct"]
                ready[f"shardline-{n} POST->ready"], splits = result["ready_s"], result["splits"]
                if result["warmup_errors"]:
                    problems[f"shardline-{n} warm-up"] = "; ".join(result["warmup_errors"])
                print(f"shardline-{n}: ready in {result['ready_s']:.1f} s, splits {splits}", flush=True)
    except Exception:
        log_tails(cluster_logs(root))
        raise
    runner = time_runners(root / "runners", model_dir, splits, max_tokens, runs)
    rows["runner-2"], ready["runner-2 start->ready"] = runner["runs"], runner["ready_s"]
    print(f"runner-2: ready in {runner['ready_s']:.1f} s", flush=True)
    pipe = time_pipeline(root / "pipeline", model_dir, max_tokens, runs)
    child_row("mlx_lm-2", pipe)
    ready["mlx_lm-2 whole run"] = pipe["total_s"]
    return {
        "machine": machine(),
        "model": model_figures(model_dir, size, dtype),
        "max_tokens": max_tokens,
        "runs_per_row": runs,
        "prompt": MESSAGES,
        "blas": blas,
        "rows": rows,
        "problems": problems,
        "stderr": stderr,
        "ready_s": ready,
        "splits": splits,
        "mlx_lm_2_layers": pipe["runs"][0]["layers"] if pipe["runs"] else None,
        "summary": summarize(rows),
    }


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] in ("child-mlx-lm", "child-pipeline"):
        child(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="100m")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks stop every process
    with tempfile.TemporaryDirectory(prefix="shardline-bench-") as tmp:
        data = bench(Path(tmp), args.size, args.dtype, args.max_tokens, args.runs)
    report(data)
    save(OUT, data)


if __name__ == "__main__":
    main()
