from pathlib import Path

import pytest

from shardline.model_files import (
    INDEX_FILE,
    Completion,
    files_to_fetch,
    model_path,
    record_completion,
    tensor_layer,
    weight_files_for_layers,
)
from shardline.types import LayerRange

WEIGHT_MAP = {
    "model.embed_tokens.weight": "model-00001-of-00003.safetensors",
    "model.layers.0.mlp.up_proj.weight": "model-00001-of-00003.safetensors",
    "model.layers.1.mlp.up_proj.weight": "model-00002-of-00003.safetensors",
    "model.layers.2.mlp.up_proj.weight": "model-00002-of-00003.safetensors",
    "model.layers.3.mlp.up_proj.weight": "model-00003-of-00003.safetensors",
    "model.norm.weight": "model-00003-of-00003.safetensors",
    "lm_head.weight": "model-00003-of-00003.safetensors",
}
REPO = [*sorted(set(WEIGHT_MAP.values())), "config.json", "tokenizer.json", "model.safetensors.index.json",
        ".gitattributes", "pytorch_model.bin"]  # fmt: skip


def test_tensor_layer() -> None:
    assert tensor_layer("model.layers.12.self_attn.q_proj.weight") == 12
    assert tensor_layer("model.language_model.layers.3.mlp.gate.weight") == 3
    assert tensor_layer("model.embed_tokens.weight") is None
    assert tensor_layer("lm_head.weight") is None


def test_layer_range_is_half_open() -> None:
    assert 1 in LayerRange(1, 3) and 2 in LayerRange(1, 3)
    assert 3 not in LayerRange(1, 3) and 0 not in LayerRange(1, 3)
    with pytest.raises(ValueError):
        LayerRange(2, 2)


def test_middle_layers_need_their_file_and_the_outer_tensors() -> None:
    # embeddings live in file 1 and the head in file 3, so every range needs both ends
    assert weight_files_for_layers(WEIGHT_MAP, LayerRange(1, 3)) == sorted(set(WEIGHT_MAP.values()))
    only_first = {k: v for k, v in WEIGHT_MAP.items() if k != "lm_head.weight" and k != "model.norm.weight"}
    assert weight_files_for_layers(only_first, LayerRange(0, 1)) == ["model-00001-of-00003.safetensors"]


def test_files_to_fetch_whole_model_skips_other_formats_and_git() -> None:
    files = files_to_fetch(REPO, None, None)
    assert "pytorch_model.bin" not in files and ".gitattributes" not in files
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(files)
    assert len([f for f in files if f.endswith(".safetensors")]) == 3


def test_files_to_fetch_for_a_range() -> None:
    weight_map = {k: v for k, v in WEIGHT_MAP.items() if not k.startswith(("lm_head", "model.norm"))}
    files = files_to_fetch(REPO, weight_map, LayerRange(1, 3))
    assert files == sorted(["config.json", "model.safetensors.index.json", "tokenizer.json",
                            "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"])  # fmt: skip


def test_model_path() -> None:
    assert model_path(Path("/m"), "org/name") == Path("/m/org/name")


def test_a_layer_range_never_reads_as_the_whole_model() -> None:
    repo = {"config.json": 10, INDEX_FILE: 20, "a.safetensors": 100, "b.safetensors": 200}
    weight_map = {"model.layers.0.w": "a.safetensors", "model.layers.1.w": "b.safetensors", "norm.w": "a.safetensors"}
    first = Completion("org/m", "c1", repo, {}).needed(weight_map, LayerRange(0, 1))
    assert sorted(first) == ["a.safetensors", "config.json", INDEX_FILE]
    ranged = record_completion(None, "org/m", "c1", repo, first)
    assert not ranged.full and ranged.needed(weight_map, LayerRange(0, 1)) == first
    whole = record_completion(ranged, "org/m", "c1", repo, {"b.safetensors": 200})  # a full download: the rest
    assert whole.full and whole.complete == repo


def test_completion_of_another_commit_or_size_does_not_count() -> None:
    repo = {"config.json": 10, "a.safetensors": 100}
    old = record_completion(None, "org/m", "c1", repo, repo)
    assert old.full
    moved = record_completion(old, "org/m", "c2", {"config.json": 10, "a.safetensors": 150}, {"config.json": 10})
    assert moved.complete == {"config.json": 10} and not moved.full
    assert record_completion(None, "org/m", "c1", repo, {"a.safetensors": 99}).complete == {}
