"""Two machines on a LAN of their own (network namespaces joined by a veth pair, nothing else on the link):
`shardline up --lan` on one, `shardline node` with nothing configured on the other, which finds the cluster by
mDNS and joins it with its runners' host found from its route. mDNS is sent inside these namespaces only, never
on this machine's own interfaces. Needs root (CAP_NET_ADMIN) and iproute2, else skipped saying why."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.netns import Pair, can_make_namespaces, separate_lan
from tests.support.processes import REPO, TIMEOUTS

WHY_NOT = can_make_namespaces()
pytestmark = [pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or ""), pytest.mark.slow(30)]  # s in make test

API_PORT = 8000  # a fresh namespace: the defaults are free
GET_NODES = "import httpx, sys; print(httpx.get(sys.argv[1], timeout=5).text)"


class Lan:
    """The pair, and the processes started in it (each in a namespace, stopped at the end)."""

    def __init__(self, pair: Pair, root: Path) -> None:
        self.pair, self.root = pair, root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.suffix = random.randint(0, 99999)

    def env(self, name: str, **settings: str) -> dict[str, str]:
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SHARDLINE_", "HF_"))},
            "SHARDLINE_HOME": str(self.root / name),
            "SHARDLINE_LOG_JSON": "true",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO),
            **TIMEOUTS,
            **settings,
        }

    def start(self, namespace: str, name: str, args: list[str], **settings: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        cmd = self.pair.command(namespace, [sys.executable, "-m", "shardline", *args])
        proc = subprocess.Popen(cmd, env=self.env(name, **settings), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self.procs.append(proc)
        return proc

    def nodes(self) -> list[dict[str, Any]]:
        """GET /nodes of the cluster's API, from the far machine (over the LAN, as a person there would)."""
        url = f"http://{self.pair.a_ip}:{API_PORT}/nodes"
        cmd = self.pair.command(self.pair.b, [sys.executable, "-c", GET_NODES, url])
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return json.loads(out.stdout) if out.returncode == 0 else []

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[Lan]:
    with separate_lan() as pair:
        lan = Lan(pair, tmp_path)
        try:
            yield lan
        finally:
            lan.stop()


def wait_for(check: Any, timeout: float, what: str, lan: Lan) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(1)
    logs = {p.name: p.read_text()[-3000:] for p in lan.root.glob("*.log")}
    raise AssertionError(f"{what}: not within {timeout} s; logs: {json.dumps(logs, indent=1)}")


def test_a_node_finds_the_cluster_and_joins_with_its_lan_address(lan: Lan) -> None:
    cluster = f"desk-{lan.suffix}"
    far = f"far-{lan.suffix}"
    started = time.monotonic()
    lan.start(lan.pair.a, "up", ["up", "--lan"], SHARDLINE_CLUSTER=cluster)
    wait_for(lambda: any(n["state"] == "online" for n in lan.nodes()), 60, "up --lan's own node online", lan)
    own = next(n for n in lan.nodes() if n["state"] == "online")
    assert own["host"] == lan.pair.a_ip, own  # its runners on the LAN address, not 127.0.0.1

    node = lan.start(lan.pair.b, "node", ["node"], SHARDLINE_NODE_ID=far)  # no Temporal address, no host

    def far_online() -> dict[str, Any] | None:
        return next((n for n in lan.nodes() if n["node_id"] == far and n["state"] == "online"), None)

    joined = wait_for(far_online, 45, "the far node online", lan)
    assert joined["host"] == lan.pair.b_ip, joined  # from its route to Temporal
    assert node.poll() is None
    log = (lan.root / "node.log").read_text()
    assert f'"cluster": "{cluster}"' in log and f'"temporal": "{lan.pair.a_ip}:7233"' in log, log[-2000:]
    print(f"lan: far node online {time.monotonic() - started:.1f} s after `up --lan` started")


def pick(lan: Lan, cluster: str | None) -> tuple[list[str], str]:
    """What a node on B would join (Temporal address, its own host), and what it logged deciding."""
    code = ("import sys\nfrom shardline.discovery import joined_settings\nfrom shardline.settings import Settings\n"
            "s = joined_settings(Settings(cluster=sys.argv[1] or None))\nprint(s.target, s.node_host)")  # fmt: skip
    cmd = lan.pair.command(lan.pair.b, [sys.executable, "-c", code, cluster or ""])
    out = subprocess.run(cmd, env=lan.env("pick"), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.splitlines()[-1].split(), out.stdout


def test_several_clusters_are_named_and_none_is_joined(lan: Lan) -> None:
    """No cluster: a node says so and tries 127.0.0.1. Two clusters advertised on the LAN: a node names both,
    asks for SHARDLINE_CLUSTER and exits; with it set to one of them, it picks that one (the advertisers alone:
    no Temporal behind them)."""
    joins, said = pick(lan, None)
    assert joins == ["127.0.0.1:7233", "127.0.0.1"] and "discovery.none_found" in said, said

    names = [f"one-{lan.suffix}", f"two-{lan.suffix}"]
    advertise = ("import asyncio, sys\nfrom shardline.discovery import Advertiser\nfrom shardline.settings import "
                 "Settings\nasync def main():\n    a = Advertiser(Settings(cluster=sys.argv[1], temporal_port=int("
                 "sys.argv[2])))\n    await a.start()\n    await asyncio.sleep(60)\nasyncio.run(main())")  # fmt: skip
    for i, name in enumerate(names):
        cmd = lan.pair.command(lan.pair.a, [sys.executable, "-c", advertise, name, str(7300 + i)])
        lan.procs.append(subprocess.Popen(cmd, env=lan.env(name), cwd=REPO))
    time.sleep(2)  # each probes its name first
    node = lan.start(lan.pair.b, "node", ["node"], SHARDLINE_NODE_ID=f"far-{lan.suffix}")
    assert node.wait(30) == 2
    said = " ".join((lan.root / "node.log").read_text().split())  # as the console wrapped it
    assert f"{names[0]} ({lan.pair.a_ip}:7300), {names[1]} ({lan.pair.a_ip}:7301)" in said, said
    assert "SHARDLINE_CLUSTER" in said

    assert pick(lan, names[1])[0] == [f"{lan.pair.a_ip}:7301", lan.pair.b_ip]
