"""Rank 0 wakes a napping rank at once; a rank that cannot listen naps its naps out."""

import threading
import time

from shardline.engine.wake import Waker, address, listen, nap
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
