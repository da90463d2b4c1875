from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from shardline.model_files import (
    INDEX_FILE,
    Completion,
    files_to_fetch,
    header_length,
    held_layers,
    model_path,
    record_completion,
    sizes_from_tensors,
    stored_bytes,
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


def quantized_file(hidden: int = 64, vocab: int = 256, bits: tuple[int, ...] = (4, 8)) -> tuple[bytes, dict[str, int]]:
    """A safetensors file as mlx_lm.convert writes a 4/8-bit mixed checkpoint with tied embeddings: packed U32
    weights with float16 scales and biases per group of 32, the embedding quantized, no lm_head; and a
    multi-token-prediction layer past the last. Returns its bytes and what each layer and the rest take."""
    tensors: dict[str, np.ndarray] = {}

    def linear(name: str, rows: int, cols: int, b: int) -> None:
        tensors[f"{name}.weight"] = np.zeros((rows, cols * b // 32), np.uint32)
        tensors[f"{name}.scales"] = np.zeros((rows, cols // 32), np.float16)
        tensors[f"{name}.biases"] = np.zeros((rows, cols // 32), np.float16)

    linear("model.embed_tokens", vocab, hidden, 4)
    tensors["model.norm.weight"] = np.zeros(hidden, np.float16)
    for layer, b in enumerate(bits):
        linear(f"model.layers.{layer}.self_attn.q_proj", hidden, hidden, b)
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = np.zeros(hidden, np.float16)
    tensors[f"model.layers.{len(bits)}.eh_proj.weight"] = np.zeros((hidden, hidden), np.float16)  # MTP
    sizes = [0] * len(bits) + [0]
    outer = 0
    for name, array in tensors.items():
        layer = tensor_layer(name)
        if layer is None:
            outer += array.nbytes
        else:
            sizes[layer] += array.nbytes
    return save(tensors, metadata={"format": "mlx"}), {"outer": outer, **{str(i): n for i, n in enumerate(sizes)}}


def test_exact_bytes_of_a_mixed_quantized_checkpoint_with_tied_embeddings() -> None:
    data, truth = quantized_file()
    length = header_length(data[:8])
    tensors = stored_bytes(data[8 : 8 + length])
    assert "__metadata__" not in tensors and tensors["model.layers.0.self_attn.q_proj.weight"] == 64 * 8 * 4
    layers, outer = sizes_from_tensors(tensors, num_layers=2)
    assert layers == [truth["0"], truth["1"]] and outer == truth["outer"]
    assert layers[1] > layers[0]  # 8-bit layer: twice the packed words
    assert outer == 256 * 8 * 4 + 2 * 256 * 2 * 2 + 64 * 2  # the embedding as stored, counted once (tied head)
    assert sum(layers) + outer + truth["2"] == sum(tensors.values())  # only the MTP layer is left out


@pytest.mark.parametrize(("prefix", "message"), [(b"\x01\x00", "8 bytes"), ((2**40).to_bytes(8, "little"), "not a")])
def test_a_header_length_that_cannot_be_is_refused(prefix: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        header_length(prefix)


def test_a_layer_missing_from_the_headers_reads_as_zero_bytes() -> None:
    """GPT-2 style names (`h.0.`) are not found by layer: the caller falls back to the estimate on a zero."""
    layers, outer = sizes_from_tensors({"transformer.h.0.attn.weight": 10, "wte.weight": 5}, num_layers=1)
    assert (layers, outer) == ([0], 15)


def test_held_layers_are_the_ranges_whose_files_are_complete() -> None:
    first, second, third = sorted(set(WEIGHT_MAP.values()))
    # the embeddings are in the first file, the norm and head in the third: a rank needs both
    assert held_layers(WEIGHT_MAP, [first, third]) == [LayerRange(0, 1), LayerRange(3, 4)]
    assert held_layers(WEIGHT_MAP, [first, second, third]) == [LayerRange(0, 4)]
    assert held_layers(WEIGHT_MAP, [first, second]) == []  # no head: nothing it could serve
