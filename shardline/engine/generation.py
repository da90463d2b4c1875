"""The generation loops: rank 0 takes jobs from a queue, the other ranks follow it step by step.

Every rank runs the same mlx_lm stream_generate over the same prompt and seed, and all
ranks leave it after the same token (rank 0 decides, see protocol.py), so all run
exactly the same forward passes.
"""

import secrets
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from queue import Empty, Queue

import mlx.core as mx
import mlx.nn as nn
import structlog
from mlx_lm.generate import GenerationResponse, stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from shardline.engine import protocol
from shardline.engine.protocol import GENERATE, IDLE, SHUTDOWN, Header, Sampling
from shardline.engine.stops import StopMatcher

log = structlog.get_logger(__name__)
Group = mx.distributed.Group | None


@dataclass
class Job:
    """One request on its way to the MLX thread. `emit` must be safe to call from that thread."""

    tokens: list[int]
    sampling: Sampling
    stop: list[str]
    emit: Callable[[dict], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class RanksDiverged(RuntimeError):
    pass


def random_seed() -> int:
    return secrets.randbits(64)


def responses(
    model: nn.Module, tokenizer: TokenizerWrapper, tokens: list[int], sampling: Sampling
) -> Generator[GenerationResponse, None, None]:
    mx.random.seed(sampling.seed)
    sampler = make_sampler(sampling.temperature, sampling.top_p)
    return stream_generate(model, tokenizer, mx.array(tokens), max_tokens=sampling.max_tokens, sampler=sampler)


def next_job(jobs: "Queue[Job]", timeout: float) -> Job | None:
    try:
        job = jobs.get(timeout=timeout)
    except Empty:
        return None
    # A client that left while its request waited costs nothing.
    return None if job.cancelled.is_set() else job


def serve(
    model: nn.Module, tokenizer: TokenizerWrapper, group: Group, jobs: "Queue[Job]", stop: threading.Event
) -> None:
    """Rank 0: jobs one at a time, in order; returns after telling the other ranks to shut down."""
    while not stop.is_set():
        job = next_job(jobs, protocol.POLL_S)
        if job is None:
            if group is not None:
                protocol.send_header(group, Header(IDLE))  # keeps the others listening, and noticing a lost rank
            continue
        if group is not None:
            protocol.send_request(group, job.tokens, job.sampling)
        run_job(model, tokenizer, group, job, stop)
    if group is not None:
        protocol.send_header(group, Header(SHUTDOWN))


def run_job(model: nn.Module, tokenizer: TokenizerWrapper, group: Group, job: Job, stop: threading.Event) -> None:
    stops = StopMatcher(job.stop)
    count, finish, stream = 0, None, responses(model, tokenizer, job.tokens, job.sampling)
    try:
        for response in stream:
            count += 1
            text, hit = stops.feed(response.text)
            finish = "stop" if hit else response.finish_reason
            if finish is not None:
                text += stops.flush()
            job.emit({"text": text, "token": response.token})
            go = finish is None and not job.cancelled.is_set() and not stop.is_set()
            if group is not None:
                protocol.send_step(group, go, response.token)
            if not go:
                break
    finally:
        stream.close()
    if finish is not None:
        job.emit({"finish_reason": finish, "prompt_tokens": len(job.tokens), "completion_tokens": count})
    log.info(
        "request.done", finish_reason=finish or "cancelled", prompt_tokens=len(job.tokens), completion_tokens=count
    )


def follow(model: nn.Module, tokenizer: TokenizerWrapper, group: mx.distributed.Group) -> None:
    """Ranks other than 0: run what rank 0 sends until it says shut down."""
    while True:
        header = protocol.receive_header(group)
        if header.kind == SHUTDOWN:
            return
        if header.kind == GENERATE:
            tokens = protocol.receive_prompt(group, header)
            follow_job(model, tokenizer, group, tokens, header.sampling)
        else:
            time.sleep(protocol.NAP_S)


def follow_job(
    model: nn.Module, tokenizer: TokenizerWrapper, group: mx.distributed.Group, tokens: list[int], sampling: Sampling
) -> None:
    stream = responses(model, tokenizer, tokens, sampling)
    try:
        for response in stream:
            go, token = protocol.receive_step(group)
            check_same(token, response)
            if not go:
                return
    finally:
        stream.close()
    raise RanksDiverged("this rank finished a request that rank 0 went on with")


def check_same(token: int, response: GenerationResponse) -> None:
    # Ranks on different hardware could round differently and sample different tokens;
    # going on would feed the pipeline tokens rank 0 never reported.
    if token != response.token:
        raise RanksDiverged(f"rank 0 sampled token {token}, this rank {response.token}")
