"""A TCP relay: a slow link (bandwidth-limited) or a stalled one, so tests can act mid-download; the way a node
on another network (namespace) reaches a service on loopback; or a TLS front for a plaintext server."""

import asyncio
import contextlib
import ssl
import threading
import time
from collections.abc import Iterator

from tests.support.processes import free_port


def quiet_refusals(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    """A refused TLS handshake is what some tests want; anything else is reported as usual."""
    if not isinstance(context.get("exception"), ssl.SSLError):
        loop.default_exception_handler(context)


class Relay:
    """Forwards <host>:<port> to 127.0.0.1:<target_port>, the downstream direction capped at `bytes_per_s`
    overall (None: as fast as it goes); with `tls`, clients speak TLS to it (a refused handshake is quiet)."""

    def __init__(
        self,
        target_port: int,
        bytes_per_s: float | None = None,
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.target_port = target_port
        self.bytes_per_s = bytes_per_s
        self.host = host
        self.tls = tls
        self.port = free_port()
        self.bytes_sent = 0
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(quiet_refusals)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._budget_lock = threading.Lock()
        self._next_free = time.monotonic()
        self._flowing = asyncio.Event()  # cleared: connections are accepted, and nothing comes back
        self._flowing.set()

    @property
    def endpoint(self) -> str:
        return f"http://{self.address}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @contextlib.contextmanager
    def capped(self, bytes_per_s: float) -> Iterator[None]:
        """Slower for a while: a test that acts on a download in flight must not race its end."""
        before, self.bytes_per_s = self.bytes_per_s, bytes_per_s
        try:
            yield
        finally:
            self.bytes_per_s = before

    @contextlib.contextmanager
    def stall(self) -> Iterator[None]:
        """A hub that stops answering mid-way (and to every new connection) while the block runs."""
        self._loop.call_soon_threadsafe(self._flowing.clear)
        try:
            yield
        finally:
            self._loop.call_soon_threadsafe(self._flowing.set)

    def start(self) -> "Relay":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        async def close() -> None:
            if self._server:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, ssl=self.tls)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(self._pipe(client_r, up_w, limit=False), self._pipe(up_r, client_w, limit=True))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: bool) -> None:
        try:
            while chunk := await reader.read(16384):
                if limit:
                    await self._flowing.wait()
                if limit and self.bytes_per_s:
                    await asyncio.sleep(self._delay(len(chunk)))
                    self.bytes_sent += len(chunk)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def _delay(self, n: int) -> float:
        """Shared token bucket: every connection together gets `bytes_per_s`."""
        with self._budget_lock:
            now = time.monotonic()
            start = max(now, self._next_free)
            self._next_free = start + n / (self.bytes_per_s or float("inf"))
            return start - now
