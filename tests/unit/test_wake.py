"""Rank 0 wakes a napping rank at once; a rank that cannot listen naps its naps out."""

import threading
import time

from shardline.engine.wake import Waker, address, barrier, listen, nap
from tests.support.processes import free_port


def test_a_napping_rank_wakes_when_rank_0_says_so() -> None:
    host = f"127.0.0.1:{free_port()}"
    alarm = listen(host)
    assert alarm is not None
    waker = Waker(["127.0.0.1:1", host])  # rank 0's own address is never sent to
    try:
        started = time.monotonic()
        threading.Timer(0.1, waker).start()
        nap(alarm, 30.0)
        assert time.monotonic() - started < 10  # woken, not the 30 s nap
        waker()  # woken twice before the next nap: that nap ends at once, the one after is whole again
        waker()
        time.sleep(0.05)
        nap(alarm, 30.0)
        started = time.monotonic()
        nap(alarm, 0.3)
        assert time.monotonic() - started >= 0.25
    finally:
        alarm.close()
        waker.close()


def test_a_rank_that_cannot_listen_naps_its_nap_out() -> None:
    host = f"127.0.0.1:{free_port()}"
    taken = listen(host)
    assert taken is not None and listen(host) is None
    started = time.monotonic()
    nap(None, 0.2)
    assert time.monotonic() - started >= 0.15
    taken.close()
    assert address("[::1]:7000") == ("::1", 7000) and address("10.0.0.2:7001") == ("10.0.0.2", 7001)


def test_ranks_meet_at_a_barrier_without_spinning() -> None:
    """Rank 0 hears every other rank's ready, then tells them to go; a rank that waits uses no CPU meanwhile."""
    hosts = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    socks = [listen(h) for h in hosts]
    met: dict[int, tuple[bool, float, float]] = {}

    def rank(r: int, late_s: float) -> None:
        time.sleep(late_s)
        started, cpu = time.monotonic(), time.thread_time()
        ok = barrier(socks[r], hosts, r, phase=1, limit_s=20)
        met[r] = (ok, time.monotonic() - started, time.thread_time() - cpu)

    threads = [threading.Thread(target=rank, args=(r, late)) for r, late in ((0, 0.0), (1, 1.0), (2, 0.3))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert all(ok for ok, _, _ in met.values()) and len(met) == 3
        assert 0.8 < met[0][1] < 5  # rank 0 waited for the last one (1 s late), not for its limit
        assert met[0][2] < 0.3 and met[2][2] < 0.3  # waiting cost next to no CPU
        assert barrier(socks[1], hosts, 1, phase=2, limit_s=0.5) is False  # nobody else came: it gives up
        assert barrier(None, hosts, 1, phase=2) is False  # a rank that cannot listen leaves the wait to the ring
    finally:
        for sock in socks:
            if sock is not None:
                sock.close()
