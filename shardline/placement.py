"""Where a model's layers go: a pure function of the model's profile and the nodes' free memory."""

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from shardline.types import LayerRange

HEADROOM = 0.85  # of a node's free memory a shard may take: the KV cache and activations need the rest


@dataclass(frozen=True)
class ModelProfile:
    model_id: str
    num_layers: int
    layer_bytes: int  # one transformer layer's weights (the largest one's, when layer_sizes are known)
    outer_bytes: int  # embeddings, final norm and head: every pipeline rank holds them
    pipeline: bool  # the architecture can be split into layer ranges
    tensor: bool  # the architecture can be split by heads
    num_heads: int = 1
    num_kv_heads: int = 1
    why_not_pipeline: str = ""  # why it cannot, when pipeline is False (capabilities.Support's reason)
    why_not_tensor: str = ""
    # each layer's bytes as stored (packed quantized weights, scales and biases), read from the weight files'
    # headers; empty when they could not be read: then every layer counts as layer_bytes (an estimate)
    layer_sizes: list[int] = field(default_factory=list)

    @property
    def sizes(self) -> list[int]:
        return self.layer_sizes or [self.layer_bytes] * self.num_layers

    @property
    def total_bytes(self) -> int:
        return self.outer_bytes + sum(self.sizes)

    def range_bytes(self, layers: LayerRange) -> int:
        return sum(self.sizes[layers.start : layers.end])

    def why_not(self, strategy: str) -> str:
        why = self.why_not_pipeline if strategy == "pipeline" else self.why_not_tensor
        return why or f"{self.model_id} does not support {strategy} parallelism"

    def heads_divide(self, size: int) -> bool:
        return self.num_heads % size == 0 and self.num_kv_heads % size == 0

    @property
    def heads(self) -> str:
        return f"{self.num_heads} attention heads and {self.num_kv_heads} key/value heads"


@dataclass(frozen=True)
class NodeCapacity:
    node_id: str
    memory_available: int
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class Shard:
    node_id: str
    rank: int
    layers: LayerRange
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class Placement:
    strategy: str  # pipeline | tensor as asked; with auto, also single: whole on one node
    shards: list[Shard] = field(default_factory=list)  # in rank order; rank 0 serves requests
    reason: str = ""  # why this strategy and these nodes, for a person

    @property
    def splits(self) -> list[int]:
        """Layers per rank, in rank order: what mlx-lm's pipeline(group, split) takes."""
        return [s.layers.end - s.layers.start for s in self.shards]


class PlacementError(ValueError):
    """The model cannot be placed; the message says why, in numbers."""


STRATEGIES = ("auto", "pipeline", "tensor")


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def place(
    profile: ModelProfile,
    nodes: list[NodeCapacity],
    strategy: str = "auto",
    pinned: list[str] | None = None,
    draft_bytes: int = 0,
) -> Placement:
    """Where the model goes and why. `auto` picks what the architecture supports and fits: pipeline weighted
    by memory, else tensor where the heads divide, else whole on one node; an explicit strategy the
    architecture lacks still runs whole on one node that holds it. `draft_bytes`: rank 0's node also holds a
    draft model that size (speculative decoding): placed as without it where that node has room for both, else
    placed with that much less room on every node (wherever rank 0 lands, it fits)."""
    placement = place_model(profile, nodes, strategy, pinned)
    if not draft_bytes:
        return placement
    room = {n.node_id: n.memory_available for n in nodes}
    drafting = f"; rank 0's node also holds the draft model ({gib(draft_bytes)})"
    if room[placement.shards[0].node_id] * HEADROOM >= planned_bytes(profile, placement)[0] + draft_bytes:
        return replace(placement, reason=placement.reason + drafting)
    less = [replace(n, memory_available=max(n.memory_available - draft_bytes, 0)) for n in nodes]
    try:
        placement = place_model(profile, less, strategy, pinned)
    except PlacementError as err:
        raise PlacementError(f"{err} (with {gib(draft_bytes)} kept on rank 0's node for the draft model)") from err
    return replace(placement, reason=placement.reason + drafting)


def place_model(profile: ModelProfile, nodes: list[NodeCapacity], strategy: str, pinned: list[str] | None) -> Placement:
    if strategy not in STRATEGIES:
        raise PlacementError(f"unknown strategy {strategy!r}: use auto, pipeline or tensor")
    candidates = choose_nodes(nodes, pinned)
    if strategy == "auto":
        return place_auto(profile, candidates, pinned)
    if not supports(profile, strategy):
        other = "tensor" if strategy == "pipeline" else "pipeline"
        hint = f": try {other}, or auto" if supports(profile, other) else ""
        return whole(profile, candidates, pinned, strategy, profile.why_not(strategy), hint)
    if strategy == "pipeline":
        placement = place_pipeline(profile, candidates)
        return replace(placement, reason=f"pipeline (asked for): {pipeline_reason(placement, candidates)}")
    placement = place_tensor(profile, candidates)
    return replace(placement, reason=f"tensor (asked for): {tensor_reason(profile, placement, candidates)}")


def place_auto(profile: ModelProfile, candidates: list[NodeCapacity], pinned: list[str] | None) -> Placement:
    if profile.pipeline:
        placement = place_pipeline(profile, candidates)
        if len(placement.shards) > 1:
            return replace(placement, reason=f"pipeline: {pipeline_reason(placement, candidates)}")
        why = "the other nodes have too little free memory to take a share of the layers"
        return single(placement.shards[0], one_node(candidates, pinned) or why)
    if profile.tensor:
        placement = place_tensor(profile, candidates)
        if len(placement.shards) > 1:
            reason = f"{profile.why_not('pipeline')}; {tensor_reason(profile, placement, candidates)}"
            return replace(placement, reason=f"tensor: {reason}")
        why = one_node(candidates, pinned) or f"{profile.why_not('pipeline')}; {tensor_blocker(profile, candidates)}"
        return single(placement.shards[0], why)
    return whole(profile, candidates, pinned, "single", f"{profile.why_not('pipeline')}; {profile.why_not('tensor')}")


def supports(profile: ModelProfile, strategy: str) -> bool:
    return profile.pipeline if strategy == "pipeline" else profile.tensor


def one_node(candidates: list[NodeCapacity], pinned: list[str] | None) -> str:
    """Why nothing is split when there is only one node to put it on ("" when there are more)."""
    if len(candidates) > 1:
        return ""
    return "the only node named" if pinned else "the only node online"


def single(shard: Shard, why: str) -> Placement:
    return Placement("single", [shard], f"whole on node {shard.node_id}: {why}")


def pipeline_reason(placement: Placement, candidates: list[NodeCapacity]) -> str:
    used, offered = len(placement.shards), len(candidates)
    of = "" if used == offered else f" of {offered} (the rest are too small for a share)"
    return f"layers weighted by free memory over {used} node{'s' if used > 1 else ''}{of}"


def tensor_reason(profile: ModelProfile, placement: Placement, candidates: list[NodeCapacity]) -> str:
    size = len(placement.shards)
    if size == 1:
        return f"whole on node {placement.shards[0].node_id}: {tensor_blocker(profile, candidates)}"
    return f"its {profile.heads} split over {size} nodes"


def tensor_blocker(profile: ModelProfile, candidates: list[NodeCapacity]) -> str:
    """Why a tensor group larger than one node was not possible."""
    sizes = list(range(2, len(candidates) + 1))
    fitting = [k for k in sizes if profile.heads_divide(k)]
    if not sizes:
        return "there is only one node"
    if not fitting:
        return f"its {profile.heads} do not split evenly over {either(sizes)} nodes"
    only = "" if fitting == sizes else f"its {profile.heads} split evenly over {either(fitting)} nodes only, and "
    return f"{only}no group of {either(fitting)} nodes has room for a share each"


def either(sizes: Iterable[int]) -> str:
    names = [str(k) for k in sizes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def whole(
    profile: ModelProfile,
    candidates: list[NodeCapacity],
    pinned: list[str] | None,
    strategy: str,
    why: str,
    hint: str = "",
) -> Placement:
    """A model that is not split runs whole on one node: the one named, or the roomiest."""
    node = candidates[0]
    if pinned and len(pinned) > 1:
        named = ", ".join(pinned)
        raise PlacementError(f"{profile.model_id} cannot be split over {named}: {why}{hint or '; name one node'}")
    if node.memory_available * HEADROOM < profile.total_bytes:
        raise PlacementError(
            f"{profile.model_id} cannot be split ({why}) and does not fit whole on one node: it needs "
            f"{gib(profile.total_bytes)}, node {node.node_id} has {gib(node.memory_available * HEADROOM)} usable{hint}"
        )
    shard = Shard(node.node_id, 0, LayerRange(0, profile.num_layers), node.host)
    return Placement(strategy, [shard], f"whole on node {node.node_id}: {why}")


def place_again(
    profile: ModelProfile,
    nodes: list[NodeCapacity],
    strategy: str,
    pinned: list[str] | None,
    lost: list[str],
    draft_bytes: int = 0,
) -> Placement:
    """Healing: the nodes just lost are a preference, not a ban (one may be back, and the only one with room);
    an instance pinned to nodes stays on them: on the pinned nodes still there if they hold it, else on all
    of them once they are back. Raises the last PlacementError when nothing fits now."""
    if pinned:
        survivors = [p for p in pinned if p not in lost]
        choices: list[tuple[list[NodeCapacity], list[str] | None]] = [(nodes, survivors), (nodes, pinned)]
        choices = [c for c in choices if c[1]]
    else:
        choices = [([n for n in nodes if n.node_id not in lost], None), (nodes, None)]
    error = PlacementError("no node is online")
    for candidates, pins in choices:
        try:
            return place(profile, candidates, strategy, pins, draft_bytes)
        except PlacementError as err:
            error = err
    raise error


def planned_bytes(profile: ModelProfile, placement: Placement, draft_bytes: int = 0) -> list[int]:
    """What each shard will hold in memory, in rank order (what other placements must not count on); rank 0
    also a draft model of `draft_bytes`."""
    if placement.strategy == "tensor":
        size = len(placement.shards)
        sizes = [profile.outer_bytes + sum(profile.sizes) // size] * size
    else:
        sizes = [profile.outer_bytes + profile.range_bytes(s.layers) for s in placement.shards]
    return [sizes[0] + draft_bytes, *sizes[1:]]


def choose_nodes(nodes: list[NodeCapacity], pinned: list[str] | None) -> list[NodeCapacity]:
    if not pinned:
        if not nodes:
            raise PlacementError("no node is online")
        return sorted(nodes, key=lambda n: (-n.memory_available, n.node_id))
    by_id = {n.node_id: n for n in nodes}
    missing = [p for p in pinned if p not in by_id]
    if missing:
        raise PlacementError(f"nodes not online: {', '.join(missing)}")
    if len(set(pinned)) != len(pinned):
        raise PlacementError("a node is named twice in --nodes")
    return [by_id[p] for p in pinned]


def layer_room(profile: ModelProfile, node: NodeCapacity) -> float:
    return node.memory_available * HEADROOM - profile.outer_bytes


def layer_capacity(profile: ModelProfile, node: NodeCapacity) -> int:
    """Layers of the largest size the node holds: any of its layers fit in that many."""
    return max(0, int(layer_room(profile, node) // max(profile.layer_bytes, 1)))


def place_pipeline(profile: ModelProfile, nodes: list[NodeCapacity]) -> Placement:
    usable = [n for n in nodes if layer_capacity(profile, n) > 0][: profile.num_layers]
    capacities = [layer_capacity(profile, n) for n in usable]
    if sum(capacities) >= profile.num_layers:
        used = [(n, c) for n, c in zip(usable, weighted_split(profile.num_layers, capacities), strict=True) if c > 0]
    elif profile.layer_sizes and (packed := fill_in_order(profile, nodes)) is not None:
        used = packed  # layers of unequal sizes (mixed quantization) that fit only counted one by one
    else:
        room = sum(n.memory_available for n in nodes) * HEADROOM
        sizes = gib(profile.layer_bytes) if not profile.layer_sizes else f"up to {gib(max(profile.sizes))}"
        raise PlacementError(
            f"{profile.model_id} does not fit: it needs {gib(profile.total_bytes)} "
            f"({profile.num_layers} layers of {sizes} plus {gib(profile.outer_bytes)} per node), "
            f"{len(nodes)} node(s) have {gib(room)} usable, room for {sum(capacities)} layers"
        )
    # mlx-lm's pipeline gives rank 0 the last layers; rank 0 also serves, so it is the roomiest node
    shards, end = [], profile.num_layers
    for rank, (node, count) in enumerate(used):
        shards.append(Shard(node.node_id, rank, LayerRange(end - count, end), node.host))
        end -= count
    return Placement("pipeline", shards)


def fill_in_order(profile: ModelProfile, nodes: list[NodeCapacity]) -> list[tuple[NodeCapacity, int]] | None:
    """Each node in turn takes as many of the last layers left as its room holds, by their real sizes; None when
    some are left over. Only when the largest-layer count says it does not fit: the split is not weighted."""
    sizes, end, used = profile.sizes, profile.num_layers, []
    for node in nodes:
        room, start = layer_room(profile, node), end
        while start > 0 and sizes[start - 1] <= room:
            room -= sizes[start - 1]
            start -= 1
        if start < end:
            used.append((node, end - start))
        end = start
    return used if end == 0 else None


def weighted_split(total: int, capacities: list[int]) -> list[int]:
    """`total` layers over nodes in proportion to capacity, none above its capacity (largest remainder)."""
    weight = sum(capacities)
    shares = [total * c / weight for c in capacities]
    counts = [min(int(s), c) for s, c in zip(shares, capacities, strict=True)]
    order = sorted(range(len(capacities)), key=lambda i: (-(shares[i] - counts[i]), i))
    while sum(counts) < total:
        for i in order:
            if sum(counts) < total and counts[i] < capacities[i]:
                counts[i] += 1
    return counts


def place_tensor(profile: ModelProfile, nodes: list[NodeCapacity]) -> Placement:
    """The largest group of the roomiest nodes (or those named, in order) that the heads divide and that
    holds a share each; a group of one is the model whole on one node."""
    for size in range(len(nodes), 0, -1):
        if not profile.heads_divide(size):
            continue
        group = nodes[:size]
        per_node = profile.outer_bytes + sum(profile.sizes) / size
        if all(n.memory_available * HEADROOM >= per_node for n in group):
            full = LayerRange(0, profile.num_layers)
            return Placement("tensor", [Shard(n.node_id, r, full, n.host) for r, n in enumerate(group)])
    roomiest = nodes[0]
    raise PlacementError(
        f"{profile.model_id} does not fit with tensor parallelism: it needs {gib(profile.total_bytes)}; "
        f"{tensor_blocker(profile, nodes)}, and it does not fit whole on node {roomiest.node_id} "
        f"({gib(roomiest.memory_available * HEADROOM)} usable)"
    )
