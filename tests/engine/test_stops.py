import pytest

from shardline.engine.stops import StopMatcher, held_back


def feed_all(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_stop_inside_one_piece() -> None:
    assert feed_all(["END"], ["abc", "dEND", "never"]) == (["abc", "d"], True)


def test_stop_across_pieces_is_held_back_then_dropped() -> None:
    assert feed_all(["END"], ["abE", "N", "Dxyz"]) == (["ab", "", ""], True)


def test_false_start_is_released() -> None:
    assert feed_all(["END"], ["abE", "Nx", "y"]) == (["ab", "ENx", "y", ""], False)


def test_earliest_stop_wins() -> None:
    assert feed_all(["cd", "b"], ["abcd"]) == (["a"], True)


def test_no_stops_pass_everything_through() -> None:
    assert feed_all([""], ["a", "b"]) == (["a", "b", ""], False)


@pytest.mark.parametrize(
    ("text", "stops", "held"),
    [("abc", ["cde"], 1), ("abcd", ["cde"], 2), ("abc", ["xyz"], 0), ("aaa", ["aab", "ab"], 2), ("", ["a"], 0)],
)
def test_held_back(text: str, stops: list[str], held: int) -> None:
    assert held_back(text, stops) == held
