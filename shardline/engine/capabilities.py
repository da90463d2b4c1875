"""Which ways a model's architecture can be split over ranks, and why not where it cannot."""

import sys
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Support:
    pipeline: bool
    tensor: bool
    why_not_pipeline: str = ""  # a sentence a person can act on, when pipeline is False
    why_not_tensor: str = ""


def sharding_support(config: dict[str, Any]) -> Support:
    """Raises ValueError (or ImportError) when mlx-lm has no class for the config's model_type."""
    from mlx_lm.models.pipeline import PipelineMixin
    from mlx_lm.utils import _get_classes

    model_class, _ = _get_classes(config)
    module = vars(sys.modules[model_class.__module__])
    pipeline = any(
        isinstance(c, type) and issubclass(c, PipelineMixin) and c is not PipelineMixin for c in module.values()
    )
    tensor = hasattr(model_class, "shard")
    kind = config.get("model_type")
    return Support(
        pipeline,
        tensor,
        "" if pipeline else f"model type {kind!r} does not support pipeline parallelism",
        "" if tensor else f"model type {kind!r} does not support tensor parallelism",
    )
