"""The generation loops: rank 0 schedules a continuous batch, the other ranks follow it step by step.

Each step rank 0 decides who leaves the batch (finished on a stop string, or its client went
away), which cached prefixes are dropped, and who joins (with the cached prefix it reuses);
it sends that to the other ranks (protocol.py) and every rank applies it to its own Batch and
runs the same forward pass. A request joins at the next step and leaves when it is done, so
no one waits for a whole other generation, and a long prompt is prefilled in chunks between
decoding steps of the others.
"""

import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from queue import Empty, Queue
from typing import Any

import mlx.core as mx
import structlog
from mlx_lm.tokenizer_utils import TokenizerWrapper

from shardline.engine import overlap, protocol, wake
from shardline.engine.batch import Batch, Kept, Output, Response
from shardline.engine.channels import Channels
from shardline.engine.prefix_cache import PrefixIndex
from shardline.engine.protocol import IDLE, SHUTDOWN, Join, Sampling, Step
from shardline.engine.stops import StopMatcher

log = structlog.get_logger(__name__)
Group = mx.distributed.Group | None
# a distributed batch runs this long between messages to the other ranks (each message drains the
# pipeline): how late a join, a stop string or a hang-up can be acted on
SYNC_S = 0.05
MAX_STEPS_AHEAD = 16


@dataclass
class Job:
    """One request on its way to the MLX thread. `emit` must be safe to call from that thread."""

    tokens: list[int]
    sampling: Sampling
    stop: list[str]
    emit: Callable[[dict], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    tools: list[dict[str, Any]] | None = None  # given: the model's tool calls are parsed out of its text
    thinking: bool = False  # the prompt left the model inside its reasoning
    logprobs: int | None = None  # None = none; n = the sampled token's and the n likeliest
    resumed: list[int] = field(default_factory=list)  # output already delivered: `tokens` ends with it

    @property
    def prompt_tokens(self) -> int:
        return len(self.tokens) - len(self.resumed)


@dataclass
class Running:
    job: Job
    detokenizer: Any
    stops: StopMatcher
    channels: Channels
    cached: int
    count: int = 0
    tool_calls: int = 0


@dataclass
class Stats:
    """What /stats and the metrics show; written by the MLX thread only."""

    batch: int = 0
    steps: int = 0
    requests: int = 0
    failed: int = 0


class RanksDiverged(RuntimeError):
    pass


def random_seed() -> int:
    return secrets.randbits(64)


class Scheduler:
    """Rank 0's loop. `scale`: the prefix cache's bytes on the rank holding the most layers per byte here."""

    def __init__(
        self,
        batch: Batch,
        tokenizer: TokenizerWrapper,
        group: Group,
        jobs: "Queue[Job]",
        *,
        max_batch: int,
        index: PrefixIndex | None,
        scale: float = 1.0,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.batch = batch
        self.tokenizer = tokenizer
        self.group = group
        self.jobs = jobs
        self.max_batch = max_batch
        self.index = index
        self.scale = scale
        self.wake = wake  # the other ranks, napping while idle (wake.py)
        self.running: dict[int, Running] = {}
        self.leaving: list[int] = []
        self.drops: list[int] = []
        self.check = 0
        self.step_s = 1.0  # seconds per forward pass, smoothed: how many fit in SYNC_S
        self.stats = Stats()

    def serve(self, stop: threading.Event) -> None:
        """Until `stop` is set; then tells the other ranks to shut down."""
        while not stop.is_set():
            quiet = self.batch.idle() and not self.leaving and not self.drops
            admitted = self.admit(wait=protocol.POLL_S if quiet else 0.0)
            step = Step(self.leaving, self.drops, [join for join, _ in admitted])
            self.leaving, self.drops = [], []
            if not step and self.batch.idle():
                if self.group is not None:
                    protocol.send_idle(self.group)  # keeps the others listening, and noticing a lost rank
                continue
            if quiet and admitted:
                self.wake()
            self.run_step(step, [job for _, job in admitted])
        if self.group is not None:
            protocol.send_shutdown(self.group)
        self.fail_all("the runner is shutting down")

    def admit(self, wait: float) -> list[tuple[Join, Job]]:
        admitted: list[tuple[Join, Job]] = []
        while len(self.running) + len(admitted) < self.max_batch:
            try:
                job = self.jobs.get(timeout=wait) if wait and not admitted else self.jobs.get_nowait()
            except Empty:
                break
            if job.cancelled.is_set():  # a client that left while its request waited costs nothing
                continue
            hit = self.index.lookup(job.tokens) if self.index is not None else None
            join = Join(job.tokens, job.sampling, hit.entry, hit.reuse) if hit else Join(job.tokens, job.sampling)
            admitted.append((join, job))
        return admitted

    def steps_ahead(self) -> int:
        """Forward passes to run before the next message to the other ranks: one while someone waits to
        join, else as many as take about SYNC_S (a stop string or a client gone is acted on after them), and
        never fewer than a run of micro-batches needs to pay for filling and draining the pipeline."""
        if self.group is None or (self.jobs.qsize() and len(self.running) < self.max_batch):
            return 1
        fit = int(SYNC_S / max(self.step_s, 1e-4))
        if self.batch.overlapping():
            fit = max(fit, overlap.MIN_STEPS)
        return max(1, min(MAX_STEPS_AHEAD, fit))

    def run_step(self, step: Step, joined: list[Job]) -> None:
        steps = self.steps_ahead()
        if self.group is not None:
            protocol.send_step(self.group, step, self.check, steps)
        started, tokens = time.monotonic(), []
        passes = self.batch.run(step, steps)
        for i in range(steps):
            try:
                out = next(passes)
            except Exception as error:
                if self.group is not None:
                    raise  # the other ranks may be mid-collective: only a restart of every rank is safe
                log.exception("step.failed", batch=len(self.running) + len(joined))
                for job in joined:
                    job.emit({"error": f"generation failed: {error}", "status": 500})
                self.fail_all(f"generation failed: {error}")
                self.batch.reset()
                return
            tokens += [r.token for r in out.responses]
            self.take(out, step if i == 0 else Step(), joined if i == 0 else [])
        self.check = protocol.checksum(tokens)
        self.step_s = (self.step_s + (time.monotonic() - started) / steps) / 2
        for uid, run in list(self.running.items()):
            if run.job.cancelled.is_set():
                self.leaving.append(uid)
                self.finish(uid, "cancelled")
        self.stats.batch = len(self.running)

    def take(self, out: Output, step: Step, joined: list[Job]) -> None:
        """One forward pass's results: the requests that joined, the prefixes kept, the tokens made."""
        for uid, join, job in zip(out.joined, step.joins, joined, strict=True):
            channels = Channels(self.tokenizer, job.tools, job.thinking)
            run = Running(job, self.tokenizer.detokenizer, StopMatcher(job.stop), channels, join.reuse)
            replay(run)
            self.running[uid] = run
            self.stats.requests += 1
        self.remember(out.kept)
        for response in out.responses:
            self.deliver(response)
        self.stats.steps += 1

    def remember(self, kept: list[Kept]) -> None:
        for entry in kept:
            if self.index is None or not entry.usable:
                self.drops.append(entry.uid)
            else:
                self.drops += self.index.add(entry.uid, entry.tokens, int(entry.nbytes * self.scale))

    def deliver(self, response: Response) -> None:
        run = self.running.get(response.uid)
        if run is None:
            return
        failed = self.batch.grammar_error(response.uid)
        if failed is not None:  # never a 200 with output outside the format: this request fails, alone
            if response.finish_reason is None:
                self.leaving.append(response.uid)
            del self.running[response.uid]
            self.stats.failed += 1
            run.job.emit({"error": f"the output cannot follow the requested format: {failed}", "status": 400})
            return
        run.count += 1
        if response.finish_reason != "stop":  # the end-of-sequence token itself is never shown
            run.detokenizer.add_token(response.token)
        if response.finish_reason is not None:
            run.detokenizer.finalize()
        text, hit = run.stops.feed(run.detokenizer.last_segment)
        finish = "stop" if hit else response.finish_reason
        if finish is not None:
            text += run.stops.flush()
        event = {"text": "", "token": response.token, **run.channels.feed(text, final=finish is not None)}
        run.tool_calls += len(event.get("tool_calls", ()))
        if run.job.logprobs is not None:
            event.update(self.logprobs(response, run.job.logprobs))
        run.job.emit(event)
        if finish is not None:
            if finish == "stop" and run.tool_calls:
                finish = "tool_calls"
            if response.finish_reason is None:
                self.leaving.append(response.uid)  # a stop string: the generator does not know it ended
            self.finish(response.uid, finish)

    def logprobs(self, response: Response, top: int) -> dict[str, Any]:
        """The sampled token's log-probability and the `top` likeliest tokens' (after the request's processors)."""
        values = response.logprobs
        token_text = self.tokenizer.decode([response.token])
        out: dict[str, Any] = {"logprob": values[response.token].item(), "token_text": token_text}
        if top:
            best = mx.argpartition(-values, top - 1)[:top]
            pairs = sorted(zip(best.tolist(), values[best].tolist(), strict=True), key=lambda p: -p[1])
            out["top_logprobs"] = [{"token": t, "text": self.tokenizer.decode([t]), "logprob": v} for t, v in pairs]
        return out

    def finish(self, uid: int, reason: str) -> None:
        run = self.running.pop(uid)
        if reason != "cancelled":
            run.job.emit({
                "finish_reason": reason,
                "prompt_tokens": run.job.prompt_tokens,
                "completion_tokens": run.count,
                "cached_tokens": run.cached,
                **({"stop_sequence": run.stops.matched} if run.stops.matched else {}),
            })  # fmt: skip
        log.info(
            "request.done", finish_reason=reason, prompt_tokens=run.job.prompt_tokens, completion_tokens=run.count,
            cached_tokens=run.cached, resumed=len(run.job.resumed),
        )  # fmt: skip

    def fail_all(self, message: str) -> None:
        for run in self.running.values():
            run.job.emit({"error": message, "status": 503})
        self.stats.failed += len(self.running)
        self.running.clear()


def replay(run: Running) -> None:
    """A resumed request's output so far through its detokenizer, stop strings and channels, unsent (the client
    has it): they then stand where they stood when its stream broke, text held back for a stop string included."""
    for token in run.job.resumed:
        run.count += 1
        run.detokenizer.add_token(token)
        text, _ = run.stops.feed(run.detokenizer.last_segment)
        run.tool_calls += len(run.channels.feed(text, final=False).get("tool_calls", ()))


def follow(batch: Batch, group: mx.distributed.Group, alarm: socket.socket | None = None) -> None:
    """Ranks other than 0: apply what rank 0 sends until it says shut down. `alarm`: where rank 0 wakes this rank
    from its naps (wake.py)."""
    check = 0
    while True:
        kind, step, expected, steps = protocol.receive(group)
        if kind == SHUTDOWN:
            return
        if kind == IDLE:
            wake.nap(alarm, protocol.NAP_S)
            continue
        # Ranks on different hardware could round differently and sample different tokens;
        # going on would feed the pipeline tokens rank 0 never reported.
        if expected != check:
            raise RanksDiverged(f"rank 0 sampled tokens summing to {expected}, this rank {check}")
        tokens = [r.token for out in batch.run(step, steps) for r in out.responses]
        check = protocol.checksum(tokens)
