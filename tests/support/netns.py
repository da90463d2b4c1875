"""A machine on its own network: a network namespace joined to this one by a veth pair whose link can be
cut and mended, the way a cable is pulled. Needs root (CAP_NET_ADMIN) and iproute2."""

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def can_make_namespaces() -> str | None:
    """None when this machine can make network namespaces, else why not."""
    if shutil.which("ip") is None:
        return "iproute2 (the ip command) is not installed"
    probe = f"sl-probe-{os.getpid()}"
    try:
        ip("netns", "add", probe)
        ip("netns", "del", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot make a network namespace here: {getattr(exc, 'stderr', b'') or exc}"
    return None


class Link:
    """Namespace `sl-<n>`; this side is 10.213.<n>.1 (interface slh<n>), the far side 10.213.<n>.2."""

    def __init__(self, n: int) -> None:
        self.namespace = f"sl-{n}"
        self.here, self.there = f"slh{n}", f"sln{n}"
        self.host_ip, self.node_ip = f"10.213.{n}.1", f"10.213.{n}.2"

    def create(self) -> None:
        self.remove()  # leftovers of an interrupted run
        ip("netns", "add", self.namespace)
        ip("link", "add", self.here, "type", "veth", "peer", "name", self.there)
        ip("link", "set", self.there, "netns", self.namespace)
        ip("addr", "add", f"{self.host_ip}/24", "dev", self.here)
        ip("link", "set", self.here, "up")
        ip("-n", self.namespace, "addr", "add", f"{self.node_ip}/24", "dev", self.there)
        ip("-n", self.namespace, "link", "set", self.there, "up")
        ip("-n", self.namespace, "link", "set", "lo", "up")

    def cut(self) -> None:
        ip("link", "set", self.here, "down")

    def mend(self) -> None:
        ip("link", "set", self.here, "up")

    def remove(self) -> None:
        for args in (["link", "del", self.here], ["netns", "del", self.namespace]):
            with suppress(subprocess.CalledProcessError):
                ip(*args)

    def command(self, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *args]


@contextmanager
def separate_network(n: int) -> Iterator[Link]:
    link = Link(n)
    link.create()
    try:
        yield link
    finally:
        link.remove()
