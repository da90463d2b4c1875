"""download_model: a model's files (all, or one layer range's) onto this node, with progress and resume."""

import asyncio
import contextlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
from huggingface_hub import HfApi, RepoFile, hf_hub_download
from temporalio import activity

from activities.completion import intact, local_weight_map, read_completion, write_completion
from activities.delete import case_alias
from activities.errors import classify
from activities.hub import DEFAULT_TIMEOUT_S, bound_hub_calls, hub_env
from shardline import contracts
from shardline.contracts import implements
from shardline.errors import RETRYABLE, ErrorType, error
from shardline.ids import InvalidId, check_model_id
from shardline.model_files import INDEX_FILE, files_to_fetch, model_path, record_completion
from shardline.types import DownloadProgress, DownloadRequest, DownloadResult

log = structlog.get_logger(__name__)
DISK_MARGIN = 64 * 2**20


@dataclass
class Plan:
    files: dict[str, int]  # path in repo -> size in bytes: what this request needs
    commit: str
    repo: dict[str, int]  # what a download of the whole model needs


def plan_download(req: DownloadRequest, dest: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> Plan:
    """Ask the hub which files exist and which of them this request needs (blocking; each call bounded)."""
    hub = HfApi()
    info = hub.model_info(req.model_id, revision=req.revision or "main", timeout=timeout_s)
    tree = hub.list_repo_tree(req.model_id, revision=info.sha, recursive=True)
    sizes = {f.path: f.size for f in tree if isinstance(f, RepoFile)}
    weight_map = None
    if req.layers is not None and INDEX_FILE in sizes:
        index = hf_hub_download(req.model_id, INDEX_FILE, revision=info.sha, local_dir=dest, etag_timeout=timeout_s)
        weight_map = json.loads(Path(index).read_text())["weight_map"]
    wanted = files_to_fetch(sizes, weight_map, req.layers)
    repo = {f: sizes[f] for f in files_to_fetch(sizes, None, None)}
    return Plan(files={f: sizes[f] for f in wanted}, commit=info.sha or "", repo=repo)


def plan_from_disk(req: DownloadRequest, dest: Path) -> Plan | None:
    """The plan the completion marker answers without the hub: only when every file the request needs is
    recorded complete and still on disk at its size (the hub is unreachable; what is here is enough)."""
    done = read_completion(dest)
    if done is None or req.revision not in (None, done.commit):
        return None
    needed = done.needed(local_weight_map(dest) if req.layers is not None else None, req.layers)
    if not needed or any(done.complete.get(name) != size for name, size in needed.items()):
        return None
    return Plan(files=needed, commit=done.commit, repo=done.repo) if intact(dest, needed) else None


def already_complete(dest: Path, plan: Plan) -> bool:
    """Every file of the plan was recorded complete at this commit and is still on disk: nothing to fetch."""
    done = read_completion(dest)
    if done is None or done.commit != plan.commit:
        return False
    return all(done.complete.get(name) == size for name, size in plan.files.items()) and intact(dest, plan.files)


def bytes_on_disk(dest: Path, files: dict[str, int]) -> tuple[int, int]:
    """(bytes, complete files) present for the plan, counting huggingface_hub's in-flight partials
    (named by hash, not by file, so they count towards the whole)."""
    done, complete = 0, 0
    for name, size in files.items():
        path = dest / name
        if path.is_file() and path.stat().st_size == size:
            done, complete = done + size, complete + 1
    partials = dest / ".cache" / "huggingface" / "download"
    in_flight = sum(size_of(p) for p in partials.glob("**/*.incomplete")) if partials.is_dir() else 0
    return min(done + in_flight, sum(files.values())), complete


def size_of(partial: Path) -> int:
    """A partial's size; 0 once the fetch has renamed it to its file (between the glob and here: CI saw the
    FileNotFoundError fail a download's attempt, whose retry then counted only the last 501 bytes as fetched)."""
    try:
        return partial.stat().st_size
    except FileNotFoundError:
        return 0


class DownloadActivities:
    def __init__(self, models_dir: Path, max_concurrent: int = 4, hub_timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._models_dir = models_dir
        self._slots = asyncio.Semaphore(max_concurrent)
        self._hub_timeout_s = hub_timeout_s
        bound_hub_calls(hub_timeout_s)

    @implements(contracts.download_model)
    async def download_model(self, req: DownloadRequest) -> DownloadResult:
        try:
            check_model_id(req.model_id)
        except InvalidId as exc:
            raise error(ErrorType.BAD_INPUT, str(exc)) from exc
        info = activity.info()
        log.info(  # each attempt is its own activity (the workflow retries), so this marks each one
            "download.accepted",
            model_id=req.model_id,
            workflow_id=info.workflow_id,
            since_scheduled_s=round(time.time() - info.current_attempt_scheduled_time.timestamp(), 2),
        )
        await self._take_slot()
        try:
            return await self._download(req)
        finally:
            self._slots.release()

    async def _take_slot(self) -> None:
        """Wait for a free transfer slot, heartbeating: a queued download is alive, and cancelable."""
        waiter = asyncio.ensure_future(self._slots.acquire())
        try:
            while not waiter.done():
                activity.heartbeat(DownloadProgress(phase="queued"))
                await asyncio.wait({waiter}, timeout=1.0)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._slots.release()
            waiter.cancel()
            raise

    async def _download(self, req: DownloadRequest) -> DownloadResult:
        dest = model_path(self._models_dir, req.model_id)
        alias = await asyncio.to_thread(case_alias, self._models_dir, req.model_id)
        if alias is not None:  # on a case-insensitive disk the two would share (and mix) one directory
            why = f"this node already holds {alias}, which differs only by case; use {alias}"
            raise error(ErrorType.CONFLICT, f"refusing to download {req.model_id}: {why}")
        logger = log.bind(model_id=req.model_id, workflow_id=activity.info().workflow_id)
        activity.heartbeat(DownloadProgress(phase="listing"))
        dest.mkdir(parents=True, exist_ok=True)
        try:
            plan = await asyncio.to_thread(plan_download, req, dest, self._hub_timeout_s)
        except Exception as exc:
            kind, message = classify(exc, req.model_id)
            offline = await asyncio.to_thread(plan_from_disk, req, dest) if kind in RETRYABLE else None
            if offline is None:
                raise error(kind, message) from exc
            logger.warning("download.hub_unreachable", reason=message, files=len(offline.files))
            return self._result(req, dest, offline, 0, 0.0)
        total = sum(plan.files.values())
        if await asyncio.to_thread(already_complete, dest, plan):
            logger.info("download.already_complete", files=len(plan.files), bytes_total=total)
            return self._result(req, dest, plan, 0, 0.0)
        start_bytes, _ = bytes_on_disk(dest, plan.files)
        free = shutil.disk_usage(dest).free
        if total - start_bytes + DISK_MARGIN > free:
            raise error(
                ErrorType.DISK_FULL,
                f"disk full: {req.model_id} needs {total - start_bytes} more bytes, {free} free",
            )
        logger.info(
            "download.start",
            files=len(plan.files),
            bytes_total=total,
            bytes_present=start_bytes,
        )
        started = time.monotonic()
        await self._fetch(req, plan, dest, start_bytes, started)
        # record exactly what this request completed: a layer range never reads as the whole model
        done = record_completion(read_completion(dest), req.model_id, plan.commit, plan.repo, plan.files)
        await asyncio.to_thread(write_completion, dest, done)
        seconds = time.monotonic() - started
        logger.info("download.done", seconds=round(seconds, 2), bytes_fetched=total - start_bytes, full_model=done.full)
        return self._result(req, dest, plan, total - start_bytes, seconds)

    @staticmethod
    def _result(req: DownloadRequest, dest: Path, plan: Plan, fetched: int, seconds: float) -> DownloadResult:
        return DownloadResult(req.model_id, str(dest), sorted(plan.files), sum(plan.files.values()), fetched, seconds)

    async def _fetch(
        self,
        req: DownloadRequest,
        plan: Plan,
        dest: Path,
        start_bytes: int,
        started: float,
    ) -> None:
        spec = {"repo_id": req.model_id, "revision": plan.commit or req.revision, "local_dir": str(dest),
                "files": sorted(plan.files), "timeout_s": self._hub_timeout_s}  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "activities.fetch",
            stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=hub_env(self._hub_timeout_s),
        )  # fmt: skip
        assert proc.stdin and proc.stderr
        proc.stdin.write(json.dumps(spec).encode())
        proc.stdin.close()
        stderr = asyncio.create_task(proc.stderr.read())
        try:
            while proc.returncode is None:
                self._report(dest, plan, start_bytes, started)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), timeout=1.0)
        finally:
            if proc.returncode is None:  # canceled, or the worker is shutting down
                proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            raise error(*child_failure(await stderr, req.model_id))

    def _report(self, dest: Path, plan: Plan, start_bytes: int, started: float) -> None:
        done, complete = bytes_on_disk(dest, plan.files)
        total = sum(plan.files.values())
        rate = (done - start_bytes) / max(time.monotonic() - started, 1e-3)
        eta = (total - done) / rate if rate > 0 else None
        activity.heartbeat(DownloadProgress("downloading", done, total, complete, len(plan.files), rate, eta))


def child_failure(stderr: bytes, model_id: str) -> tuple[ErrorType, str]:
    """The (kind, sentence) the fetch child printed last, or a transient failure if it died silently."""
    for line in reversed(stderr.decode(errors="replace").splitlines()):
        with contextlib.suppress(ValueError, KeyError):
            report = json.loads(line)
            return ErrorType(report["kind"]), report["message"]
    return (
        ErrorType.TRANSIENT,
        f"fetching {model_id} stopped unexpectedly: {stderr.decode(errors='replace')[-300:]}",
    )
