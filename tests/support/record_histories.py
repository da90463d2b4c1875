"""Record the workflow histories a release produces, for tests/unit/test_upgrade_replay.py to replay against
every later release: what a running cluster holds at the moment of an upgrade.

Run it against the checkout of the release (its own code runs the cluster: dev server, control worker, API,
node workers as processes, a hub mirror on loopback, as in tests/conftest.py), from any checkout that has
this file (the venv must have the release's dependencies installed):

    git worktree add /tmp/release <commit>
    .venv/bin/python -m tests.support.record_histories --checkout /tmp/release --out tests/histories/<commit>

It drives each scenario below the way a user (or a failure) would, then exports each workflow run as the JSON
`temporal workflow show -o json` writes (`WorkflowHistory.to_json()`), plus manifest.json (per file: workflow
id, run, type, how it ended, the scenario). The dev server suggests continue-as-new after
SUGGEST_CONTINUE_AS_NEW events, so a few presence cycles of a node or one recovery of an instance already take
the continue-as-new path a week-long node takes. Takes 3-5 minutes on 2 cores.
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from temporalio.client import Client

from shardline.ids import delete_workflow_id, download_workflow_id, node_workflow_id, serve_workflow_id
from shardline.settings import Settings
from shardline.temporal import connect, devserver_command
from tests.support.hub_mirror import HubMirror, publish_model
from tests.support.model_factory import make_tiny_model
from tests.support.processes import REPO, Cluster, free_port
from tests.support.relay import Relay
from tests.support.serving import start_instance, wait_state
from tests.support.waits import (
    eventually,
    start_download,
    start_download_workflow,
    wait_download,
    wait_node,
    wait_progress,
)
from workflows.download import DownloadInput

TINY = "test-org/tiny"
QWEN = "test-org/qwen-tiny"  # qwen2: mlx-lm splits it into a pipeline
CHUNKY = "test-org/chunky"  # ~26 MB: behind the throttled link, slow enough to act mid-transfer
SUGGEST_CONTINUE_AS_NEW = 30  # events; Temporal's default is 4096
# heartbeat as in the tests but a node wait and a grace long enough for a killed node worker to come back
TIMEOUTS = {"SHARDLINE_HEARTBEAT_TIMEOUT": "4", "SHARDLINE_NODE_WAIT": "30", "SHARDLINE_NODE_GRACE": "30"}
SLOW = 2**20  # bytes/s while a scenario acts on a transfer in flight


@dataclass
class Recorded:
    name: str  # file stem; a workflow id with several runs gets .<n> per run, in start order
    workflow_id: str
    scenario: str


class RecordingCluster(Cluster):
    """The release's own cluster harness, with a dev server that suggests continue-as-new early."""

    def start_server(self) -> None:
        settings = Settings(home=self.root, temporal_port=self.temporal_port, ui_port=free_port())
        limit = f"limit.historyCount.suggestContinueAsNew={SUGGEST_CONTINUE_AS_NEW}"
        self.spawn("temporal", [*devserver_command(settings, headless=True), "--dynamic-config-value", limit])


async def node_lifecycle(cluster: Cluster, api: httpx.AsyncClient) -> list[Recorded]:
    """A node that boots, is killed and comes back twice (offline -> online, continuing as new on the way),
    then is killed for good and departs after the grace period."""
    node = "rec-life"
    cluster.start_node(node)
    await wait_node(api, node, "online", timeout=60)
    for _ in range(2):
        cluster.signal(f"node-{node}", signal.SIGKILL)
        await wait_node(api, node, "offline", timeout=30)
        cluster.start_node(node)
        await wait_node(api, node, "online", timeout=60)
    await asyncio.sleep(5)  # a few presence reports while online
    cluster.signal(f"node-{node}", signal.SIGKILL)
    await wait_node(api, node, "departed", timeout=90)
    return [Recorded("node_long_lived", node_workflow_id(node), "online, killed and back twice, killed: departed")]


async def downloads(cluster: Cluster, client: Client, api: httpx.AsyncClient, slow: Relay) -> list[Recorded]:
    """A download that completes, a delete of it, one for a node that never comes (fails), one canceled
    mid-transfer, and one whose node is killed mid-transfer and restarted (retried, then completed)."""
    plain, throttled, retried = "rec-dl", "rec-cancel", "rec-retry"
    cluster.start_node(plain)
    cluster.start_node(throttled, hub=slow.endpoint)
    cluster.start_node(retried, hub=slow.endpoint)
    for node in (plain, throttled, retried):
        await wait_node(api, node, "online", timeout=60)

    done = await wait_download(api, await start_download(api, TINY, plain))
    assert done["state"] == "completed", done
    deleted = (await api.delete(f"/nodes/{plain}/models/{TINY}")).json()
    assert deleted["state"] == "completed", deleted

    ghost = DownloadInput("rec-ghost", TINY, node_wait_s=6, heartbeat_timeout_s=4)  # behind the API's check
    failed = await wait_download(api, (await start_download_workflow(client, ghost)).id)
    assert failed["state"] == "failed" and "unavailable" in failed["reason"], failed

    with slow.capped(SLOW):
        canceled_id = await start_download(api, CHUNKY, throttled)
        retried_id = await start_download(api, CHUNKY, retried)
        await wait_progress(api, canceled_id)
        assert (await api.delete(f"/downloads/{canceled_id}")).status_code in (200, 202)
        canceled = await wait_download(api, canceled_id, timeout=30)
        assert canceled["state"] == "canceled", canceled

        await wait_progress(api, retried_id, files_done=1, timeout=90)
        cluster.signal(f"node-{retried}", signal.SIGKILL)
        cluster.start_node(retried, hub=slow.endpoint)  # same id, same data dir: resumes
    completed = await wait_download(api, retried_id, timeout=180)
    assert completed["state"] == "completed", completed
    await wait_node(api, retried, "online", timeout=60)
    return [
        Recorded("download_completed", download_workflow_id(plain, TINY), "a whole model onto an online node"),
        Recorded("delete_completed", delete_workflow_id(plain, TINY), "the model just downloaded, deleted"),
        Recorded(
            "download_failed", download_workflow_id("rec-ghost", TINY), "a node that never picks it up: unavailable"
        ),
        Recorded("download_canceled", download_workflow_id(throttled, CHUNKY), "canceled mid-transfer"),
        Recorded("download_retried", download_workflow_id(retried, CHUNKY), "node killed mid-transfer, back: retried"),
        Recorded("node_restarted", node_workflow_id(retried), "killed and back at once; still running"),
        Recorded("node_running", node_workflow_id(plain), "online the whole time; still running"),
    ]


async def serve_healed(cluster: Cluster, api: httpx.AsyncClient) -> list[Recorded]:
    """An instance on two nodes; one is killed, the instance heals on the other, then is stopped."""
    nodes = ["rec-s0", "rec-s1"]
    for node in nodes:
        cluster.start_node(node)
    for node in nodes:
        await wait_node(api, node, "online", timeout=60)
    instance = await start_instance(api, QWEN, nodes=nodes)
    ready = await wait_state(api, instance, {"ready", "failed"}, timeout=180)
    assert ready["state"] == "ready", ready
    cluster.signal(f"node-{nodes[1]}", signal.SIGKILL)

    async def healed() -> dict[str, Any] | None:
        current: dict[str, Any] = (await api.get(f"/instances/{instance}")).json()
        return current if current["recoveries"] and current["state"] in ("ready", "failed") else None

    again = await eventually(healed, 180, f"{instance} heals")
    assert again["state"] == "ready", again
    stopped = (await api.delete(f"/instances/{instance}")).json()
    assert stopped["state"] == "stopped", stopped
    return [
        Recorded(
            "serve_healed", serve_workflow_id(instance), "node lost, re-placed on the other (continued as new), stopped"
        ),
        Recorded("serve_child_download", download_workflow_id(nodes[0], QWEN), "the instance's child downloads"),
    ]


async def export(client: Client, recorded: list[Recorded], out: Path, release: str) -> None:
    manifest: dict[str, Any] = {"release": release, "histories": {}}
    for rec in recorded:
        runs = [e async for e in client.list_workflows(f"WorkflowId = '{rec.workflow_id}'")]
        runs.sort(key=lambda e: e.start_time)
        assert runs, f"no run of {rec.workflow_id}"
        for n, run in enumerate(runs, 1):
            name = rec.name if len(runs) == 1 else f"{rec.name}.{n}"
            history = await client.get_workflow_handle(rec.workflow_id, run_id=run.run_id).fetch_history()
            (out / f"{name}.json").write_text(history.to_json())
            manifest["histories"][f"{name}.json"] = {
                "workflow_id": rec.workflow_id,
                "run_id": run.run_id,
                "type": run.workflow_type,
                "status": run.status.name if run.status else None,
                "events": len(history.events),
                "scenario": rec.scenario,
            }
            print(f"{name}.json: {manifest['histories'][f'{name}.json']}")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def make_hub(root: Path) -> HubMirror:
    mirrors = root / "mirrors"
    publish_model(make_tiny_model(root / "tiny", num_layers=4, num_files=3), mirrors, TINY)
    qwen = make_tiny_model(root / "qwen", model_type="qwen2", num_layers=6, num_files=4, seed=1)
    publish_model(qwen, mirrors, QWEN)
    chunky = make_tiny_model(root / "chunky", num_layers=4, hidden_size=512, intermediate_size=1536,
                             vocab_size=512, num_files=4)  # fmt: skip
    publish_model(chunky, mirrors, CHUNKY)
    return HubMirror(mirrors, root / "olah")


async def record(out: Path, root: Path, release: str) -> None:
    hub = make_hub(root / "hub")
    hub.start()
    slow = Relay(int(hub.endpoint.rsplit(":", 1)[1]), bytes_per_s=4 * 2**20).start()
    cluster = RecordingCluster(root / "cluster", hub.endpoint, **TIMEOUTS).start_all()
    try:
        client = await connect(Settings(temporal_address=cluster.address), wait_s=30)
        async with httpx.AsyncClient(base_url=cluster.api, timeout=60) as api:
            scenarios: list[Callable[[], Awaitable[list[Recorded]]]] = [
                lambda: node_lifecycle(cluster, api),
                lambda: downloads(cluster, client, api, slow),
                lambda: serve_healed(cluster, api),
            ]
            recorded = [r for rs in await asyncio.gather(*(s() for s in scenarios)) for r in rs]
            await asyncio.sleep(2)  # visibility catches up with the last closes
            await export(client, recorded, out, release)
    finally:
        cluster.stop_all()
        slow.stop()
        hub.stop()


def check_imports() -> None:
    """The code under test is the checkout's own, not that of the checkout this file came from."""
    import workflows.node

    for module in (sys.modules["shardline"], workflows.node):
        assert Path(str(module.__file__)).resolve().is_relative_to(REPO), f"{module.__name__} from {module.__file__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, help="the release's checkout (default: this one)")
    parser.add_argument("--out", type=Path, required=True, help="e.g. tests/histories/<commit>")
    args = parser.parse_args()
    out = args.out.resolve()
    if args.checkout and args.checkout.resolve() != REPO:
        # this file again, the checkout first on sys.path: every import, and every process, is the release's
        code = f"import runpy; runpy.run_path({str(Path(__file__).resolve())!r}, run_name='__main__')"
        env = {**os.environ, "PYTHONPATH": str(args.checkout.resolve())}
        argv = [sys.executable, "-c", code, "--out", str(out)]
        sys.exit(subprocess.run(argv, cwd=args.checkout, env=env, check=False).returncode)
    check_imports()
    git = ["git", "rev-parse", "--short", "HEAD"]
    release = subprocess.run(git, cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    print(f"recording with the code of {REPO} ({release}) into {out}")
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="shardline-histories-"))
    print(f"logs under {root / 'cluster' / 'logs'}")
    asyncio.run(record(out, root, release))
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
