"""Rank 0's prefix index: longest shared prefix, LRU in bytes, entries a longer one makes useless."""

from shardline.engine.prefix_cache import Hit, PrefixIndex


def test_longest_shared_prefix_wins_and_one_token_is_left_to_compute() -> None:
    index = PrefixIndex(max_bytes=1000)
    index.add(1, [1, 2, 3], 10)
    index.add(2, [1, 2, 9, 9, 9], 10)
    assert index.lookup([1, 2, 3, 4, 5]) == Hit(1, 3)
    assert index.lookup([1, 2, 9, 9, 7]) == Hit(2, 4)  # a longer entry is cut back to what is shared
    assert index.lookup([1, 2, 3]) == Hit(1, 2)  # the whole prompt cached: its last token is still computed
    assert index.lookup([7, 7]) is None
    assert (index.hits, index.lookups, index.cached_tokens) == (3, 4, 9)


def test_untrimmable_caches_only_use_whole_entries() -> None:
    index = PrefixIndex(max_bytes=1000, trimmable=False)
    index.add(1, [1, 2, 3, 4], 10)
    assert index.lookup([1, 2, 3, 9]) is None
    assert index.lookup([1, 2, 3, 4, 5]) == Hit(1, 4)
    # the same prompt again would need the entry cut back by its last token: recurrent state cannot be
    assert index.lookup([1, 2, 3, 4]) is None


def test_least_recently_used_is_evicted_past_the_budget() -> None:
    index = PrefixIndex(max_bytes=25)
    assert index.add(1, [1], 10) == []
    assert index.add(2, [2], 10) == []
    assert index.lookup([1, 5]) == Hit(1, 1)  # 1 is now the most recently used
    assert index.add(3, [3], 10) == [2]
    assert sorted(index.entries) == [1, 3] and index.nbytes == 20


def test_an_entry_bigger_than_the_budget_is_dropped_at_once() -> None:
    index = PrefixIndex(max_bytes=5)
    assert index.add(1, [1, 2], 10) == [1]
    assert len(index) == 0 and index.nbytes == 0


def test_a_longer_conversation_replaces_its_own_prefix() -> None:
    index = PrefixIndex(max_bytes=1000)
    index.add(1, [1, 2, 3], 10)
    index.add(2, [4, 5], 10)
    assert index.add(3, [1, 2, 3, 4], 12) == [1]
    assert sorted(index.entries) == [2, 3] and index.nbytes == 22
