"""Which kinds of sharding mlx-lm supports for a model's architecture."""

import sys
from typing import Any


def sharding_support(config: dict[str, Any]) -> tuple[bool, bool]:
    """(pipeline, tensor): the model class has model.model.pipeline(...) / model.shard(...)."""
    from mlx_lm.models.pipeline import PipelineMixin
    from mlx_lm.utils import _get_classes

    model_class, _ = _get_classes(config)
    module = vars(sys.modules[model_class.__module__])
    pipeline = any(
        isinstance(c, type) and issubclass(c, PipelineMixin) and c is not PipelineMixin for c in module.values()
    )
    return pipeline, hasattr(model_class, "shard")
