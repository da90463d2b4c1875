"""A machine on its own network: a network namespace joined to this one by a veth pair whose link can be
cut and mended, the way a cable is pulled. Needs root (CAP_NET_ADMIN) and iproute2."""

import os
import random
import re
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


def taken_numbers() -> set[int]:
    """The link numbers in use on this machine (by any test run: xdist workers, other checkouts)."""
    names = subprocess.run(["ip", "-o", "link"], check=True, capture_output=True, text=True, timeout=10).stdout
    names += "\n".join(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else ""
    return {int(n) for n in re.findall(r"\bsl[hnab]?-?(\d+)\b", names)}


class Pair:
    """Two machines on a LAN of their own: namespaces `sla-<n>` (10.214.<n>.1, interface sla<n>) and `slb-<n>`
    (10.214.<n>.2, slb<n>) joined by a veth pair, with no link to this machine's network. Multicast (mDNS) sent in
    either reaches the other and nothing else."""

    def __init__(self, n: int) -> None:
        self.a, self.b = f"sla-{n}", f"slb-{n}"
        self.a_if, self.b_if = f"sla{n}", f"slb{n}"
        self.a_ip, self.b_ip = f"10.214.{n}.1", f"10.214.{n}.2"

    def create(self) -> None:
        for namespace in (self.a, self.b):
            ip("netns", "add", namespace)
        ip("-n", self.a, "link", "add", self.a_if, "type", "veth", "peer", "name", self.b_if, "netns", self.b)
        for namespace, name, address in ((self.a, self.a_if, self.a_ip), (self.b, self.b_if, self.b_ip)):
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", name)
            ip("-n", namespace, "link", "set", name, "up", "multicast", "on")
            ip("-n", namespace, "link", "set", "lo", "up")

    def remove(self) -> None:
        for namespace in (self.a, self.b):  # the veth pair goes with its namespaces
            with suppress(subprocess.CalledProcessError):
                ip("netns", "del", namespace)

    def command(self, namespace: str, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", namespace, *args]


@contextmanager
def separate_lan() -> Iterator[Pair]:
    """A Pair of a number nobody else uses now, as separate_network picks one."""
    for attempt in range(5):
        pair = Pair(random.choice(sorted(set(range(1, 251)) - taken_numbers())))
        try:
            pair.create()
            break
        except subprocess.CalledProcessError:
            pair.remove()
            if attempt == 4:
                raise
    try:
        yield pair
    finally:
        pair.remove()


@contextmanager
def separate_network() -> Iterator[Link]:
    """A link of a number nobody else uses now; another run may pick the same one at the same moment: try again."""
    for attempt in range(5):
        link = Link(random.choice(sorted(set(range(1, 251)) - taken_numbers())))
        try:
            link.create()
            break
        except subprocess.CalledProcessError:
            link.remove()
            if attempt == 4:
                raise
    try:
        yield link
    finally:
        link.remove()
