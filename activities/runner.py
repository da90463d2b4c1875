"""run_shard: one rank of a served instance, in a runner subprocess that lives as long as this activity."""

import asyncio
import contextlib
import functools
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import psutil
import structlog
from temporalio import activity
from temporalio.client import Client

from activities.resources import CacheLedger
from activities.ring_wait import ring_wait_library
from shardline import contracts
from shardline.contracts import implements
from shardline.engine import runner
from shardline.engine.forkserver import Forked, ForkServer, ForkServerGone
from shardline.engine.spec import RunnerSpec
from shardline.errors import ErrorType, error
from shardline.model_files import model_path
from shardline.settings import Settings
from shardline.types import RunnerReady, ShardSpec
from workflows.serve import ServingWorkflow

log = structlog.get_logger(__name__)
TICK = 1.0  # seconds between heartbeats; cancellation reaches us only through one
DEFAULT_CACHE_CAP = 8 << 30


def prompt_cache_budget(setting: int | None) -> int:
    if setting is not None:
        return setting
    return min(psutil.virtual_memory().total // 8, DEFAULT_CACHE_CAP)


def runner_spec(spec: ShardSpec, model_dir: Path, settings: Settings) -> RunnerSpec:
    single = spec.world_size == 1
    draft_model = spec.draft_model if spec.rank == 0 else None
    return RunnerSpec(
        model_path=str(model_dir),
        strategy="single" if single else spec.strategy,
        rank=spec.rank,
        world_size=spec.world_size,
        layers=None if single or spec.strategy == "tensor" else spec.layers,
        splits=[] if single else spec.splits,
        hosts=[] if single else spec.hosts,
        http_host=settings.node_host or "127.0.0.1",  # workers.node sets it: the route to Temporal
        max_batch=settings.max_batch,
        max_queue=settings.max_queue,
        prompt_cache_bytes=prompt_cache_budget(settings.prompt_cache_bytes),
        secret=spec.secret,
        draft_tokens=spec.draft_tokens,
        draft_max_batch=spec.draft_max_batch,
        draft_method="draft_model" if spec.draft_model else "prompt_lookup",
        draft_model_path=str(model_path(settings.models_dir, draft_model)) if draft_model else "",
    )


def optimized_blas(choice: str) -> str | None:
    """The BLAS to preload into a runner: mlx's Linux CPU wheel ships the slow reference BLAS, and
    OpenBLAS (cmeel-openblas) measured about 2x decode and 10x prefill on some machines. 'auto' uses
    it if installed and if it works here (see blas_works)."""
    if choice == "reference" or sys.platform != "linux":
        return None
    if choice != "auto":
        return choice
    lib = Path(sysconfig.get_paths()["purelib"]) / "cmeel.prefix" / "lib" / "libopenblas.so.0"
    return str(lib) if lib.exists() and blas_works(str(lib)) else None


BLAS_PROBE = "import mlx.core as mx; a = mx.ones((64, 64)); print(int(mx.sum(a @ a).item()))"


@functools.cache
def blas_works(lib: str) -> bool:
    """Run one matmul with the library preloaded: a build for another CPU (cmeel's kernels need AVX-512
    on some versions) dies of SIGILL, and one missing libgfortran does not even start."""
    env = {**os.environ, "LD_PRELOAD": lib}
    try:
        probe = subprocess.run([sys.executable, "-c", BLAS_PROBE], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False
    works = probe.returncode == 0 and probe.stdout.strip() == str(64 * 64 * 64)
    log.info("runner.blas_probe", library=lib, works=works, returncode=probe.returncode)
    return works


def runner_env(blas: str, ring_wait: str = "poll") -> dict[str, str]:
    env = dict(os.environ)
    preload = [p for p in (optimized_blas(blas), ring_wait_library(ring_wait), env.get("LD_PRELOAD")) if p]
    if preload:
        env["LD_PRELOAD"] = " ".join(preload)
    return env


def log_tail(path: Path, chars: int = 600) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-chars:].strip()
    return ""


class ForkedProcess:
    """A runner from the fork server, as run_shard uses an asyncio subprocess."""

    def __init__(self, child: Forked, stdout: asyncio.StreamReader, transport: asyncio.BaseTransport) -> None:
        self._child = child
        self.pid = child.pid
        self.stdout = stdout
        self._transport = transport
        loop = asyncio.get_running_loop()
        self._exit: asyncio.Future[int] = loop.create_future()
        child.on_exit(lambda code: loop.call_soon_threadsafe(self._settle, code))

    @classmethod
    async def start(cls, server: ForkServer, spec_path: Path, stderr: int) -> "ForkedProcess":
        child = await asyncio.to_thread(server.start, [str(spec_path)], stderr)
        reader = asyncio.StreamReader()
        pipe = open(child.stdout_fd, "rb", buffering=0)  # noqa: ASYNC230, SIM115 - a pipe's fd; the transport owns it
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        return cls(child, reader, transport)

    def _settle(self, code: int) -> None:
        if not self._exit.done():
            self._exit.set_result(code)

    @property
    def returncode(self) -> int | None:
        return self._exit.result() if self._exit.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)  # wait_for's timeout must not cancel the exit itself

    def terminate(self) -> None:
        self._child.terminate()

    def kill(self) -> None:
        self._child.kill()

    def close(self) -> None:
        self._transport.close()


RunnerProcess = asyncio.subprocess.Process | ForkedProcess


class ShardActivities:
    def __init__(self, client: Client, settings: Settings, node_id: str, ledger: CacheLedger | None = None) -> None:
        self._client = client
        self._settings = settings
        self._node_id = node_id
        self._ledger = ledger or CacheLedger()
        self._forkserver: ForkServer | None = None
        self._fork = settings.runner_fork and sys.platform == "linux"

    async def _start_beating(self, spec_path: Path, runner_log: int) -> RunnerProcess:
        """Start the runner, heartbeating meanwhile: a node's first runner waits for the BLAS probe and the fork
        server's imports (seconds on a busy machine). A cancel meanwhile stops the runner once it has started."""
        start = asyncio.ensure_future(self._start_runner(spec_path, runner_log))
        try:
            while not start.done():
                activity.heartbeat("starting")
                await asyncio.wait({start}, timeout=TICK)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await stop_process(await start)
            raise
        return start.result()

    async def _start_runner(self, spec_path: Path, runner_log: int) -> RunnerProcess:
        """Forked from this node's fork server (started by the first runner, on the event loop's thread: the
        main one, which its lifeline follows), or a new `python -m shardline.engine.runner`."""
        env = await asyncio.to_thread(runner_env, self._settings.runner_blas, self._settings.runner_ring_wait)
        if self._fork:
            if self._forkserver is None:
                self._forkserver = ForkServer(env)
            try:
                return await ForkedProcess.start(self._forkserver, spec_path, runner_log)
            except ForkServerGone as exc:
                # one that had forked runners was killed: the next runner starts a new one; one that never could
                # (this system lacks what it needs, e.g. pidfds before Linux 5.3) is not started again
                self._fork = self._forkserver.started > 0
                log.warning("runner.forkserver_gone", error=str(exc), forking=self._fork)
                self._forkserver = None
        return await asyncio.create_subprocess_exec(
            *runner.command(str(spec_path)), stdout=asyncio.subprocess.PIPE, stderr=runner_log, env=env
        )

    @implements(contracts.run_shard)
    async def run_shard(self, spec: ShardSpec) -> None:
        info = activity.info()
        logger = log.bind(workflow_id=info.workflow_id, rank=spec.rank, generation=spec.generation)
        run_dir = self._settings.home / "runs" / spec.instance_id
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_path = run_dir / f"rank{spec.rank}-gen{spec.generation}.json"
        model_dir = model_path(self._settings.models_dir, spec.model_id)
        try:
            spec_path.touch(mode=0o600)  # it holds the instance's secret
            spec_path.write_text(runner_spec(spec, model_dir, self._settings).to_json())
        except ValueError as exc:
            raise error(ErrorType.BAD_INPUT, f"cannot run shard {spec.rank}: {exc}") from exc
        log_path = spec_path.with_suffix(".log")
        with open(log_path, "ab") as runner_log:  # noqa: ASYNC230 - a local append, instant
            proc = await self._start_beating(spec_path, runner_log.fileno())
        logger.info("runner.started", pid=proc.pid, forked=isinstance(proc, ForkedProcess))
        key = f"{spec.instance_id}/{spec.rank}/{spec.generation}"
        events: asyncio.Task[None] | None = None
        try:
            ready = await self._until_ready(proc, log_path)
            workflow = self._client.get_workflow_handle(info.workflow_id, run_id=info.workflow_run_id)
            report = RunnerReady(spec.instance_id, spec.rank, self._node_id, ready.get("endpoint"), spec.generation,
                                 int(ready.get("memory_bytes") or 0))  # fmt: skip
            await workflow.signal(ServingWorkflow.runner_ready, report)
            logger.info("runner.ready", endpoint=report.endpoint)
            events = asyncio.create_task(self._follow_events(proc, key))
            while proc.returncode is None:
                activity.heartbeat("serving")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), TICK)
            raise error(
                ErrorType.RUNNER_FAILED,
                f"runner {spec.rank} on {self._node_id} exited ({proc.returncode}): {log_tail(log_path)}",
            )
        finally:
            if events is not None:
                events.cancel()
            self._ledger.by_runner.pop(key, None)  # the cache's memory went with the runner
            await stop_process(proc)
            logger.info("runner.stopped", returncode=proc.returncode)

    async def _follow_events(self, proc: RunnerProcess, key: str) -> None:
        """Read what the runner reports while it serves (and so never let its stdout pipe fill)."""
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                event = json.loads(line)
                if event.get("event") == "stats":
                    self._ledger.by_runner[key] = int(event["cache_bytes"])

    async def _until_ready(self, proc: RunnerProcess, log_path: Path) -> dict[str, object]:
        assert proc.stdout is not None
        line_task = asyncio.ensure_future(proc.stdout.readline())
        deadline = time.monotonic() + self._settings.load_timeout
        while True:
            activity.heartbeat("loading")
            if time.monotonic() > deadline:  # e.g. a peer rank that never joins the ring
                line_task.cancel()
                raise error(
                    ErrorType.RUNNER_FAILED,
                    f"runner on {self._node_id} not ready within {self._settings.load_timeout:g} s",
                )
            done, _ = await asyncio.wait({line_task}, timeout=TICK)
            if not done:
                continue
            line = line_task.result()
            if not line:  # the runner died before saying anything
                await proc.wait()
                raise error(
                    ErrorType.RUNNER_FAILED, f"runner exited ({proc.returncode}) while loading: {log_tail(log_path)}"
                )
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "ready":
                    return dict(event)
                if event.get("event") == "error":
                    # a model MLX refuses fails its instance at once; anything else may go with a retry
                    kind = ErrorType.BAD_INPUT if event.get("refused") else ErrorType.RUNNER_FAILED
                    raise error(kind, f"runner on {self._node_id} cannot load: {event.get('message')}")
            line_task = asyncio.ensure_future(proc.stdout.readline())


async def stop_process(proc: RunnerProcess, grace: float = 5.0) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    if isinstance(proc, ForkedProcess):
        proc.close()
