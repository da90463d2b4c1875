"""One rank of a served model: `python -m shardline.engine.runner SPEC_JSON_PATH`.

stdout carries only JSON events, one per line (everything else printed goes to stderr):
  {"event": "ready", "rank": r, "endpoint": "http://host:port" | null, "memory_bytes": n}
  {"event": "stats", "cache_bytes": n}   this rank's prefix cache changed size
  {"event": "error", "message": "...", "refused": bool}   refused: the model itself cannot run (MLX or
                                                          mlx-lm refuse it): retrying cannot help
Exit codes: 0 shut down (SIGTERM/SIGINT to rank 0 stops every rank), 1 failed while
serving, 2 could not start (bad spec, missing files, out of memory, the ring),
3 the model cannot run (MLX or mlx-lm refuse it: its config, its weights, a forward pass).
A runner whose parent dies is SIGKILLed (shardline.lifeline.hold).
"""

import json
import os
import sys
from collections.abc import Callable
from typing import TextIO

import structlog

from shardline.lifeline import hold

log = structlog.get_logger(__name__)
EXIT_FAILED, EXIT_START, EXIT_REFUSED = 1, 2, 3


def command(spec_path: str) -> list[str]:
    """A runner started as a process; a forked one (forkserver.py) shows the same in `ps`."""
    return [sys.executable, "-m", "shardline.engine.runner", spec_path]


def claim_stdout() -> TextIO:
    """A private handle on stdout for the events; fd 1 itself now points at stderr."""
    sys.stdout.flush()
    events = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    return events


def reporter(events: TextIO) -> Callable[[dict], None]:
    def report(event: dict) -> None:
        events.write(json.dumps(event) + "\n")
        events.flush()

    return report


def describe(error: BaseException) -> str:
    if isinstance(error, MemoryError):
        return "out of memory while loading the model"
    return str(error) or type(error).__name__


def main(argv: list[str]) -> int:
    report = reporter(claim_stdout())
    hold(os.getppid())  # no runner is ever orphaned, even while the ring's start holds the GIL
    if len(argv) != 2:
        report({"event": "error", "message": "usage: python -m shardline.engine.runner SPEC_JSON_PATH"})
        return EXIT_START
    # Imported only now: MLX and mlx_lm take seconds to import, and the parent must be held by then.
    from shardline.engine.loading import ModelRefused
    from shardline.engine.rank import Rank

    try:
        rank = Rank(argv[1])
    except Exception as error:  # every start failure is reported the same way, saying whether a retry may help
        log.exception("runner.start_failed")
        refused = isinstance(error, ModelRefused)
        report({"event": "error", "message": describe(error), "refused": refused})
        return EXIT_REFUSED if refused else EXIT_START
    try:
        rank.run(report)
    except Exception as error:  # the parent learns why from the event
        log.exception("runner.failed")
        report({"event": "error", "message": describe(error)})
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stderr.flush()
    # Not sys.exit: the HTTP thread may be mid-request, and nothing needs unwinding.
    os._exit(code)
