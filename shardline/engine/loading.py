"""Join the ring and load only this rank's part of a model (the way mlx_lm's sharded_load does)."""

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_model, load_tokenizer

from shardline.engine.capabilities import num_layers
from shardline.engine.pipeline import split_pipeline
from shardline.engine.spec import RunnerSpec, pipeline_layers
from shardline.engine.tensor import shard_tensor
from shardline.model_files import INDEX_FILE, is_weight_file, tensor_layer, weight_files_for_layers
from shardline.types import LayerRange


def init_group(spec: RunnerSpec, workdir: Path) -> mx.distributed.Group | None:
    """The ring over all ranks; blocks until every rank has joined."""
    if spec.world_size == 1:
        return None
    hostfile = workdir / "hosts.json"
    hostfile.write_text(json.dumps([[host] for host in spec.hosts]), encoding="utf-8")
    os.environ["MLX_RANK"] = str(spec.rank)
    os.environ["MLX_HOSTFILE"] = str(hostfile)
    group = mx.distributed.init(backend="ring", strict=True)
    if group.size() != spec.world_size:
        raise RuntimeError(f"ring has {group.size()} ranks, expected {spec.world_size}")
    return group


def read_weight_map(model_dir: Path) -> dict[str, str] | None:
    index = model_dir / INDEX_FILE
    if not index.exists():
        return None
    return json.loads(index.read_text(encoding="utf-8"))["weight_map"]


def needed_weight_files(model_dir: Path, layers: LayerRange | None) -> list[str]:
    """The weight files this rank reads; raises FileNotFoundError naming any that are missing."""
    weight_map = read_weight_map(model_dir)
    if weight_map is None:
        found = sorted(Path(f).name for f in glob.glob(str(model_dir / "model*.safetensors")))
        if not found:
            raise FileNotFoundError(f"no model*.safetensors files in {model_dir}")
        return found
    if layers is not None:
        check_layers_indexed(weight_map, layers)
    files = weight_files_for_layers(weight_map, layers) if layers is not None else sorted(set(weight_map.values()))
    missing = [name for name in files if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"missing weight files in {model_dir}: {', '.join(missing)}")
    return files


def check_layers_indexed(weight_map: dict[str, str], layers: LayerRange) -> None:
    # Pipeline loads are not strict (other ranks' layers are absent), so a layer
    # without weights would silently keep random values.
    indexed = {tensor_layer(name) for name in weight_map}
    missing = [layer for layer in range(layers.start, layers.end) if layer not in indexed]
    if missing:
        raise ValueError(f"the weight index has no tensors for layers {missing}")


def stage(model_dir: Path, weight_files: list[str], staging: Path) -> Path:
    # load_model reads every model*.safetensors it sees; show it only the files this rank needs,
    # so files of other ranks (absent, or still downloading) never matter.
    for entry in model_dir.iterdir():
        if entry.is_file() and (not is_weight_file(entry.name) or entry.name in weight_files):
            (staging / entry.name).symlink_to(entry.resolve())
    return staging


class ModelRefused(Exception):
    """MLX or mlx-lm refuse the model itself (its config, its weights, running it): retrying cannot fix it."""


def refused(error: BaseException, distributed: bool) -> bool:
    """Whether a failure to load is the model's own. Files (a download may fix them) and memory (another
    placement may find it) are not; with a ring, neither are RuntimeErrors: the ring fails with them too."""
    if isinstance(error, (OSError, MemoryError)):
        return False
    return not (distributed and isinstance(error, RuntimeError))


def load_shard(
    spec: RunnerSpec, group: mx.distributed.Group | None, loaded: Callable[[], object] = lambda: None
) -> tuple[nn.Module, TokenizerWrapper]:
    """This rank's part of the model, warmed up, and the tokenizer; ModelRefused when the model cannot run.
    `loaded` is called once the weights are read, before the warm-up's first collective (wake.barrier)."""
    try:
        return load_parts(spec, group, loaded)
    except Exception as error:
        if refused(error, group is not None):
            raise ModelRefused(str(error) or type(error).__name__) from error
        raise


def load_parts(
    spec: RunnerSpec, group: mx.distributed.Group | None, loaded: Callable[[], object]
) -> tuple[nn.Module, TokenizerWrapper]:
    model_dir = Path(spec.model_path)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    layers = pipeline_layers(spec.splits, spec.rank) if spec.strategy == "pipeline" else None
    staging = Path(tempfile.mkdtemp(prefix="shardline-weights-"))
    try:
        staged = stage(model_dir, needed_weight_files(model_dir, layers), staging)
        model, config = load_model(staged, lazy=True, strict=layers is None)
        check_fits(config, spec)
        split_over_ranks(model, config, spec, group)
        mx.eval(model.parameters())  # reads the local weights, while the staged links still exist
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    loaded()
    warm_up(model)  # before the tokenizer, whose config checks would speak for MLX (transformers checks RoPE too)
    tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer


def warm_up(model: nn.Module) -> None:
    """One real forward pass before reporting ready: a model MLX cannot run fails loading, with MLX's reason."""
    with mx.stream(generation_stream):
        mx.eval(model(mx.array([[0]]), cache=make_prompt_cache(model)))


def check_fits(config: dict, spec: RunnerSpec) -> None:
    total = num_layers(config)
    if spec.strategy == "pipeline" and sum(spec.splits) != total:
        raise ValueError(f"splits {spec.splits} cover {sum(spec.splits)} layers but the model has {total}")
    heads = [config.get("num_attention_heads", 0), config.get("num_key_value_heads", 0)]
    if spec.strategy == "tensor" and any(n % spec.world_size for n in heads):
        raise ValueError(
            f"{heads[0]} attention and {heads[1]} key/value heads do not split over {spec.world_size} ranks"
        )


def split_over_ranks(model: nn.Module, config: dict, spec: RunnerSpec, group: mx.distributed.Group | None) -> None:
    if group is None:
        return
    if spec.strategy == "pipeline":
        split_pipeline(model, sum(spec.splits), pipeline_layers(spec.splits, spec.rank), spec.rank, spec.world_size,
                       group)  # fmt: skip
    elif spec.strategy == "tensor":
        shard_tensor(model, num_layers(config), group)


def parameter_bytes(model: nn.Module) -> int:
    return sum(array.nbytes for _, array in tree_flatten(model.parameters()))
