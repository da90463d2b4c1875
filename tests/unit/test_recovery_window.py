"""An instance's recovery budget counts the recoveries of the last window, not of its whole life."""

from workflows.serve import recent_recoveries


def test_old_recoveries_leave_the_window() -> None:
    times: list[float] = []
    for at in (0.0, 100.0, 200.0):
        times = recent_recoveries(times, at, window_s=3600)
    assert times == [0.0, 100.0, 200.0]
    # a week later the three are forgotten: this is the only recovery in the window
    assert recent_recoveries(times, 7 * 86400.0, window_s=3600) == [7 * 86400.0]


def test_a_burst_within_the_window_counts_every_one() -> None:
    times: list[float] = []
    for at in (0.0, 10.0, 20.0, 30.0):
        times = recent_recoveries(times, at, window_s=60)
    assert len(times) == 4
    assert recent_recoveries(times, 65.0, window_s=60) == [10.0, 20.0, 30.0, 65.0]
