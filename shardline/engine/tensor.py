"""Tensor parallelism: mlx-lm's own `shard` where the model class has one, else ours for llama-shaped layers.

Llama-shaped: every layer's attention has q/k/v/o projections and per-head state only, and its MLP is
gate/up/down (or c_fc/c_proj). Each rank keeps 1/N of the heads and of the MLP's hidden units; the
output projections sum the ranks' parts (mlx's sharded linears, quantized ones included).
"""

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from shardline.engine.pipeline import find_stack

ATTENTION = ("self_attn", "attention", "attn")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLPS = (("gate_proj", "up_proj", "down_proj"), ("c_fc", "c_proj"), ("fc1", "fc2"))


def linear(module: Any) -> bool:
    return isinstance(module, (nn.Linear, nn.QuantizedLinear))


def attention_of(layer: nn.Module) -> nn.Module | None:
    for name in ATTENTION:
        module = layer.get(name) if isinstance(layer, dict) else None
        if isinstance(module, nn.Module) and all(linear(module.get(p)) for p in PROJECTIONS):
            return module
    return None


def mlp_of(layer: nn.Module) -> tuple[nn.Module, tuple[str, ...]] | None:
    module = layer.get("mlp") if isinstance(layer, dict) else None
    if not isinstance(module, nn.Module):
        return None
    for names in MLPS:
        if all(linear(module.get(n)) for n in names) and set(module.children()) <= set(names) | {"act"}:
            return module, names
    return None


def tensor_problem(model: nn.Module, num_layers: int) -> str | None:
    """Why our sharding cannot split this model's layers (mlx-lm's `shard` aside), or None."""
    try:
        owner, name = find_stack(model, num_layers)
    except ValueError as exc:
        return str(exc)
    for layer in owner[name]:
        attention = attention_of(layer)
        if attention is None:
            return "its attention is not made of q/k/v/o projections"
        if not all(isinstance(getattr(attention, a, None), int) for a in ("n_heads", "n_kv_heads")):
            return "its attention does not count its heads as n_heads / n_kv_heads"
        if mlp_of(layer) is None:
            return "its MLP is not gate/up/down projections (a mixture of experts, or fused)"
        head_dim = attention.q_proj.weight.shape[0] // attention.n_heads if linear(attention.q_proj) else 0
        for child_name, child in attention.children().items():
            weight = child.get("weight") if isinstance(child, nn.Module) and child_name not in PROJECTIONS else None
            if isinstance(weight, mx.array) and weight.shape[-1] > head_dim:
                return f"its attention normalizes across heads ({child_name})"
    return None


def shard_tensor(model: nn.Module, num_layers: int, group: mx.distributed.Group) -> None:
    if hasattr(model, "shard"):
        model.shard(group)
        return
    problem = tensor_problem(model, num_layers)
    if problem:
        raise ValueError(f"cannot split this model by tensor: {problem}")
    size = group.size()
    owner, name = find_stack(model, num_layers)
    for layer in owner[name]:
        attention = attention_of(layer)
        assert attention is not None
        for p in PROJECTIONS:
            kind = "sharded-to-all" if p == "o_proj" else "all-to-sharded"
            setattr(attention, p, shard_linear(attention[p], kind, group=group))
        attention.n_heads //= size
        attention.n_kv_heads //= size
        found = mlp_of(layer)
        assert found is not None
        mlp, names = found
        for n in names:
            kind = "sharded-to-all" if n == names[-1] else "all-to-sharded"
            setattr(mlp, n, shard_linear(mlp[n], kind, group=group))
