"""Start one rank (join the ring, load its shard) and run it: rank 0 serves HTTP, the others follow."""

import json
import signal
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from queue import Queue
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import structlog
from mlx_lm.tokenizer_utils import TokenizerWrapper

from shardline.engine import protocol, wake
from shardline.engine.batch import Batch
from shardline.engine.drafter import Drafter, DraftModel, PromptLookup, load_draft_model
from shardline.engine.generation import Job, Scheduler, follow
from shardline.engine.loading import ModelRefused, init_group, load_shard, parameter_bytes, refused
from shardline.engine.pipeline import trimmable
from shardline.engine.prefix_cache import PrefixIndex
from shardline.engine.server import Limits, bind, create_app, start_http
from shardline.engine.spec import RunnerSpec
from shardline.logs import configure_logging

log = structlog.get_logger(__name__)
Report = Callable[[dict], None]


class Rank:
    def __init__(self, spec_path: str) -> None:
        """Raises whatever keeps this rank from serving: bad spec, port taken, missing files, out of memory;
        ModelRefused when it is the model itself MLX or mlx-lm cannot run."""
        self.spec = RunnerSpec.read(Path(spec_path))
        configure_logging(rank=str(self.spec.rank))
        log.info("runner.loading", model=self.spec.model_path, strategy=self.spec.strategy)
        self.sock = bind(self.spec.http_host, self.spec.http_port) if self.spec.rank == 0 else None
        with tempfile.TemporaryDirectory(prefix="shardline-ring-") as workdir:
            self.group = init_group(self.spec, Path(workdir))
        # where the ranks wait for each other without spinning (wake.py), and the others are woken when idle
        hosts, rank = self.spec.hosts, self.spec.rank
        self.alarm = wake.listen(hosts[rank]) if self.group is not None else None
        # every rank has just joined the ring: a first barrier tells at once whether UDP goes between them (a
        # firewall may pass the ring's TCP only); where it does not, the ranks wait in the ring, spinning
        meets = wake.barrier(self.alarm, hosts, rank, 0, limit_s=wake.PROBE_S)
        if self.group is not None and not meets:
            log.warning("runner.no_barrier", reason="no UDP between the ranks: they wait for each other spinning")
        met = self.alarm if meets else None
        self.model, self.tokenizer = load_shard(
            self.spec, self.group, loaded=lambda: wake.barrier(met, hosts, rank, 1)
        )  # warmed up
        drafter = make_drafter(self.spec, self.tokenizer, self.group)  # before the others hear rank 0 has loaded
        if self.group is not None:
            wake.barrier(met, hosts, rank, 2)
            protocol.share(self.group, [1] if rank == 0 else None, 1)  # every rank has loaded
        if rank == 0 and self.alarm is not None:
            self.alarm.close()  # rank 0 is never woken
            self.alarm = None
        self.batch = Batch(self.model, self.tokenizer, prefill_step=PREFILL_STEP,
                           draft_max_batch=self.spec.draft_max_batch, drafter=drafter,
                           overlap=self.spec.overlap)  # fmt: skip

    def run(self, report: Report) -> None:
        """Until rank 0 is told to stop (SIGTERM/SIGINT); raises when the ring breaks."""
        self.batch.report = report
        try:
            if self.sock is not None:
                self.serve(self.sock, report)
            else:
                report(ready_event(self.spec.rank, self.model, None))
                try:
                    follow(self.batch, self.group, self.alarm)
                finally:
                    if self.alarm is not None:
                        self.alarm.close()
        finally:
            self.batch.close()  # the prefix cache's memory goes with the instance
        log.info("runner.stopped")

    def serve(self, sock: socket.socket, report: Report) -> None:
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        spec = self.spec
        index = PrefixIndex(spec.prompt_cache_bytes, trimmable(self.model)) if spec.prompt_cache_bytes else None
        jobs: Queue[Job] = Queue()
        waker = wake.Waker(spec.hosts) if self.group is not None else None
        scheduler = Scheduler(
            self.batch, self.tokenizer, self.group, jobs, max_batch=spec.max_batch, index=index,
            scale=cache_scale(spec), wake=waker or (lambda: None),
        )  # fmt: skip
        limits = Limits(
            context_length(Path(spec.model_path)), spec.max_queue, spec.secret, spec.max_batch, spec.draft_tokens
        )
        http = start_http(
            create_app(self.tokenizer, jobs, limits, lambda: stats(scheduler) | {"context": limits.context}), sock
        )
        host, port = sock.getsockname()[:2]
        endpoint = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        report(ready_event(0, self.model, endpoint) | {"context": limits.context})
        log.info("runner.ready", endpoint=endpoint, max_batch=spec.max_batch, cache_bytes=spec.prompt_cache_bytes)
        try:
            scheduler.serve(stop)
        finally:
            if waker is not None:
                waker.close()
        http.should_exit = True


PREFILL_STEP = 512  # prompt tokens per forward pass: a long prompt lets the others decode this often


def make_drafter(spec: RunnerSpec, tokenizer: TokenizerWrapper, group: mx.distributed.Group | None) -> Drafter:
    """Where this instance's drafts come from; ModelRefused when its draft model cannot draft for the model."""
    if spec.draft_method != "draft_model":
        return PromptLookup()
    if not spec.draft_model_path:  # a rank past 0: it receives rank 0's drafts
        return DraftModel(None, group, PREFILL_STEP)
    try:
        model = load_draft_model(Path(spec.draft_model_path), tokenizer)
    except Exception as error:
        if refused(error, distributed=False):
            raise ModelRefused(f"draft model: {error}") from error
        raise
    log.info("runner.draft_model", path=spec.draft_model_path, bytes=parameter_bytes(model))
    return DraftModel(model, group, PREFILL_STEP)


def ready_event(rank: int, model: nn.Module, endpoint: str | None) -> dict:
    return {"event": "ready", "rank": rank, "endpoint": endpoint, "memory_bytes": parameter_bytes(model)}


def context_length(model_dir: Path) -> int | None:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def cache_scale(spec: RunnerSpec) -> float:
    """Rank 0 budgets the prefix cache for the rank holding the most layers (pipeline ranks differ)."""
    if spec.strategy != "pipeline":
        return 1.0
    return max(spec.splits) / spec.splits[0]


def stats(scheduler: Scheduler) -> dict[str, Any]:
    index = scheduler.index
    cache = {"cache_entries": 0, "cache_bytes": 0, "cache_hits": 0, "cache_lookups": 0, "cached_tokens": 0}
    if index is not None:
        cache = {
            "cache_entries": len(index), "cache_bytes": index.nbytes, "cache_hits": index.hits,
            "cache_lookups": index.lookups, "cached_tokens": index.cached_tokens,
        }  # fmt: skip
    tally = scheduler.batch.tally
    drafts = {"draft_tokens": tally.drafted, "accepted_draft_tokens": tally.accepted}
    batch = {"overlapped_steps": scheduler.batch.overlapped, "max_batch": scheduler.max_batch}
    return {**asdict(scheduler.stats), **cache, **drafts, **batch}
