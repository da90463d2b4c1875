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
    with pytest.raises(PlacementError, match="does not support pipeline parallelism: try tensor, or auto"):
        place(no_pipe, nodes(100, 100), "pipeline", pinned=["n0", "n1"])  # asked to split it
    with pytest.raises(PlacementError, match="does not support pipeline"):
        place(no_pipe, nodes(4, 4), "pipeline")  # it would have to be split
    with pytest.raises(PlacementError, match="unknown strategy"):
        place(profile(), nodes(100), strategy="diagonal")


def test_weighted_split_respects_caps() -> None:
    assert weighted_split(10, [100, 1]) == [10, 0]  # a tiny node is not worth a network hop
    assert weighted_split(10, [8, 100]) == [1, 9]
    assert weighted_split(5, [2, 2, 2]) in ([2, 2, 1], [2, 1, 2], [1, 2, 2])
    assert sum(weighted_split(7, [3, 3, 3])) == 7


def test_a_model_that_cannot_be_split_runs_whole_on_one_node() -> None:
    no_pipe = ModelProfile("o/llama", 4, GiB, GiB, pipeline=False, tensor=True)
    roomiest = place(no_pipe, nodes(8, 100, 50), "pipeline")
    assert [(s.node_id, s.layers) for s in roomiest.shards] == [("n1", LayerRange(0, 4))]
    assert (roomiest.strategy, roomiest.reason) == ("pipeline", "whole on node n1: o/llama does not support pipeline "
                                                                "parallelism")  # fmt: skip
    named = place(no_pipe, nodes(8, 100), "pipeline", pinned=["n0"])
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


NO_PIPE = "model type 'x' does not support pipeline parallelism"
NO_TENSOR = "model type 'x' does not support tensor parallelism"


def arch(pipeline: bool, tensor: bool, heads: int = 8, kv: int = 4, layers: int = 8) -> ModelProfile:
    """8 layers of 1 GiB and 0.5 GiB outside them (8.5 GiB whole), split the ways the architecture allows."""
    why_not = {"why_not_pipeline": "" if pipeline else NO_PIPE, "why_not_tensor": "" if tensor else NO_TENSOR}
    return ModelProfile("o/m", layers, GiB, GiB // 2, pipeline, tensor, heads, kv, **why_not)


@pytest.mark.parametrize(
    ("ways", "heads", "memory", "pinned", "strategy", "used", "reason"),
    [
        ((True, True), (8, 4), (12, 12, 12), None, "pipeline", 3,
         "pipeline: layers weighted by free memory over 3 nodes"),
        ((True, False), (9, 3), (12, 12), None, "pipeline", 2, "pipeline: layers weighted by free memory over 2 nodes"),
        ((True, True), (8, 4), (12, 12, 0.5), None, "pipeline", 2,
         "pipeline: layers weighted by free memory over 2 nodes of 3 (the rest are too small for a share)"),
        ((True, True), (8, 4), (12,), None, "single", 1, "whole on node n0: the only node online"),
        ((True, True), (8, 4), (12, 12), ["n1"], "single", 1, "whole on node n1: the only node named"),
        ((True, True), (8, 4), (64, 1.2), None, "single", 1,
         "whole on node n0: the other nodes have too little free memory to take a share of the layers"),
        ((False, True), (8, 4), (12, 12, 12), None, "tensor", 2,
         f"tensor: {NO_PIPE}; its 8 attention heads and 4 key/value heads split over 2 nodes"),
        ((False, True), (9, 3), (12, 12, 12), None, "tensor", 3,
         f"tensor: {NO_PIPE}; its 9 attention heads and 3 key/value heads split over 3 nodes"),
        ((False, True), (9, 3), (12, 12), None, "single", 1,
         f"whole on node n0: {NO_PIPE}; its 9 attention heads and 3 key/value heads do not split evenly over 2 nodes"),
        ((False, True), (8, 4), (12, 4), None, "single", 1,
         f"whole on node n0: {NO_PIPE}; no group of 2 nodes has room for a share each"),
        ((False, True), (9, 3), (12, 12,), ["n1"], "single", 1, "whole on node n1: the only node named"),
        ((False, False), (8, 4), (4, 12, 12), None, "single", 1, f"whole on node n1: {NO_PIPE}; {NO_TENSOR}"),
        ((False, False), (8, 4), (12,), None, "single", 1, f"whole on node n0: {NO_PIPE}; {NO_TENSOR}"),
    ],
)  # fmt: skip
def test_auto_picks_what_the_architecture_supports_and_fits(
    ways: tuple[bool, bool],
    heads: tuple[int, int],
    memory: tuple[float, ...],
    pinned: list[str] | None,
    strategy: str,
    used: int,
    reason: str,
) -> None:
    prof = arch(*ways, *heads)
    p = place(prof, nodes(*memory), pinned=pinned)  # no strategy: auto
    assert (p.strategy, len(p.shards), p.reason) == (strategy, used, reason)
    if strategy == "pipeline":
        covers_all(p.shards, prof.num_layers)
    else:
        assert all(s.layers == LayerRange(0, prof.num_layers) for s in p.shards)
    for shard, planned in zip(p.shards, planned_bytes(prof, p), strict=True):
        assert planned <= dict((n.node_id, n.memory_available) for n in nodes(*memory))[shard.node_id] * HEADROOM


@pytest.mark.parametrize(
    ("ways", "heads", "memory", "pinned", "message"),
    [
        ((True, True), (8, 4), (4, 4), None, "o/m does not fit: it needs 8.50 GiB"),
        ((False, False), (8, 4), (8, 8), None,
         f"o/m cannot be split ({NO_PIPE}; {NO_TENSOR}) and does not fit whole on one node: it needs 8.50 GiB, "
         "node n0 has 6.80 GiB usable"),
        ((False, False), (8, 4), (12, 12), ["n0", "n1"], f"o/m cannot be split over n0, n1: {NO_PIPE}; {NO_TENSOR}"),
        ((False, True), (9, 3), (8, 8), None,
         "o/m does not fit with tensor parallelism: it needs 8.50 GiB; its 9 attention heads and 3 key/value heads "
         "do not split evenly over 2 nodes, and it does not fit whole on node n0 (6.80 GiB usable)"),
        ((False, True), (6, 2), (4, 4, 4), None,
         "o/m does not fit with tensor parallelism: it needs 8.50 GiB; its 6 attention heads and 2 key/value heads "
         "split evenly over 2 nodes only, and no group of 2 nodes has room for a share each, and it does not fit "
         "whole on node n0 (3.40 GiB usable)"),
    ],
)  # fmt: skip
def test_auto_refuses_what_fits_no_way_saying_why(
    ways: tuple[bool, bool], heads: tuple[int, int], memory: tuple[float, ...], pinned: list[str] | None, message: str
) -> None:
    with pytest.raises(PlacementError) as refused:
        place(arch(*ways, *heads), nodes(*memory), pinned=pinned)
    assert str(refused.value).startswith(message), str(refused.value)


def test_an_explicit_strategy_is_honoured_and_says_so() -> None:
    prof = arch(True, True)
    p = place(prof, nodes(12, 12), "pipeline")
    assert (p.strategy, p.reason) == ("pipeline", "pipeline (asked for): layers weighted by free memory over 2 nodes")
    t = place(prof, nodes(12, 12, 12), "tensor")
    assert (t.strategy, len(t.shards)) == ("tensor", 2)
    assert t.reason == "tensor (asked for): its 8 attention heads and 4 key/value heads split over 2 nodes"
    # tensor asked for a model whose heads divide by no group size: whole on one node when it fits there ...
    odd = place(arch(True, True, heads=9, kv=3), nodes(12, 12), "tensor")
    assert (odd.strategy, len(odd.shards)) == ("tensor", 1)
    assert odd.reason == ("tensor (asked for): whole on node n0: its 9 attention heads and 3 key/value heads "
                          "do not split evenly over 2 nodes")  # fmt: skip
    # ... else refused before anything is downloaded, naming the head counts
    with pytest.raises(PlacementError, match="its 9 attention heads and 3 key/value heads do not split evenly over 2"):
        place(arch(True, True, heads=9, kv=3), nodes(8, 8), "tensor")
    # an architecture that cannot do what was asked runs whole, as asked-for strategy, with the reason
    no_pipe = place(arch(False, True), nodes(12, 4), "pipeline")
    assert (no_pipe.strategy, no_pipe.reason) == ("pipeline", f"whole on node n0: {NO_PIPE}")


def exact(layer_mib: list[int], outer_mib: int = 512) -> ModelProfile:
    """A profile whose layers' sizes were read from the weights' headers (mixed-bit quantization)."""
    sizes = [m << 20 for m in layer_mib]
    return ModelProfile("o/q", len(sizes), max(sizes), outer_mib << 20, True, True, 8, 4, layer_sizes=sizes)


def test_planned_bytes_count_each_ranks_real_layers() -> None:
    prof = exact([600, 300, 300, 300, 300, 300, 300, 600])  # 8-bit first and last layers, 4-bit between
    assert prof.total_bytes == (512 + 3000) << 20
    p = place(prof, nodes(10, 10), "pipeline")
    assert p.splits == [4, 4]
    assert planned_bytes(prof, p) == [(512 + 1500) << 20, (512 + 1500) << 20]
    t = place(prof, nodes(10, 10), "tensor")
    assert planned_bytes(prof, t) == [(512 + 1500) << 20] * 2


def test_layers_of_unequal_sizes_that_fit_only_counted_one_by_one() -> None:
    prof = exact([900, 300, 300, 300, 300, 300, 300, 300])
    # room for layers: 2.0 GiB * 0.85 - 0.5 GiB = 1228 MiB per node; 1200 + 1200 + 900 + 300 = 3600 MiB to hold
    memory = (2.0, 2.0, 2.0)
    p = place(prof, nodes(*memory), "pipeline")
    covers_all(p.shards, 8)
    assert all(b <= 2.0 * GiB * HEADROOM for b in planned_bytes(prof, p))
    with pytest.raises(PlacementError, match=r"8 layers of up to 0.88 GiB"):
        place(prof, nodes(2.0, 2.0))


@pytest.mark.parametrize("memory", [(100,), (6, 6), (3, 9, 5), (2.5, 2.5, 2.5, 2.5), (40, 1.0)])
def test_no_rank_holds_more_than_its_room_with_real_sizes(memory: tuple[float, ...]) -> None:
    prof = exact([700, 250, 250, 500, 250, 250, 250, 700, 250, 250])
    p = place(prof, nodes(*memory), "pipeline")
    covers_all(p.shards, 10)
    room = {n.node_id: n.memory_available * HEADROOM for n in nodes(*memory)}
    for shard, planned in zip(p.shards, planned_bytes(prof, p), strict=True):
        assert planned == prof.outer_bytes + sum(prof.layer_sizes[shard.layers.start : shard.layers.end])
        assert planned <= room[shard.node_id]


def test_equal_sizes_read_from_headers_place_as_the_estimate_did() -> None:
    estimate = profile(layers=12)
    read = ModelProfile("o/m", 12, GiB, GiB // 2, True, True, 8, 4, layer_sizes=[GiB] * 12)
    for memory in [(4, 16, 8), (10, 10), (9, 9, 0.5)]:
        assert place(estimate, nodes(*memory), "pipeline") == place(read, nodes(*memory), "pipeline")


@pytest.mark.parametrize("strategy", ["auto", "pipeline", "tensor"])
@pytest.mark.parametrize("memory", [(10, 10), (6, 6), (5.6, 5.6), (20, 4.5), (4.8, 20), (5.2, 5.2)])
def test_rank_0_s_node_has_room_for_the_draft_model_too(strategy: str, memory: tuple[float, ...]) -> None:
    """A draft model of 1 GiB (speculative decoding) beside rank 0's share: placed as without it where rank 0's node
    has room for both, elsewise with that room kept on every node; refused, saying so, where only the draft model
    keeps it from fitting."""
    prof, draft = profile(layers=8), GiB
    try:
        plain = place(prof, nodes(*memory), strategy)
    except PlacementError:
        with pytest.raises(PlacementError):
            place(prof, nodes(*memory), strategy, draft_bytes=draft)
        return
    try:
        p = place(prof, nodes(*memory), strategy, draft_bytes=draft)
    except PlacementError as err:
        assert "kept on rank 0's node for the draft model" in str(err)
        return
    room = {n.node_id: n.memory_available for n in nodes(*memory)}
    sizes = planned_bytes(prof, p, draft)
    assert sizes[0] == planned_bytes(prof, p)[0] + draft and sizes[1:] == planned_bytes(prof, p)[1:]
    for shard, size in zip(p.shards, sizes, strict=True):
        assert size <= room[shard.node_id] * HEADROOM, (shard, size)
    assert p.reason.endswith("; rank 0's node also holds the draft model (1.00 GiB)")
    if memory == (10, 10):
        assert p.shards == plain.shards  # room for both: placed as without it
