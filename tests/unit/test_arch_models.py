"""tests/support/arch_models.py: every tiny architecture loads with mlx_lm, talks, and is split by layer."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step

from shardline.model_files import tensor_layer
from tests.support.arch_models import index_weight_map, make_arch_model

NUM_LAYERS = 6
CHAT = [{"role": "user", "content": "Hello! How are you?"}]
# what tests/engine/test_architectures.py does not load itself (it makes every other architecture, float32, and
# quantized llama, qwen3, gemma3_text and qwen3 mixed and tied): the rest of what the factory can make
VARIANTS = [
    ("llama", {}),
    ("gemma2", {}),
    ("qwen3_next", {"quantize": 8}),
    ("qwen3_moe", {"quantize": 4, "mixed": True}),
    ("llama", {"tie": True}),
]


def greedy(model: nn.Module, prompt: list[int], max_tokens: int = 12) -> list[int]:
    return [int(token) for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens)]


@pytest.mark.parametrize(("arch", "options"), VARIANTS, ids=lambda v: v if isinstance(v, str) else repr(v))
def test_arch_model_loads_talks_and_splits_by_layer(tmp_path: Path, arch: str, options: dict) -> None:
    dest = make_arch_model(tmp_path / arch, arch, num_layers=NUM_LAYERS, **options)
    model, tokenizer = load(str(dest))

    assert len(model.layers) == NUM_LAYERS
    quantized = any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    assert quantized == ("quantize" in options)
    chat = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    for prompt in (tokenizer.encode("The quick brown fox"), chat):
        assert len(set(greedy(model, prompt))) > 2

    weight_map = index_weight_map(dest)
    for filename in set(weight_map.values()):
        stored = mx.load(str(dest / filename))
        assert {name for name, f in weight_map.items() if f == filename} == set(stored)
    assert {tensor_layer(name) for name in weight_map} == {None, *range(NUM_LAYERS)}
    assert len(set(weight_map.values())) == 1 + NUM_LAYERS // 2  # the outer tensors, then 2 layers a file


def test_mixed_bits_are_recorded_per_layer(tmp_path: Path) -> None:
    dest = make_arch_model(tmp_path / "m", "llama", num_layers=2, quantize=4, mixed=True)
    quantization = json.loads((dest / "config.json").read_text())["quantization"]
    assert quantization["model.layers.0.mlp.down_proj"]["bits"] == 8
    assert quantization["model.layers.1.mlp.down_proj"]["bits"] == 4
    assert quantization["lm_head"]["bits"] == 8


def test_an_architecture_that_cannot_tie_says_so(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot tie"):
        make_arch_model(tmp_path / "g", "gpt_oss", num_layers=2, tie=True)
