"""Rank 0 wakes the other ranks the moment a request arrives at an idle instance.

While idle, the other ranks nap between rank 0's idle headers (a rank waiting in a ring collective spins a core),
so a request could wait up to a nap for them. Each of them also listens on UDP at its own ring address (UDP ports
are not TCP's: no new port to hand out), and rank 0 sends each a datagram before its first step after idling; a
datagram lost only costs the rest of that nap.
"""

import select
import socket

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
