"""Pipeline parallelism for any mlx-lm model with a layer stack, without mlx-lm's PipelineMixin.

The layer list keeps its length: the layers other ranks run become `Skip` stand-ins that hold no
weights and pass their input through, so every index a model computes over its layers (Gemma 3's
local/global pattern, GPT-OSS's layer types, Qwen3-Next's linear/full attention) means what it
means in the whole model, with no per-architecture patch. This rank's first layer receives the
hidden state from the rank before it, its last sends it on, and after the stack's last layer every
rank gathers rank 0's output (rank 0 runs the last layers), so every rank computes the same logits.

Each rank makes caches for its own layers only. When the model runs, its cache argument is widened
back to one entry per layer: a skipped layer's entry stands in with the cache of this rank's nearest
layer of the same kind (same offset, same masks), so masks built from any index come out right.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, can_trim_prompt_cache, make_prompt_cache

from shardline.types import LayerRange


class Skip(nn.Module):
    """A layer another rank runs: no weights, the hidden state passes through. It keeps the layer's plain
    attributes (use_sliding, is_linear, layer_type...): models read them in their loop over the layers."""

    def __init__(self, layer: nn.Module | None = None) -> None:
        super().__init__()
        for name, value in vars(layer).items() if layer is not None else ():
            if not isinstance(value, (mx.array, nn.Module)):
                object.__setattr__(self, name, value)

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        return x


@dataclass
class Split:
    """One rank's share of the stack, and the caches of the forward pass running now."""

    rank: int
    size: int
    layers: LayerRange
    num_layers: int
    group: mx.distributed.Group
    kinds: list[tuple]  # every layer's cache kind, in the whole model
    full_caches: Callable[[], list[Any]]  # the whole model's caches (what a one-rank model would make)
    widened: list[Any] = field(default_factory=list)
    overlapped: bool = False  # no gather after the last layer: only rank 0's logits are real (overlap.py)
    sent: mx.array | None = None  # what this rank's last layer sent in the forward pass built last

    def own(self, index: int) -> bool:
        return index in self.layers


class Stage(nn.Module):
    """One of this rank's layers at an edge of its slice, or the stack's last layer (gathering)."""

    def __init__(self, layer: nn.Module, index: int, split: Split, *, receive: bool, send: bool, gather: bool):
        super().__init__()
        self.layer = layer
        self.index = index
        self.receive, self.send, self.gather = receive, send, gather
        object.__setattr__(self, "split", split)  # not a child module: no parameters of its own

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        split = self.split
        if self.receive:  # the rank holding the layers before ours is rank + 1
            x = mx.distributed.recv_like(x, split.rank + 1, group=split.group)
        h = self.layer(x, *args, **kwargs)
        if self.send:
            h = mx.distributed.send(h, split.rank - 1, group=split.group)
            split.sent = h
            tie(split.widened[self.index] if split.widened else None, h)
        if self.gather and not split.overlapped:
            h = mx.distributed.all_gather(h, group=split.group)[: h.shape[0]]
        return h

    def __getattr__(self, name: str) -> Any:
        # models read attributes of their layers (use_sliding, is_linear, layer_type...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.get("layer")
            if layer is None:
                raise
            return getattr(layer, name)


def tie(cache: Any, sent: mx.array) -> None:
    """Make this layer's cache depend on the send, so evaluating the caches (a prefill chunk whose logits
    nobody reads) still sends; a cache with nowhere to hang it gets the send evaluated now."""
    while cache is not None and hasattr(cache, "caches"):
        cache = cache.caches[0] if cache.caches else None
    if cache is not None and getattr(cache, "keys", None) is not None:
        cache.keys = mx.depends(cache.keys, sent)
        return
    slots = getattr(cache, "cache", None)
    if isinstance(slots, list):
        for i, value in enumerate(slots):
            if isinstance(value, mx.array):
                slots[i] = mx.depends(value, sent)
                return
    mx.eval(sent)


def cache_kind(cache: Any) -> tuple:
    """Caches of one kind see the same tokens and build the same masks."""
    if hasattr(cache, "caches"):
        return ("list", *(cache_kind(c) for c in cache.caches))
    return (type(cache).__name__, getattr(cache, "max_size", None), getattr(cache, "keep", None))


class Borrowed:
    """A skipped layer's cache entry: reads (offset, masks) come from a cache of this rank of the same kind.
    With none of that kind here, no layer of this rank uses what it gives, so it gives no mask."""

    def __init__(self, source: Any, same_kind: bool) -> None:
        self._source = source
        self._same_kind = same_kind

    def __getattr__(self, name: str) -> Any:
        if name == "make_mask" and not self._same_kind:
            return lambda *args, **kwargs: None
        return getattr(self._source, name)

    def __bool__(self) -> bool:
        return bool(self._source)


LAYER_LISTS = ("layers", "h", "blocks")


def find_stack(model: nn.Module, num_layers: int) -> tuple[nn.Module, str]:
    """The module holding the model's list of `num_layers` layers, and that list's attribute name: the list
    `model.layers` gives where it is one, else the shallowest list named like a layer stack, else the shallowest."""
    found: list[tuple[nn.Module, str]] = []
    frontier: list[nn.Module] = [model]
    while frontier:
        following: list[nn.Module] = []
        for module in frontier:
            for name, child in module.children().items():
                if (
                    isinstance(child, list)
                    and len(child) == num_layers
                    and all(isinstance(c, nn.Module) for c in child)
                ):
                    found.append((module, name))
                if isinstance(child, nn.Module):
                    following.append(child)
                elif isinstance(child, (list, tuple)):
                    following += [c for c in child if isinstance(c, nn.Module)]
                elif isinstance(child, dict):
                    following += [c for c in child.values() if isinstance(c, nn.Module)]
        frontier = following
    if not found:
        raise ValueError(f"no list of {num_layers} layers in the model")
    try:
        named = model.layers
    except (AttributeError, TypeError, IndexError):
        named = None
    return next((f for f in found if f[0][f[1]] is named), next((f for f in found if f[1] in LAYER_LISTS), found[0]))


def pipeline_problem(model: nn.Module, num_layers: int) -> str | None:
    """Why this model cannot be pipelined here, or None."""
    try:
        owner, _ = find_stack(model, num_layers)
    except ValueError as exc:
        return str(exc)
    if "cache" not in inspect.signature(type(owner).__call__).parameters:
        return f"{type(owner).__name__} takes no cache argument"
    caches = make_prompt_cache(model)
    if len(caches) != num_layers:
        return f"its {len(caches)} caches do not map one to one onto its {num_layers} layers"
    return None


def split_pipeline(
    model: nn.Module, num_layers: int, layers: LayerRange, rank: int, size: int, group: mx.distributed.Group
) -> Split:
    """Keep only `layers` of the model's stack on this rank (call before the weights are evaluated: the
    other layers' weights are never read)."""
    problem = pipeline_problem(model, num_layers)
    if problem:
        raise ValueError(f"cannot pipeline this model: {problem}")
    owner, name = find_stack(model, num_layers)
    original = type(model).make_cache if hasattr(model, "make_cache") else None
    full_caches = (lambda: original(model)) if original else (lambda: [KVCache() for _ in range(num_layers)])
    split = Split(rank, size, layers, num_layers, group, [cache_kind(c) for c in full_caches()], full_caches)
    stack = list(owner[name])
    out: list[nn.Module] = []
    for index, layer in enumerate(stack):
        first, last = index == layers.start, index == layers.end - 1
        gather = index == num_layers - 1
        if index in layers:
            receive, send = first and rank < size - 1, last and rank > 0
            out.append(Stage(layer, index, split, receive=receive, send=send, gather=gather) if (
                receive or send or gather) else layer)  # fmt: skip
        else:
            skip = Skip(layer)
            out.append(Stage(skip, index, split, receive=False, send=False, gather=True) if gather else skip)
    owner[name] = out
    widen_cache_argument(owner, split)
    own_caches(model, split)
    return split


def widen_cache_argument(owner: nn.Module, split: Split) -> None:
    """The stack's owner gets this rank's caches and runs its loop over every layer with one entry each."""
    cls = type(owner)
    call = cls.__call__
    signature = inspect.signature(call)
    sources = borrow_plan(split)

    def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        caches = bound.arguments.get("cache")
        if caches is not None:
            mine = dict(zip(range(split.layers.start, split.layers.end), caches, strict=True))
            widened = [mine[i] if i in mine else Borrowed(mine[j], same) for i, (j, same) in enumerate(sources)]
            split.widened = widened
            bound.arguments["cache"] = widened
        try:
            return call(*bound.args, **bound.kwargs)
        finally:
            split.widened = []

    owner.__class__ = type(cls.__name__, (cls,), {"__call__": __call__})


def borrow_plan(split: Split) -> list[tuple[int, bool]]:
    """For every layer, the layer of this rank whose cache its entry reads, and whether it is of the same kind."""
    own = list(range(split.layers.start, split.layers.end))
    plan = []
    for index, kind in enumerate(split.kinds):
        if split.own(index):
            plan.append((index, True))
            continue
        same = [j for j in own if split.kinds[j] == kind]
        pool = same or own
        plan.append((min(pool, key=lambda j: abs(j - index)), bool(same)))
    return plan


def own_caches(model: nn.Module, split: Split) -> None:
    """make_prompt_cache(model) now gives this rank's layers' caches only."""
    cls = type(model)

    def make_cache(self: nn.Module) -> list[Any]:
        return split.full_caches()[split.layers.start : split.layers.end]

    model.__class__ = type(cls.__name__, (cls,), {"make_cache": make_cache, "shardline_split": split})


def whole_model_caches(model: nn.Module) -> list[Any]:
    """The caches of every layer of the model, split or not (what decides how its prefix cache is reused)."""
    split = getattr(model, "shardline_split", None)
    return split.full_caches() if split is not None else make_prompt_cache(model)


def trimmable(model: nn.Module) -> bool:
    """Every layer's cache (on every rank) can be cut back to a shorter prefix: plain attention, no window that
    may have rotated, no recurrent state."""
    caches = whole_model_caches(model)
    return can_trim_prompt_cache(caches) and not any(hasattr(c, "max_size") for c in caches)
