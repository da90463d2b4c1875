"""The pure parts of splitting a layer stack: where the list is, which cache a skipped layer reads."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache

from shardline.engine.pipeline import Borrowed, Skip, Split, borrow_plan, cache_kind, find_stack
from shardline.types import LayerRange


class Block(nn.Module):
    def __init__(self, sliding: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.use_sliding = sliding


class Inner(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.layers = [Block(i % 2 == 0) for i in range(n)]


class Outer(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.model = Inner(n)
        self.heads = [nn.Linear(4, 4) for _ in range(2)]


def test_the_stack_is_the_shallowest_list_of_as_many_modules_as_layers() -> None:
    model = Outer(2)
    owner, name = find_stack(model, 2)
    assert owner is model.model and name == "layers"  # not the two heads, which are shallower but not layers
    owner, name = find_stack(Outer(5), 5)
    assert name == "layers"
    with pytest.raises(ValueError, match="no list of 3 layers"):
        find_stack(model, 3)


def test_a_skipped_layer_keeps_plain_attributes_and_no_weights() -> None:
    skip = Skip(Block(sliding=True))
    assert skip.use_sliding is True
    assert skip.parameters() == {}
    x = mx.ones((1, 2, 4))
    assert skip(x, None, cache=None) is x


def split_of(kinds: list[tuple], layers: LayerRange) -> Split:
    return Split(0, 2, layers, len(kinds), None, kinds, list)  # type: ignore[arg-type]


def test_skipped_layers_read_the_nearest_own_cache_of_their_kind() -> None:
    local, full = cache_kind(RotatingKVCache(max_size=8)), cache_kind(KVCache())
    kinds = [local, local, full] * 2
    plan = borrow_plan(split_of(kinds, LayerRange(3, 6)))  # own: local, local, full
    assert plan == [(3, True), (3, True), (5, True), (3, True), (4, True), (5, True)]
    plan = borrow_plan(split_of(kinds, LayerRange(0, 2)))  # own: two local layers, no full one
    assert plan[2] == (1, False) and plan[5] == (1, False)


def test_a_borrowed_cache_of_another_kind_gives_no_mask() -> None:
    source = KVCache()
    source.update_and_fetch(mx.zeros((1, 1, 3, 2)), mx.zeros((1, 1, 3, 2)))
    same, other = Borrowed(source, same_kind=True), Borrowed(source, same_kind=False)
    assert same.offset == other.offset == 3
    assert same.make_mask(2, return_array=True, window_size=None) is not None
    assert other.make_mask(2, return_array=True, window_size=4) is None


def test_cache_kinds_tell_windows_and_recurrent_state_apart() -> None:
    kinds = {cache_kind(RotatingKVCache(max_size=8)), cache_kind(RotatingKVCache(max_size=16)), cache_kind(KVCache()),
             cache_kind(ArraysCache(2))}  # fmt: skip
    assert len(kinds) == 4
