"""A TCP proxy on loopback that limits bandwidth: a slow link, so tests can act mid-download."""

import asyncio
import contextlib
import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThrottledProxy:
    """Forwards 127.0.0.1:<port> to `target`, the downstream direction capped at `bytes_per_s` overall."""

    def __init__(self, target_port: int, bytes_per_s: float) -> None:
        self.target_port = target_port
        self.bytes_per_s = bytes_per_s
        self.port = free_port()
        self.bytes_sent = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._budget_lock = threading.Lock()
        self._next_free = time.monotonic()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ThrottledProxy":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(self._pipe(client_r, up_w, limit=False), self._pipe(up_r, client_w, limit=True))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: bool) -> None:
        try:
            while chunk := await reader.read(16384):
                if limit:
                    await asyncio.sleep(self._delay(len(chunk)))
                    self.bytes_sent += len(chunk)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def _delay(self, n: int) -> float:
        """Shared token bucket: every connection together gets `bytes_per_s`."""
        with self._budget_lock:
            now = time.monotonic()
            start = max(now, self._next_free)
            self._next_free = start + n / self.bytes_per_s
            return start - now
