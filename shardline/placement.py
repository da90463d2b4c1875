"""Where a model's layers go: a pure function of the model's profile and the nodes' free memory."""

from dataclasses import dataclass, field

from shardline.types import LayerRange

HEADROOM = 0.85  # of a node's free memory a shard may take: the KV cache and activations need the rest


@dataclass(frozen=True)
class ModelProfile:
    model_id: str
    num_layers: int
    layer_bytes: int  # one transformer layer's weights
    outer_bytes: int  # embeddings, final norm and head: every pipeline rank holds them
    pipeline: bool  # mlx-lm's model.model.pipeline(group, split)
    tensor: bool  # mlx-lm's model.shard(group)
    num_heads: int = 1
    num_kv_heads: int = 1

    @property
    def total_bytes(self) -> int:
        return self.outer_bytes + self.layer_bytes * self.num_layers


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
    strategy: str  # pipeline | tensor
    shards: list[Shard] = field(default_factory=list)  # in rank order; rank 0 serves requests

    @property
    def splits(self) -> list[int]:
        """Layers per rank, in rank order: what mlx-lm's pipeline(group, split) takes."""
        return [s.layers.end - s.layers.start for s in self.shards]


class PlacementError(ValueError):
    """The model cannot be placed; the message says why, in numbers."""


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def place(
    profile: ModelProfile, nodes: list[NodeCapacity], strategy: str = "pipeline", pinned: list[str] | None = None
) -> Placement:
    candidates = choose_nodes(nodes, pinned)
    if strategy not in ("pipeline", "tensor"):
        raise PlacementError(f"unknown strategy {strategy!r}: use pipeline or tensor")
    if not (profile.pipeline if strategy == "pipeline" else profile.tensor):
        if whole := unsplit(profile, candidates, strategy, pinned):
            return whole
        other = "tensor" if strategy == "pipeline" else "pipeline"
        raise PlacementError(f"{profile.model_id} does not support {strategy} parallelism in mlx-lm: try {other}")
    return place_pipeline(profile, candidates) if strategy == "pipeline" else place_tensor(profile, candidates)


def place_again(
    profile: ModelProfile,
    nodes: list[NodeCapacity],
    strategy: str,
    pinned: list[str] | None,
    lost: list[str],
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
            return place(profile, candidates, strategy, pins)
        except PlacementError as err:
            error = err
    raise error


def planned_bytes(profile: ModelProfile, placement: Placement) -> list[int]:
    """What each shard will hold in memory, in rank order (what other placements must not count on)."""
    if placement.strategy == "tensor":
        size = len(placement.shards)
        return [profile.outer_bytes + profile.layer_bytes * profile.num_layers // size] * size
    return [profile.outer_bytes + profile.layer_bytes * (s.layers.end - s.layers.start) for s in placement.shards]


def unsplit(
    profile: ModelProfile, candidates: list[NodeCapacity], strategy: str, pinned: list[str] | None
) -> Placement | None:
    """A model mlx-lm cannot split this way still runs whole on one node: the one named, or the roomiest."""
    node = candidates[0]
    if (pinned and len(pinned) > 1) or node.memory_available * HEADROOM < profile.total_bytes:
        return None
    return Placement(strategy, [Shard(node.node_id, 0, LayerRange(0, profile.num_layers), node.host)])


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


def layer_capacity(profile: ModelProfile, node: NodeCapacity) -> int:
    room = node.memory_available * HEADROOM - profile.outer_bytes
    return max(0, int(room // max(profile.layer_bytes, 1)))


def place_pipeline(profile: ModelProfile, nodes: list[NodeCapacity]) -> Placement:
    usable = [n for n in nodes if layer_capacity(profile, n) > 0][: profile.num_layers]
    capacity = sum(layer_capacity(profile, n) for n in usable)
    if capacity < profile.num_layers:
        room = sum(n.memory_available for n in nodes) * HEADROOM
        raise PlacementError(
            f"{profile.model_id} does not fit: it needs {gib(profile.total_bytes)} "
            f"({profile.num_layers} layers of {gib(profile.layer_bytes)} plus {gib(profile.outer_bytes)} per node), "
            f"{len(nodes)} node(s) have {gib(room)} usable, room for {capacity} layers"
        )
    counts = weighted_split(profile.num_layers, [layer_capacity(profile, n) for n in usable])
    used = [(n, c) for n, c in zip(usable, counts, strict=True) if c > 0]
    # mlx-lm's pipeline gives rank 0 the last layers; rank 0 also serves, so it is the roomiest node
    shards, end = [], profile.num_layers
    for rank, (node, count) in enumerate(used):
        shards.append(Shard(node.node_id, rank, LayerRange(end - count, end), node.host))
        end -= count
    return Placement("pipeline", shards)


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
    for size in range(len(nodes), 0, -1):
        if profile.num_heads % size or profile.num_kv_heads % size:
            continue  # heads must split evenly over the group
        group = nodes[:size]
        per_node = profile.outer_bytes + profile.layer_bytes * profile.num_layers / size
        if all(n.memory_available * HEADROOM >= per_node for n in group):
            full = LayerRange(0, profile.num_layers)
            return Placement("tensor", [Shard(n.node_id, r, full, n.host) for r, n in enumerate(group)])
    raise PlacementError(
        f"{profile.model_id} does not fit with tensor parallelism: it needs {gib(profile.total_bytes)} "
        f"and its {profile.num_heads} heads / {profile.num_kv_heads} KV heads limit the group sizes"
    )
