"""Which files of a model repo a node needs: pure functions over the repo's file list and index."""

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardline.types import LayerRange

INDEX_FILE = "model.safetensors.index.json"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".gguf", ".onnx", ".h5", ".msgpack", ".ckpt")


def tensor_layer(name: str) -> int | None:
    """`model.layers.7.mlp.up_proj.weight` -> 7; embeddings, norms and head -> None."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def is_weight_file(path: str) -> bool:
    return path.endswith(".safetensors") or path.endswith(_OTHER_WEIGHTS)


def support_files(files: Iterable[str]) -> list[str]:
    """Config, tokenizer, index and the like: everything that is not weights or git metadata."""
    return sorted(f for f in files if not is_weight_file(f) and not f.startswith(".git"))


def weight_files_for_layers(weight_map: dict[str, str], layers: LayerRange) -> list[str]:
    """Files holding a tensor of a layer in range, or a tensor outside every layer (embeddings, norms, head)."""
    wanted = set()
    for tensor, filename in weight_map.items():
        layer = tensor_layer(tensor)
        if layer is None or layer in layers:
            wanted.add(filename)
    return sorted(wanted)


def held_layers(weight_map: dict[str, str], complete: Iterable[str]) -> list[LayerRange]:
    """The layer ranges whose every tensor is in a complete file (with the embeddings and head a rank needs),
    merged: what a node that downloaded some layer ranges of a model can serve of it."""
    done = set(complete)
    if any(tensor_layer(t) is None and f not in done for t, f in weight_map.items()):
        return []
    missing: set[int] = set()
    layers: set[int] = set()
    for tensor, filename in weight_map.items():
        if (layer := tensor_layer(tensor)) is not None:
            layers.add(layer)
            if filename not in done:
                missing.add(layer)
    ranges: list[LayerRange] = []
    for layer in sorted(layers - missing):
        if ranges and ranges[-1].end == layer:
            ranges[-1] = LayerRange(ranges[-1].start, layer + 1)
        else:
            ranges.append(LayerRange(layer, layer + 1))
    return ranges


def files_to_fetch(files: Iterable[str], weight_map: dict[str, str] | None, layers: LayerRange | None) -> list[str]:
    """The whole repo without other weight formats, or only what a layer range needs."""
    files = list(files)
    safetensors = sorted(f for f in files if f.endswith(".safetensors"))
    if layers is None or weight_map is None:
        return sorted(support_files(files) + safetensors)
    return sorted(support_files(files) + weight_files_for_layers(weight_map, layers))


COMPLETE_MARKER = ".shardline-complete.json"


def model_path(models_dir: Path, model_id: str) -> Path:
    """Where a model lives on a node; `model_id` must already be checked (see ids.check_model_id)."""
    return models_dir.joinpath(*model_id.split("/"))


def param_bytes(config: dict[str, Any]) -> float:
    quantization = config.get("quantization") or config.get("quantization_config") or {}
    if "bits" in quantization:
        return quantization["bits"] / 8
    return 4.0 if config.get("torch_dtype", config.get("dtype")) == "float32" else 2.0


def layer_sizes(config: dict[str, Any], weight_bytes: int) -> tuple[int, int, int]:
    """(layers, bytes per layer, bytes outside the layers), estimated from the config and total weight bytes."""
    layers = int(config["num_hidden_layers"])
    vocab, hidden = int(config.get("vocab_size", 0)), int(config.get("hidden_size", 0))
    tables = 1 if config.get("tie_word_embeddings", False) else 2  # embeddings, and a separate head
    outer = min(int(vocab * hidden * tables * param_bytes(config)), weight_bytes // 2)
    return layers, max((weight_bytes - outer) // layers, 1), outer


HEADER_LIMIT = 100_000_000  # bytes: safetensors refuses a longer header


def header_length(prefix: bytes) -> int:
    """The length of a safetensors file's JSON header: its first 8 bytes, a little-endian u64."""
    if len(prefix) < 8:
        raise ValueError(f"a safetensors file starts with 8 bytes of header length, got {len(prefix)}")
    length = int.from_bytes(prefix[:8], "little")
    if not 2 <= length <= HEADER_LIMIT:
        raise ValueError(f"a safetensors header of {length} bytes: not a safetensors file")
    return length


def stored_bytes(header: bytes) -> dict[str, int]:
    """Each tensor's bytes as the file stores them (`data_offsets` end - start), from its JSON header: packed
    quantized weights, their scales and biases, in whatever dtype each was written."""
    tensors = json.loads(header)
    if not isinstance(tensors, dict):
        raise ValueError("a safetensors header is a JSON object")
    sizes = {}
    for name, info in tensors.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if not 0 <= int(begin) <= int(end):
            raise ValueError(f"tensor {name}: data_offsets {info['data_offsets']} out of order")
        sizes[name] = int(end) - int(begin)
    return sizes


def sizes_from_tensors(tensors: dict[str, int], num_layers: int) -> tuple[list[int], int]:
    """(bytes of each layer, bytes outside every layer: embeddings, norms, head), exact from each tensor's stored
    bytes. A tied head has no tensor of its own, so it costs nothing more. Tensors of a layer past the model's
    last (multi-token prediction heads) are left out: mlx-lm drops them when it loads."""
    layers, outer = [0] * num_layers, 0
    for name, size in tensors.items():
        layer = tensor_layer(name)
        if layer is None:
            outer += size
        elif layer < num_layers:
            layers[layer] += size
    return layers, outer


@dataclass(frozen=True)
class Completion:
    """What a node's copy of a model holds, as its completion marker records it: the files a full download
    fetches at `commit` (with sizes), and those of them verified complete, so a layer range never reads as
    the whole model."""

    model_id: str
    commit: str
    repo: dict[str, int]
    complete: dict[str, int]

    @property
    def full(self) -> bool:
        return all(self.complete.get(name) == size for name, size in self.repo.items())

    def needed(self, weight_map: dict[str, str] | None, layers: LayerRange | None) -> dict[str, int]:
        """The files (and sizes) a request for `layers` needs, from the listing recorded at download time."""
        return {name: self.repo[name] for name in files_to_fetch(self.repo, weight_map, layers)}


def record_completion(previous: Completion | None, model_id: str, commit: str, repo: dict[str, int],
                      fetched: dict[str, int]) -> Completion:  # fmt: skip
    """The marker after `fetched` completed at `commit`; what an earlier commit completed no longer counts."""
    kept = previous.complete if previous is not None and previous.commit == commit else {}
    complete = {name: size for name, size in {**kept, **fetched}.items() if repo.get(name) == size}
    return Completion(model_id, commit, dict(sorted(repo.items())), dict(sorted(complete.items())))
