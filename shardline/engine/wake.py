"""Ranks wait for each other without spinning: rank 0 wakes the others the moment a request arrives at an idle
instance, and ranks that have loaded wait for the slower ones at a barrier.

A rank waiting in a ring collective spins a core (MLX's socket thread busy-polls). So while idle the other ranks
nap between rank 0's idle headers, and a request could wait up to a nap for them: each of them also listens on UDP
at its own ring address (UDP ports are not TCP's: no new port to hand out), and rank 0 sends each a datagram
before its first step after idling; a datagram lost only costs the rest of that nap. While loading, a rank done
early would spin until the slowest is done (seconds to minutes, a core taken from the ranks still loading on the
same machine): every rank tells rank 0 it is ready over the same UDP sockets, and rank 0 tells them all to go.
"""

import select
import socket
import time

import structlog

log = structlog.get_logger(__name__)


def address(host: str) -> tuple[str, int]:
    """("ip", port) of an "ip:port" ring host, IPv6 in brackets or not."""
    ip, port = host.rsplit(":", 1)
    return ip.strip("[]"), int(port)


def listen(host: str) -> socket.socket | None:
    """This rank's wake-up socket, or None where it cannot bind (then it naps its full naps)."""
    ip, port = address(host)
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((ip, port))
    except OSError as err:
        sock.close()
        log.warning("wake.unavailable", host=host, reason=str(err))
        return None
    sock.setblocking(False)
    return sock


def nap(sock: socket.socket | None, seconds: float) -> None:
    """Up to `seconds`, less if woken."""
    if sock is None:
        select.select([], [], [], seconds)
        return
    readable, _, _ = select.select([sock], [], [], seconds)
    while readable:  # every datagram that came: one wake-up
        try:
            sock.recv(16)
        except BlockingIOError:
            break


class Waker:
    """Rank 0's side: one datagram to every other rank."""

    def __init__(self, hosts: list[str]) -> None:
        self.targets = [address(h) for h in hosts[1:]]
        self.socks = {family: socket.socket(family, socket.SOCK_DGRAM) for family in (socket.AF_INET, socket.AF_INET6)}

    def __call__(self) -> None:
        for ip, port in self.targets:
            try:
                self.socks[socket.AF_INET6 if ":" in ip else socket.AF_INET].sendto(b"w", (ip, port))
            except OSError as err:  # the nap ends on its own
                log.debug("wake.failed", target=f"{ip}:{port}", reason=str(err))

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()


BARRIER_S = 300.0  # past this the ring's own collective that follows does the waiting (spinning), as it always could
PROBE_S = 3.0  # ranks that have all just joined the ring meet within this, or UDP does not go between them
RESEND_S = 0.2


def barrier(sock: socket.socket | None, hosts: list[str], rank: int, phase: int, limit_s: float = BARRIER_S) -> bool:
    """Wait, without spinning, until every rank has come this far: each other rank tells rank 0 `ready` (again
    every RESEND_S: a datagram may be lost, or come before rank 0 listens), and rank 0, having heard them all, tells
    each `go` (three times). True when it knew; False past `limit_s` or where this rank cannot listen."""
    if sock is None or len(hosts) < 2:
        return False
    deadline = time.monotonic() + limit_s
    go = b"g%d" % phase
    if rank == 0:
        waiting = set(range(1, len(hosts)))
        while waiting and time.monotonic() < deadline:
            for data in arrived(sock, RESEND_S):
                if data.startswith(b"r%d:" % phase):
                    waiting.discard(int(data.split(b":")[1]))
        for _ in range(3):
            for host in hosts[1:]:
                send(sock, go, host)
        return not waiting
    ready = b"r%d:%d" % (phase, rank)
    while time.monotonic() < deadline:
        send(sock, ready, hosts[0])
        if go in arrived(sock, RESEND_S):
            return True
    return False


def arrived(sock: socket.socket, wait_s: float) -> list[bytes]:
    """The datagrams that come within `wait_s` of asking (all of them, once one has)."""
    readable, _, _ = select.select([sock], [], [], wait_s)
    out = []
    while readable:
        try:
            out.append(sock.recv(64))
        except BlockingIOError:
            break
    return out


def send(sock: socket.socket, data: bytes, host: str) -> None:
    try:
        sock.sendto(data, address(host))
    except OSError as err:  # sent again, or the ring waits
        log.debug("wake.send_failed", target=host, reason=str(err))
