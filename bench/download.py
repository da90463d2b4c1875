"""shardline download vs bare `snapshot_download`: same olah mirror, same model, same run.

    .venv/bin/python -m bench.download [--size-mb 600] [--runs 2]

Prints a table (and bench/out/download.json) with bytes, seconds and MB/s of each run, the ratio
shardline MB/s ÷ bare MB/s (medians), where shardline's time goes, and the machine's figures.
"""

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from huggingface_hub import snapshot_download
from huggingface_hub.utils import disable_progress_bars
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from bench.common import machine, save, start_cluster, start_node
from shardline.settings import Settings
from shardline.temporal import connect
from tests.support.hub_mirror import HubMirror, publish_model
from tests.support.model_factory import make_bench_model
from tests.support.processes import Cluster

REPO_ID = "bench-org/bench-model"
OUT = Path(__file__).resolve().parent / "out" / "download.json"
MB = 10**6


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)


def olah_requests(mirror: HubMirror, offset: int) -> tuple[dict[str, int], int]:
    """Requests olah logged since `offset` (by method), and the new offset."""
    with mirror.log_path.open("rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    methods = Counter(re.findall(r'"(GET|HEAD|POST) /', text))
    return dict(methods), offset + len(text.encode())


def time_bare(mirror: HubMirror, dest: Path) -> dict[str, Any]:
    started = time.monotonic()
    snapshot_download(REPO_ID, revision="main", local_dir=dest, endpoint=mirror.endpoint)
    seconds = time.monotonic() - started
    return {"bytes": dir_bytes(dest), "seconds": seconds}


async def time_shardline(api: httpx.AsyncClient, client: Client, node_id: str) -> dict[str, Any]:
    posted_at = time.time()
    started = time.monotonic()
    response = await api.post("/downloads", json={"model": REPO_ID, "node_id": node_id})
    response.raise_for_status()
    (workflow_id,) = response.json()["workflow_ids"]
    handle = client.get_workflow_handle(workflow_id)
    run_id = (await handle.describe()).run_id  # this run, not an earlier one of the same id
    while True:
        body = (await api.get(f"/downloads/{workflow_id}")).json()
        if body["state"] in {"completed", "failed", "canceled", "terminated"}:
            break
        await asyncio.sleep(0.1)
    seconds = time.monotonic() - started
    if body["state"] != "completed":
        raise RuntimeError(f"download ended {body['state']}: {body.get('reason')}")
    result = body["result"]
    return {
        "bytes": result["bytes_fetched"],
        "seconds": seconds,
        "activity_seconds": result["seconds"],
        "phases": await phases(client.get_workflow_handle(workflow_id, run_id=run_id), posted_at, result["seconds"]),
    }


async def phases(handle: Any, posted_at: float, fetch_s: float) -> dict[str, float]:
    """Seconds between the history's milestones; `listing` is the activity's time before its fetch."""
    times: dict[str, float] = {}
    async for event in handle.fetch_history_events():
        name = EventType.Name(event.event_type).removeprefix("EVENT_TYPE_").lower()
        times.setdefault(name, event.event_time.ToDatetime().timestamp())
    start, sched = times["workflow_execution_started"], times["activity_task_scheduled"]
    picked, done = times["activity_task_started"], times["activity_task_completed"]
    return {
        "post_to_workflow_start": start - posted_at,
        "start_to_activity_scheduled": sched - start,
        "scheduled_to_picked_up": picked - sched,
        "activity_listing": done - picked - fetch_s,
        "activity_fetch (result.seconds)": fetch_s,
        "activity_done_to_workflow_closed": times["workflow_execution_completed"] - done,
    }


def child_import_seconds() -> float:
    """What the fetch child pays before its first request: interpreter start + huggingface_hub import."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "from huggingface_hub import snapshot_download"], check=True)
    return time.monotonic() - started


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for kind in ("bare", "shardline"):
        mine = [r for r in runs if r["kind"] == kind]
        summary[kind] = {
            "median_seconds": statistics.median(r["seconds"] for r in mine),
            "median_mb_s": statistics.median(r["mb_s"] for r in mine),
        }
    summary["ratio_shardline_over_bare"] = summary["shardline"]["median_mb_s"] / summary["bare"]["median_mb_s"]
    return summary


def report(data: dict[str, Any]) -> None:
    m = data["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GiB RAM, Python {m['python']}")
    print(f"model: {data['model']['repo_id']}, {data['model']['bytes'] / MB:.1f} MB in {data['model']['files']} files")
    print(f"\n{'#':>2} {'kind':<10} {'bytes':>12} {'seconds':>8} {'MB/s':>8} {'act. s':>7}  olah requests")
    for i, r in enumerate(data["runs"], 1):
        act = f"{r['activity_seconds']:7.2f}" if "activity_seconds" in r else " " * 7
        print(f"{i:>2} {r['kind']:<10} {r['bytes']:>12} {r['seconds']:>8.2f} {r['mb_s']:>8.1f} {act}  {r['olah']}")
    s = data["summary"]
    for kind in ("bare", "shardline"):
        print(f"median {kind:<10} {s[kind]['median_seconds']:.2f} s  {s[kind]['median_mb_s']:.1f} MB/s")
    print(f"ratio shardline/bare MB/s (medians): {s['ratio_shardline_over_bare']:.3f}")
    print(f"fetch child: interpreter + huggingface_hub import {data['child_import_s']:.2f} s")
    for i, r in enumerate(data["runs"], 1):
        if "phases" in r:
            print(f"shardline run {i} phases: " + ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items()))


async def bench(root: Path, size_mb: int, runs: int) -> dict[str, Any]:
    model_dir = make_bench_model(root / "src", size_mb)
    publish_model(model_dir, root / "mirrors", REPO_ID)
    mirror = HubMirror(root / "mirrors", root / "olah")
    cluster: Cluster | None = None
    try:
        mirror.start()
        cluster = await asyncio.to_thread(start_cluster, root / "cluster", mirror.endpoint)
        node_id = f"n{uuid.uuid4().hex[:8]}"
        home = await asyncio.to_thread(start_node, cluster, node_id)
        client = await connect(Settings(temporal_address=cluster.address), wait_s=30)
        order = [kind for i in range(runs) for kind in (("bare", "shardline") if i % 2 == 0 else ("shardline", "bare"))]
        results: list[dict[str, Any]] = []
        offset = mirror.log_path.stat().st_size
        async with httpx.AsyncClient(base_url=cluster.api, timeout=60) as api:
            for kind in order:
                bare_dir, node_dir = root / "bare", home / "models" / REPO_ID
                shutil.rmtree(bare_dir, ignore_errors=True)
                shutil.rmtree(node_dir, ignore_errors=True)
                if kind == "bare":
                    run = await asyncio.to_thread(time_bare, mirror, bare_dir)
                else:
                    run = await time_shardline(api, client, node_id)
                run["olah"], offset = olah_requests(mirror, offset)
                results.append({"kind": kind, **run, "mb_s": run["bytes"] / MB / run["seconds"]})
                print(f"{kind}: {run['seconds']:.2f} s", flush=True)
        files = [p for p in model_dir.iterdir() if p.is_file()]
        return {
            "machine": machine(),
            "model": {"repo_id": REPO_ID, "bytes": sum(p.stat().st_size for p in files), "files": len(files)},
            "runs": results,
            "summary": summarize(results),
            "child_import_s": child_import_seconds(),
        }
    finally:
        if cluster is not None:
            cluster.stop_all()
        mirror.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=600)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    disable_progress_bars()  # as in the fetch child (HF_HUB_DISABLE_PROGRESS_BARS)
    with tempfile.TemporaryDirectory(prefix="shardline-bench-") as tmp:
        data = asyncio.run(bench(Path(tmp), args.size_mb, args.runs))
    report(data)
    save(OUT, data)


if __name__ == "__main__":
    main()
