import itertools

import pytest

from shardline.placement import (
    HEADROOM,
    ModelProfile,
    NodeCapacity,
    PlacementError,
    place,
    place_again,
    planned_bytes,
    weighted_split,
)  # fmt: skip
from shardline.types import LayerRange

GiB = 2**30


def profile(layers: int = 8, layer_gib: float = 1.0, outer_gib: float = 0.5, **kw: object) -> ModelProfile:
    return ModelProfile("o/m", layers, int(layer_gib * GiB), int(outer_gib * GiB), pipeline=True, tensor=True,
                        num_heads=kw.pop("heads", 8), num_kv_heads=kw.pop("kv", 4), **kw)  # type: ignore[arg-type]  # fmt: skip


def nodes(*gib: float) -> list[NodeCapacity]:
    return [NodeCapacity(f"n{i}", int(g * GiB)) for i, g in enumerate(gib)]


def covers_all(p: list, layers: int) -> None:  # type: ignore[type-arg]
    ranges = sorted((s.layers.start, s.layers.end) for s in p)
    assert ranges[0][0] == 0 and ranges[-1][1] == layers
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def test_even_nodes_get_even_split_and_rank0_has_the_last_layers() -> None:
    p = place(profile(), nodes(10, 10))
    assert p.splits == [4, 4] and p.shards[0].layers.end == 8 and p.shards[1].layers.start == 0
    covers_all(p.shards, 8)


def test_uneven_memory_gets_weighted_split() -> None:
    p = place(profile(layers=12), nodes(4, 16, 8))
    by_node = {s.node_id: s.layers.end - s.layers.start for s in p.shards}
    assert by_node["n1"] > by_node["n2"] > by_node["n0"] and sum(by_node.values()) == 12
    assert p.shards[0].node_id == "n1"  # the roomiest node serves
    covers_all(p.shards, 12)


@pytest.mark.parametrize("layers", [1, 2, 3, 7, 32, 61])
@pytest.mark.parametrize("memory", [(100,), (50, 50), (3, 90, 7), (10, 10, 10, 10, 10), (80, 1.0)])
def test_every_layer_placed_once_within_capacity(layers: int, memory: tuple[float, ...]) -> None:
    prof = profile(layers=layers, layer_gib=0.5)
    p = place(prof, nodes(*memory))
    covers_all(p.shards, layers)
    assert len(p.shards) <= layers
    for shard in p.shards:
        node = next(n for n in nodes(*memory) if n.node_id == shard.node_id)
        used = prof.outer_bytes + prof.layer_bytes * (shard.layers.end - shard.layers.start)
        assert used <= node.memory_available * HEADROOM


def test_too_large_is_refused_with_numbers() -> None:
    with pytest.raises(PlacementError, match=r"does not fit: it needs 8.50 GiB"):
        place(profile(), nodes(2, 3))


def test_node_without_room_for_one_layer_is_left_out() -> None:
    p = place(profile(layers=4), nodes(20, 0.6))
    assert [s.node_id for s in p.shards] == ["n0"]


def test_pinned_nodes_keep_their_order_and_must_be_online() -> None:
    p = place(profile(), nodes(10, 10, 10), pinned=["n2", "n0"])
    assert [s.node_id for s in p.shards] == ["n2", "n0"]
    with pytest.raises(PlacementError, match="not online: ghost"):
        place(profile(), nodes(10), pinned=["ghost"])


def test_tensor_group_respects_head_divisibility_and_memory() -> None:
    p = place(profile(heads=8, kv=2), nodes(10, 10, 10), strategy="tensor")
    assert p.strategy == "tensor" and len(p.shards) == 2  # 3 does not divide 2 KV heads
    assert all((s.layers.start, s.layers.end) == (0, 8) for s in p.shards)
    with pytest.raises(PlacementError, match="tensor parallelism"):
        place(profile(), nodes(2, 2), strategy="tensor")


def test_unsupported_strategy_is_refused() -> None:
    no_pipe = ModelProfile("o/llama", 4, GiB, GiB, pipeline=False, tensor=True)
    with pytest.raises(PlacementError, match="does not support pipeline"):
        place(no_pipe, nodes(100, 100), pinned=["n0", "n1"])  # asked to split it
    with pytest.raises(PlacementError, match="does not support pipeline"):
        place(no_pipe, nodes(4, 4))  # it would have to be split
    with pytest.raises(PlacementError, match="unknown strategy"):
        place(profile(), nodes(100), strategy="diagonal")


def test_weighted_split_respects_caps() -> None:
    assert weighted_split(10, [100, 1]) == [10, 0]  # a tiny node is not worth a network hop
    assert weighted_split(10, [8, 100]) == [1, 9]
    assert weighted_split(5, [2, 2, 2]) in ([2, 2, 1], [2, 1, 2], [1, 2, 2])
    assert sum(weighted_split(7, [3, 3, 3])) == 7


def test_a_model_that_cannot_be_split_runs_whole_on_one_node() -> None:
    no_pipe = ModelProfile("o/llama", 4, GiB, GiB, pipeline=False, tensor=True)
    roomiest = place(no_pipe, nodes(8, 100, 50))
    assert [(s.node_id, s.layers) for s in roomiest.shards] == [("n1", LayerRange(0, 4))]
    named = place(no_pipe, nodes(8, 100), pinned=["n0"])
    assert [(s.node_id, s.rank, s.layers) for s in named.shards] == [("n0", 0, LayerRange(0, 4))]


def test_healing_prefers_the_nodes_still_there_but_may_use_a_lost_one_that_is_back() -> None:
    online = nodes(10, 10, 10)
    p = place_again(profile(layers=4), online, "pipeline", None, lost=["n0"])
    assert "n0" not in {s.node_id for s in p.shards}
    # only the lost node has room: it came back, and it is used rather than failing
    again = place_again(profile(layers=4), nodes(10, 0.1), "pipeline", None, lost=["n0"])
    assert [s.node_id for s in again.shards] == ["n0"]


def test_healing_a_pinned_instance_never_leaves_its_nodes() -> None:
    online = nodes(10, 10, 10)
    survivors = place_again(profile(layers=4), online, "pipeline", ["n0", "n1"], lost=["n1"])
    assert {s.node_id for s in survivors.shards} == {"n0"}  # the pinned node still there holds it
    with pytest.raises(PlacementError, match="nodes not online: n1"):
        # n0 cannot hold it alone and n1 is gone: wait for n1 rather than move to n2
        place_again(profile(layers=8), [NodeCapacity("n0", 5 * GiB), NodeCapacity("n2", 50 * GiB)], "pipeline",
                    ["n0", "n1"], lost=["n1"])  # fmt: skip
    with pytest.raises(PlacementError, match="nodes not online: n0"):
        place_again(profile(layers=4), nodes(10, 10)[1:], "pipeline", ["n0"], lost=["n0"])


def test_planned_bytes_per_shard() -> None:
    prof = profile(layers=8)
    p = place(prof, nodes(10, 10))
    assert planned_bytes(prof, p) == [int(0.5 * GiB) + 4 * GiB] * 2
    t = place(prof, nodes(10, 10), "tensor")
    assert planned_bytes(prof, t) == [int(0.5 * GiB) + 4 * GiB] * 2
