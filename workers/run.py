"""Run a worker until SIGINT/SIGTERM, then shut it down gracefully."""

import asyncio
import signal

from temporalio.worker import Worker


async def run_until_signal(worker: Worker) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with worker:
        await stop.wait()
