"""Which ways a model's architecture can be split over ranks, and why not where it cannot.

Read off the model mlx-lm builds from the config (its parameters are lazy: nothing is computed or
allocated), by the same checks the runner's splitting makes.
"""

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Support:
    pipeline: bool
    tensor: bool
    why_not_pipeline: str = ""  # a sentence a person can act on, when pipeline is False
    why_not_tensor: str = ""


def num_layers(config: dict[str, Any]) -> int:
    text = config.get("text_config") or {}
    return int(config.get("num_hidden_layers") or text.get("num_hidden_layers") or config.get("n_layer") or 0)


def sharding_support(config: dict[str, Any]) -> Support:
    """Raises ValueError (or ImportError) when mlx-lm has no class for the config's model_type."""
    from mlx_lm.utils import _get_classes

    from shardline.engine.pipeline import pipeline_problem
    from shardline.engine.tensor import tensor_problem

    model_class, args_class = _get_classes(config)
    try:
        model = model_class(args_class.from_dict(config))
    except (TypeError, KeyError, AttributeError, AssertionError) as exc:
        raise ValueError(f"mlx-lm cannot build a {config.get('model_type')!r} model from this config: {exc}") from exc
    kind, layers = config.get("model_type"), num_layers(config)
    pipeline = pipeline_problem(model, layers)
    tensor = None if hasattr(model, "shard") else tensor_problem(model, layers)
    return Support(
        pipeline is None,
        tensor is None,
        f"model type {kind!r} cannot be pipelined: {pipeline}" if pipeline else "",
        f"model type {kind!r} cannot be split by tensor: {tensor}" if tensor else "",
    )
