"""Runners forked from a process that has already imported MLX, mlx_lm and the engine (Linux).

Importing them takes a runner about 1.1 s of CPU before it reads its spec; a node that starts runners
(serving, healing, a resumed instance) pays it at every start. `ForkServer` starts
`python -m shardline.engine.forkserver PARENT_PID FD` once, with the runners' environment; that process imports
everything, then forks one child per request, which runs `shardline.engine.runner.main` exactly as
`python -m shardline.engine.runner SPEC` would, and shows that command line in `ps`.

Over the socket pair (SOCK_SEQPACKET: one message per send):
  client -> server  {"argv": [spec_path]} with the child's stdout and stderr descriptors
  server -> client  {"pid": pid} with a pidfd of the child (signals reach it and no process reusing its pid)
  server -> client  {"exit": pid, "code": returncode}   Popen's convention: -N for death by signal N
Lifelines: the server dies with its starter (shardline.lifeline), each child with the server.
"""

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from queue import Empty, Queue

import setproctitle

from shardline.engine import runner
from shardline.lifeline import hold

PRELOAD = (
    "shardline.engine.rank",
    "shardline.engine.loading",
    "transformers.models.auto.tokenization_auto",
    "transformers.tokenization_utils_fast",
)
REPLY_S = 120.0  # the first request waits for the server's imports (1-5 s on a busy machine)


class ForkServerGone(RuntimeError):
    """The server process exited (killed, or it could not import the engine): start runners another way."""


class Forked:
    """A runner forked by the server, with the parts of Popen's interface that its owners use."""

    def __init__(self, pid: int, pidfd: int, stdout: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stdout_fd = stdout  # the read end of the child's stdout; the owner wraps and closes it
        self._pidfd = pidfd
        self._exited = threading.Event()
        self._callbacks: list[Callable[[int], None]] = []
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(f"runner {self.pid}", timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        with self._lock, contextlib.suppress(ProcessLookupError):
            if self.returncode is None:
                signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def on_exit(self, callback: Callable[[int], None]) -> None:
        """Call `callback(returncode)` once the child has exited (at once if it has), from any thread."""
        with self._lock:
            if self.returncode is None:
                self._callbacks.append(callback)
                return
        callback(self.returncode)

    def dies_with_server(self, timeout: float = 5.0) -> None:
        """Wait until the kernel has killed this child, whose server has died (its pidfd turns readable)."""
        with self._lock, selectors.DefaultSelector() as selector:
            if self.returncode is None:
                selector.register(self._pidfd, selectors.EVENT_READ)
                selector.select(timeout)

    def exited(self, code: int) -> None:
        with self._lock:
            if self.returncode is not None:
                return
            self.returncode = code
            callbacks, self._callbacks = self._callbacks, []
            os.close(self._pidfd)
        self._exited.set()
        for callback in callbacks:
            callback(code)


class ForkServer:
    """The client: start the server (from the main thread: its lifeline is tied to the thread that starts it)."""

    def __init__(self, env: dict[str, str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "shardline.engine.forkserver", str(os.getpid()), str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env=env,
        )  # fmt: skip
        theirs.close()
        self._sock = ours
        self._replies: Queue[tuple[int, int] | None] = Queue()
        self._children: dict[int, Forked] = {}
        self._early: dict[int, int] = {}  # exits heard before their start's reply was handled
        self._lock = threading.Lock()  # one start at a time: replies come in the order of requests
        self._state = threading.Lock()
        self.gone = False
        self.started = 0  # runners forked so far
        threading.Thread(target=self._listen, name="forkserver", daemon=True).start()

    def start(self, argv: list[str], stderr: int) -> Forked:
        """Fork a runner with `argv` (what follows `-m shardline.engine.runner`), its stderr on `stderr` and its
        stdout on a new pipe (`Forked.stdout_fd`); raises ForkServerGone if the server is not there to do it."""
        with self._lock:
            if self.gone:
                raise ForkServerGone("the fork server has exited")
            read_end, write_end = os.pipe()
            try:
                socket.send_fds(self._sock, [json.dumps({"argv": argv}).encode()], [write_end, stderr])
                reply = self._replies.get(timeout=REPLY_S)
            except (OSError, Empty) as exc:
                os.close(read_end)
                self.gone = True  # a late reply would answer the next request: never ask this server again
                raise ForkServerGone(f"the fork server did not answer: {exc!r}") from exc
            finally:
                os.close(write_end)
            if reply is None:
                os.close(read_end)
                raise ForkServerGone("the fork server has exited")
            pid, pidfd = reply
            child = Forked(pid, pidfd, read_end)
            with self._state:
                self._children[pid] = child
                code = self._early.pop(pid, None)
            if code is not None:
                self._exit(pid, code)
            self.started += 1
            return child

    def close(self) -> None:
        """Stop the server; its children die with it (SIGKILL), as when the node worker dies."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self.process.kill()
        self.process.wait()

    def _listen(self) -> None:
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self._sock, 4096, 1)
            except OSError:
                message, fds = b"", []
            if not message:
                break
            event = json.loads(message)
            if "pid" in event:
                self._replies.put((int(event["pid"]), fds[0]))
            else:
                self._exit(int(event["exit"]), int(event["code"]))
        self.gone = True
        self._replies.put(None)
        self.process.wait()
        with self._state:
            orphans = list(self._children.values())
        for child in orphans:  # the kernel kills them with the server (their death signal)
            child.dies_with_server()
            child.exited(-signal.SIGKILL)

    def _exit(self, pid: int, code: int) -> None:
        with self._state:
            child = self._children.pop(pid, None)
            if child is None:
                self._early[pid] = code
                return
        child.exited(code)


def serve(sock: socket.socket) -> None:
    """The server's loop: fork a runner per request, report each one's exit; ends when the client goes."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that set_wakeup_fd hears SIGCHLD
    signal.set_wakeup_fd(wake_w)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is sock:
                message, fds, _, _ = socket.recv_fds(sock, 4096, 2)
                if not message:
                    return  # the client closed its end: our children die with us
                closing = [sock.fileno(), wake_r, wake_w, selector.fileno()]
                pid = fork_runner(json.loads(message)["argv"], fds, closing)
                pidfd = os.pidfd_open(pid)
                socket.send_fds(sock, [json.dumps({"pid": pid}).encode()], [pidfd])
                os.close(pidfd)
            else:
                os.read(wake_r, 4096)
            for pid, code in reaped():
                sock.send(json.dumps({"exit": pid, "code": code}).encode())


def reaped() -> list[tuple[int, int]]:
    done = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done.append((pid, os.waitstatus_to_exitcode(status)))


def fork_runner(argv: list[str], fds: list[int], closing: list[int]) -> int:
    server = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid != 0:
        for fd in fds:
            os.close(fd)
        return pid
    code = 2
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in closing:
            os.close(fd)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in fds:
            os.close(fd)
        hold(server)
        setproctitle.setproctitle(" ".join(runner.command(*argv)))
        sys.argv = [runner.__file__, *argv]  # what `python -m shardline.engine.runner` would have
        code = runner.main(sys.argv)
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)


def main() -> None:
    hold(int(sys.argv[1]))  # before the imports: die with the process that started us, whatever happens next
    sock = socket.socket(fileno=int(sys.argv[2]))
    for module in PRELOAD:
        __import__(module)
    serve(sock)


if __name__ == "__main__":
    main()
