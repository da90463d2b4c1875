"""The API's connections to a runner: an idle one is never closed by the runner while the API may still send on
it, and a request whose connection breaks before any answer is sent again instead of failing the client."""

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI, HTTPException

from api.app import RUNNER_POOL_EXPIRY_S
from api.inference import Inference
from api.instances import InstanceCache
from api.metrics import Metrics
from api.routing import Balancer
from shardline.engine.server import KEEP_ALIVE_S, bind, start_http
from shardline.settings import Settings
from shardline.states import InstanceState
from workflows.serve import InstanceStatus

REPLY = b'{"accepted": true}\n{"token": 7, "text": "Hi"}\n{"finish_reason": "stop", "completion_tokens": 1}\n'


def test_the_runner_keeps_an_idle_connection_longer_than_the_api_does() -> None:
    assert KEEP_ALIVE_S > RUNNER_POOL_EXPIRY_S
    app = FastAPI()
    app.get("/stats")(lambda: {"ok": True})
    sock = bind("127.0.0.1", 0)
    server = start_http(app, sock)
    try:
        with socket.create_connection(sock.getsockname()[:2]) as conn:
            conn.sendall(b"GET /stats HTTP/1.1\r\nHost: runner\r\n\r\n")
            assert b"200 OK" in conn.recv(4096)
            time.sleep(6)  # past uvicorn's and httpx's 5 s defaults, which raced each other
            conn.setblocking(False)
            with contextlib.suppress(BlockingIOError):  # open, nothing to read: as it should be
                assert conn.recv(1, socket.MSG_PEEK) != b"", "the runner closed the idle connection"
    finally:
        server.should_exit = True


@asynccontextmanager
async def runner_that_drops(first: int) -> AsyncIterator[tuple[str, list[int]]]:
    """A runner whose first `first` connections are reset as the request arrives; the next ones answer."""
    seen = [0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen[0] += 1
        await reader.readuntil(b"\r\n\r\n")
        if seen[0] <= first:  # a reset, as a closed socket with unread bytes sends
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
            return
        head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n"
        writer.write(f"{head}Content-Length: {len(REPLY)}\r\n\r\n".encode() + REPLY)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen


def inference(endpoint: str, http: httpx.AsyncClient) -> Inference:
    cache = InstanceCache(client=None)  # type: ignore[arg-type]  # its view is set here, Temporal never asked
    cache._instances = [InstanceStatus("i-1", "org/m", InstanceState.READY, "single", endpoint=endpoint)]
    cache._at = time.monotonic() + 3600
    return Inference(cache, http, Metrics(), Balancer(4), Settings())


async def test_a_connection_reset_before_any_answer_is_sent_again() -> None:
    async with runner_that_drops(first=1) as (endpoint, seen), httpx.AsyncClient() as http:
        served = inference(endpoint, http)
        events = await served.start("org/m", {"prompt": "hi"})
        got = [event async for event in events if event is not None]
        assert [e.get("text") for e in got if "token" in e] == ["Hi"] and seen[0] == 2
        assert served.in_flight.counts == {}  # both tries released their place


async def test_a_runner_that_keeps_dropping_is_a_503_naming_it() -> None:
    async with runner_that_drops(first=5) as (endpoint, seen), httpx.AsyncClient() as http:
        served = inference(endpoint, http)
        with pytest.raises(HTTPException) as refused:
            await served.start("org/m", {"prompt": "hi"})
        assert refused.value.status_code == 503 and "went away" in refused.value.detail
        assert seen[0] == 2 and served.in_flight.counts == {}  # sent again once, not in a loop


async def test_an_instance_seen_ready_by_get_is_served_at_once() -> None:
    """GET /instances/<id> reads the workflow; a chat request right after it must not get the cache's older
    "recovering" (seen: a test told ready, then 503 "recovering (starting runners)" within the cache's second)."""
    async with runner_that_drops(first=0) as (endpoint, _), httpx.AsyncClient() as http:
        served = inference(endpoint, http)
        cache = served.instances
        cache._instances = [InstanceStatus("i-1", "org/m", InstanceState.RECOVERING, "single")]
        with pytest.raises(HTTPException) as refused:
            await served.start("org/m", {"prompt": "hi"})
        assert refused.value.status_code == 503 and "recovering" in refused.value.detail
        cache.learn(InstanceStatus("i-1", "org/m", InstanceState.READY, "single", endpoint=endpoint))
        cache.learn(InstanceStatus("i-2", "org/other", InstanceState.READY, "single", endpoint=endpoint))
        events = await served.start("org/m", {"prompt": "hi"})
        assert [e.get("text") for e in [e async for e in events if e is not None] if "token" in e] == ["Hi"]
        assert [i.instance_id for i in cache._instances] == ["i-1"]  # only what the cache lists is updated
