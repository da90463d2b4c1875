"""`shardline`: run the pieces of a cluster, and drive it through the HTTP API."""

import asyncio
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from shardline.discovery import DiscoveryError, lan_settings
from shardline.ids import InvalidId, parse_workflow_id
from shardline.lifeline import hold
from shardline.logs import configure_logging
from shardline.settings import Settings
from shardline.states import InstanceState, Kind, WorkState
from shardline.temporal import TemporalConfigError

app = typer.Typer(
    no_args_is_help=True,
    help="One LLM across several machines; cluster state in Temporal.",
)
console = Console()
FINAL = {WorkState.COMPLETED, WorkState.FAILED, WorkState.CANCELED, WorkState.TERMINATED}
STOP_TIMEOUT_S = 120  # DELETE /instances waits up to a minute for every runner to stop
API_STOP_S = 1.5  # requests still open (a long stream) are cut this long after SIGTERM: `up` stops within 3 s
API_KEEP_ALIVE_S = 75  # longer than any client here leaves a connection idle between requests (the dashboard: 2 s)


def settings_and_logs(**bound: str) -> Settings:
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json, **bound)
    return settings


# --- processes ---------------------------------------------------------------------------------


ParentPid = Annotated[
    int | None, typer.Option("--parent-pid", hidden=True, help="Exit when this process (`shardline up`) does")
]


def run_piece(main: Callable[[], object], parent_pid: int | None) -> NoReturn:
    """Run a long-lived piece, then leave without interpreter finalization: the Temporal SDK's Rust threads
    can still call into Python then (a late RPC result), which aborts the process with `Fatal Python error:
    PyGILState_Release`. Everything worth keeping (Temporal state, logs) is out by the time `main` returns."""
    if parent_pid is not None:
        hold(parent_pid)
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except (TemporalConfigError, DiscoveryError) as err:  # a setting that cannot work: say which, no traceback
        console.print(f"[red]{err}[/red]")
        code = 2
    except BaseException:  # noqa: BLE001 - reported here, since the process ends here
        traceback.print_exc()
        code = 1
    exit_now(code)


def exit_now(code: int) -> NoReturn:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@app.command()
def control(parent_pid: ParentPid = None) -> None:
    """Run the control worker (every workflow)."""
    from workers.control import run_control

    run_piece(lambda: asyncio.run(run_control(settings_and_logs(process="control"))), parent_pid)


@app.command()
def node(parent_pid: ParentPid = None) -> None:
    """Run this machine's node worker."""
    from workers.node import run_node

    run_piece(lambda: asyncio.run(run_node(settings_and_logs(process="node"))), parent_pid)


@app.command()
def api(parent_pid: ParentPid = None) -> None:
    """Run the HTTP API."""
    run_piece(run_api, parent_pid)


def run_api() -> None:
    import uvicorn

    from api.app import create_app

    settings = settings_and_logs(process="api")
    # uvicorn raises the signal it stopped on again once it is done; this makes that a no-op, so a
    # SIGTERM stop ends with status 0 rather than death by SIGTERM
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        timeout_graceful_shutdown=API_STOP_S,
        # uvicorn's 5 s default closes idle connections while browsers may still send on them: a POST that
        # meets the close fails ("Failed to fetch") and browsers do not resend a POST
        timeout_keep_alive=API_KEEP_ALIVE_S,
    )


@app.command()
def up(
    lan: Annotated[
        bool,
        typer.Option("--lan", help="Serve Temporal (no auth), its UI, the API, runners on the LAN; advertise by mDNS"),
    ] = False,
) -> None:
    """Everything on this machine: Temporal (unless SHARDLINE_TEMPORAL_ADDRESS), control, node, API."""
    from shardline.supervisor import run_all

    def main() -> None:
        settings = settings_and_logs(process="up")
        sys.exit(run_all(lan_settings(settings) if lan or settings.lan else settings))

    run_piece(main, None)


# --- client commands (through the HTTP API) ----------------------------------------------------


def call(method: str, path: str, timeout: float = 60, **kwargs: Any) -> Any:
    settings = Settings()
    headers = {"Authorization": f"Bearer {settings.api_key.get_secret_value()}"} if settings.api_key else {}
    try:
        response = httpx.request(method, settings.api_base + path, headers=headers, timeout=timeout, **kwargs)
    except httpx.TransportError as exc:
        console.print(
            f"[red]cannot reach the shardline API at {settings.api_base}: {exc}[/red] (is `shardline up` running?)"
        )
        raise typer.Exit(2) from exc
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        console.print(f"[red]error {response.status_code}:[/red] {message}")
        raise typer.Exit(1)
    return response.json()


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f} GiB"


def size(n: int) -> str:
    """Bytes as a person reads them: GiB, or MiB below one GiB (a small model is not "0.0 GiB")."""
    return gib(n) if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@app.command()
def nodes(departed: bool = False) -> None:
    """The nodes of the cluster."""
    table = Table("node", "state", "host", "backend", "memory free / total", "disk free", "models")
    for n in call("GET", "/nodes", params={"departed": departed}):
        mem = f"{gib(n['memory_available'])} / {gib(n['memory_total'])}"
        table.add_row(
            n["node_id"],
            n["state"],
            n.get("host") or "-",
            n["backend"] or "-",
            mem,
            gib(n["disk_free"]),
            ", ".join([*n["models"], *(partial(p) for p in n.get("partial_models") or [])]),
        )
    console.print(table)


def partial(model: dict[str, Any]) -> str:
    """`org/m [0, 2) [4, 6)`: a model of which the node holds only these layers."""
    return f"{model['model']} " + " ".join(f"[{start}, {end})" for start, end in model["layers"])


@app.command()
def download(
    model: str,
    node_id: Annotated[str | None, typer.Option("--node", help="Node id (default: every online node)")] = None,
    revision: str | None = None,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until done")] = False,
) -> None:
    """Download MODEL onto one node, or onto every online node."""
    started = call(
        "POST",
        "/downloads",
        json={"model": model, "node_id": node_id, "revision": revision},
    )
    for workflow_id in started["workflow_ids"]:
        console.print(f"started {workflow_id}")
    if wait:
        failed = [wid for wid in started["workflow_ids"] if watch_download(wid) != WorkState.COMPLETED]
        if failed:
            raise typer.Exit(1)


def watch_download(workflow_id: str) -> str:
    columns = (
        "{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(workflow_id, total=None)
        while True:
            d = call("GET", f"/downloads/{workflow_id}")
            if d["progress"]:
                bar.update(
                    task,
                    completed=d["progress"]["bytes_done"],
                    total=d["progress"]["bytes_total"] or None,
                )
            if d["state"] in FINAL:
                break
            time.sleep(1)
    console.print(f"{workflow_id}: {d['state']}" + (f" - {d['reason']}" if d.get("reason") else ""))
    return str(d["state"])


@app.command()
def downloads(
    node_id: Annotated[str | None, typer.Option("--node")] = None,
    model: str | None = None,
) -> None:
    """Every download workflow, newest first."""
    table = Table("workflow id", "state", "started")
    for d in call(
        "GET",
        "/downloads",
        params={k: v for k, v in {"node": node_id, "model": model}.items() if v},
    ):
        table.add_row(d["workflow_id"], d["state"], d["started_at"] or "")
    console.print(table)


@app.command()
def delete(
    model: str,
    node_id: Annotated[str, typer.Option("--node", help="Node id")],
    force: Annotated[bool, typer.Option("--force", help="Delete even while a download or instance uses it")] = False,
) -> None:
    """Delete MODEL's files from a node (refused while a running download or instance uses them there)."""
    done = call("DELETE", f"/nodes/{node_id}/models/{model}", params={"force": "true"} if force else None)
    console.print(f"{done['workflow_id']}: {done['state']}")


@app.command()
def cancel(workflow_id: str) -> None:
    """Cancel a workflow by its id: a download (download:NODE:MODEL), a delete (delete:NODE:MODEL), a node's
    presence (node:NODE), or stop a serving instance (serve:INSTANCE)."""
    try:
        kind, parts = parse_workflow_id(workflow_id)
    except InvalidId as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from err
    if kind == Kind.DOWNLOAD:
        done = call("DELETE", f"/downloads/{workflow_id}")
    elif kind == Kind.SERVE:
        done = call("DELETE", f"/instances/{parts[0]}", timeout=STOP_TIMEOUT_S)
    else:
        done = call("DELETE", f"/workflows/{workflow_id}")
    console.print(f"{workflow_id}: {done['state']}")


@app.command()
def serve(
    model: str,
    nodes: Annotated[
        str | None, typer.Option("--nodes", help="Comma-separated node ids (default: all with room)")
    ] = None,
    strategy: Annotated[
        str, typer.Option("--strategy", help="auto (what the model supports and fits), pipeline or tensor")
    ] = "auto",
    wait: Annotated[bool, typer.Option("--wait", help="Wait until it is ready")] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Only show where it would go (nodes, layers, bytes), or why it does not fit"),
    ] = False,
    draft_tokens: Annotated[
        int, typer.Option("--draft-tokens", help="Speculative decoding: draft tokens a step (0 = off)")
    ] = 0,
    draft_model: Annotated[
        str | None,
        typer.Option("--draft-model", help="Drafts by this small model (same tokenizer) instead of prompt lookup"),
    ] = None,
) -> None:
    """Serve MODEL across the cluster."""
    pinned = [n.strip() for n in nodes.split(",")] if nodes else None
    body: dict[str, Any] = {"model": model, "nodes": pinned, "strategy": strategy}
    if draft_tokens or draft_model:
        method = {"method": "draft_model", "draft_model": draft_model} if draft_model else {}
        body["speculative"] = {**method, "num_draft_tokens": draft_tokens or 4}
    if dry_run:
        show_preview(call("POST", "/instances/preview", json=body))
        return
    started = call("POST", "/instances", json=body)
    console.print(f"started {started['workflow_id']}")
    if wait:
        with console.status(f"{started['instance_id']}: placing") as spinner:
            while True:
                current = call("GET", f"/instances/{started['instance_id']}")
                spinner.update(f"{current['instance_id']}: {current['state']}")
                if current["state"] in (InstanceState.READY, InstanceState.FAILED, InstanceState.STOPPED):
                    break
                time.sleep(1)
        console.print(
            f"{current['instance_id']}: {current['state']}" + (f" - {current['reason']}" if current["reason"] else "")
        )
        if current.get("strategy_reason"):
            console.print(f"strategy {current['strategy']} - {current['strategy_reason']}")
        if current["state"] != InstanceState.READY:
            raise typer.Exit(1)


def show_preview(preview: dict[str, Any]) -> None:
    """Where a serve would go: one row per rank, then the strategy and why."""
    table = Table("rank", "node", "layers", "holds")
    for s in preview["shards"]:
        table.add_row(str(s["rank"]), s["node_id"], f"{s['layers'][0]}-{s['layers'][1] - 1}", size(s["bytes"]))
    console.print(table)
    console.print(f"{preview['model']} ({size(preview['total_bytes'])}) fits: strategy {preview['strategy']} - "
                  f"{preview['reason']}")  # fmt: skip


@app.command()
def instances() -> None:
    """Served model instances and where their layers are."""
    table = Table("instance", "model", "state", "strategy", "shards (node: layers)")
    for i in call("GET", "/instances"):
        shards = ", ".join(f"{s['node_id']}: {s['layers'][0]}-{s['layers'][1] - 1}" for s in i["shards"])
        why = i.get("strategy_reason")
        table.add_row(i["instance_id"], i["model"], i["state"], i["strategy"] + (f"\n[dim]{why}[/dim]" if why else ""),
                      shards)  # fmt: skip
    console.print(table)


@app.command()
def stop(instance: str) -> None:
    """Stop a served instance: every runner stops and frees its memory."""
    done = call("DELETE", f"/instances/{instance}", timeout=STOP_TIMEOUT_S)
    console.print(f"{done['instance_id']}: {done['state']}")


@app.command()
def chat(
    model: str,
    prompt: str,
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 256,
    temperature: Annotated[float, typer.Option("--temperature")] = 0.0,
) -> None:
    """Ask MODEL one question; the answer streams to the terminal."""
    settings = Settings()
    headers = {"Authorization": f"Bearer {settings.api_key.get_secret_value()}"} if settings.api_key else {}
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "temperature": temperature}  # fmt: skip
    with httpx.stream(
        "POST", f"{settings.api_base}/v1/chat/completions", json=body, headers=headers, timeout=None
    ) as r:
        if r.status_code != 200:
            r.read()
            console.print(f"[red]error {r.status_code}:[/red] {r.json()['error']['message']}")
            raise typer.Exit(1)
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"]
                if delta and delta[0]["delta"].get("content"):
                    sys.stdout.write(delta[0]["delta"]["content"])
                    sys.stdout.flush()
    sys.stdout.write("\n")


def main() -> None:
    # Ctrl-C in a client command: exit quietly, like other CLIs
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    try:
        app()
    except (TemporalConfigError, DiscoveryError) as err:  # a setting that cannot work: say which, no traceback
        console.print(f"[red]{err}[/red]")
        sys.exit(2)
