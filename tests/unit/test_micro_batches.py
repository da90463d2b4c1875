"""How a pipeline's batch is cut into micro-batches (shardline/engine/overlap.py)."""

import pytest

from shardline.engine.overlap import cut


@pytest.mark.parametrize(
    ("rows", "parts", "expected"),
    [
        (8, 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
        (5, 2, [[0, 1], [2, 3, 4]]),
        (8, 3, [[0, 1], [2, 3, 4], [5, 6, 7]]),
        (2, 3, [[0], [1]]),  # fewer rows than ranks: no empty micro-batch
    ],
)
def test_rows_are_cut_in_order_as_evenly_as_they_go(rows: int, parts: int, expected: list[list[int]]) -> None:
    assert cut(rows, parts) == expected


def test_every_row_is_in_exactly_one_micro_batch() -> None:
    for rows in range(1, 20):
        for parts in range(1, 6):
            got = cut(rows, parts)
            assert [r for part in got for r in part] == list(range(rows))
            assert max(map(len, got)) - min(map(len, got)) <= 1
