"""Start one rank (join the ring, load its shard) and run it: rank 0 serves HTTP, the others follow."""

import signal
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from queue import Queue

import mlx.core as mx
import mlx.nn as nn
import structlog
from mlx_lm.tokenizer_utils import TokenizerWrapper

from shardline.engine import protocol
from shardline.engine.generation import Job, follow, serve
from shardline.engine.loading import init_group, load_shard, parameter_bytes
from shardline.engine.server import bind, create_app, start_http
from shardline.engine.spec import RunnerSpec
from shardline.logs import configure_logging

log = structlog.get_logger(__name__)
Report = Callable[[dict], None]


class Rank:
    def __init__(self, spec_path: str) -> None:
        """Raises whatever keeps this rank from serving: bad spec, port taken, missing files, out of memory."""
        self.spec = RunnerSpec.read(Path(spec_path))
        configure_logging(rank=str(self.spec.rank))
        log.info("runner.loading", model=self.spec.model_path, strategy=self.spec.strategy)
        self.sock = bind(self.spec.http_host, self.spec.http_port) if self.spec.rank == 0 else None
        with tempfile.TemporaryDirectory(prefix="shardline-ring-") as workdir:
            self.group = init_group(self.spec, Path(workdir))
        self.model, self.tokenizer = load_shard(self.spec, self.group)
        if self.group is not None:
            protocol.share(self.group, [1] if self.spec.rank == 0 else None, 1)  # every rank has loaded

    def run(self, report: Report) -> None:
        """Until rank 0 is told to stop (SIGTERM/SIGINT); raises when the ring breaks."""
        if self.sock is not None:
            serve_rank0(self.sock, self.group, self.model, self.tokenizer, report)
        else:
            report(ready_event(self.spec.rank, self.model, None))
            follow(self.model, self.tokenizer, self.group)
        log.info("runner.stopped")


def ready_event(rank: int, model: nn.Module, endpoint: str | None) -> dict:
    return {"event": "ready", "rank": rank, "endpoint": endpoint, "memory_bytes": parameter_bytes(model)}


def serve_rank0(
    sock: socket.socket,
    group: mx.distributed.Group | None,
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    report: Report,
) -> None:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    jobs: Queue[Job] = Queue()
    http = start_http(create_app(tokenizer, jobs), sock)
    host, port = sock.getsockname()[:2]
    endpoint = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    report(ready_event(0, model, endpoint))
    log.info("runner.ready", endpoint=endpoint)
    serve(model, tokenizer, group, jobs, stop)
    http.should_exit = True
