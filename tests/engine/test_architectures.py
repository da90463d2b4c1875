"""Every architecture splits: tiny random models of many mlx-lm families, float and 4-bit, served over 2 and 3
pipeline ranks and 2 tensor ranks by the real engine on a real ring, answer what plain mlx_lm answers alone:
one request, four batched, and a second turn that reuses the first's cached prefix.

One ring of rank processes per rank count serves every model in turn (tests/support/matrix_ranks.py).
"""

import json
import os
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.utils import _get_classes

from shardline.engine.capabilities import Support, sharding_support
from shardline.engine.spec import pipeline_layers
from shardline.model_files import INDEX_FILE, tensor_layer
from tests.support.arch_models import ARCHS, make_arch_model
from tests.support.matrix import Case, References, mismatches, prompts, run_matrix
from tests.support.runners import node_copy

# the first test also waits for its ring's whole run (every model, ~40 s alone): on 2 loaded cores it took 242 s
pytestmark = [pytest.mark.slow(83), pytest.mark.timeout(900)]

QUANTIZED = {  # name: (architecture, bits, mixed per-layer bits, tied embeddings)
    "llama-q4": ("llama", 4, False, False),
    "qwen3-q4": ("qwen3", 4, False, False),
    "gemma3_text-q4": ("gemma3_text", 4, False, False),
    "qwen3-mixed-tied": ("qwen3", 4, True, True),  # 8 bits for even layers and the head (the tied embeddings)
}
# mlx-lm 0.32's gemma2 attention cannot take a batch's mask ("[broadcast_shapes] (4,1,19,19) and (4,2,2,19,19)"),
# split or not; gemma3_text stands for the local/global family
ARCH_MATRIX = sorted(set(ARCHS) - {"gemma2"})
MODELS = ARCH_MATRIX + sorted(QUANTIZED)
SPLITS = {2: [2, 4], 3: [1, 2, 3]}  # uneven on purpose; rank 0 runs the last layers
README = Path(__file__).resolve().parents[2] / "README.md"
TABLE_START, TABLE_END = "<!-- architectures:start -->", "<!-- architectures:end -->"


@pytest.fixture(scope="module")
def zoo(workdir: Path) -> dict[str, Path]:
    # float32: tensor ranks sum partial products in another order than one process does, and in float16 random
    # weights' close logits then tie-break differently within a few tokens (pipeline ranks are exact either way)
    models = {arch: make_arch_model(workdir / "zoo" / arch, arch, dtype="float32") for arch in ARCH_MATRIX}
    for name, (arch, bits, mixed, tie) in QUANTIZED.items():
        models[name] = make_arch_model(
            workdir / "zoo" / name, arch, quantize=bits, mixed=mixed, tie=tie, dtype="float32"
        )
    return models


@pytest.fixture(scope="module")
def support(zoo: dict[str, Path]) -> dict[str, Support]:
    return {name: sharding_support(json.loads((path / "config.json").read_text())) for name, path in zoo.items()}


def rank_copies(workdir: Path, zoo: dict[str, Path], name: str, size: int) -> list[Path]:
    """What each node would download for its layers: only the files they need."""
    (workdir / f"nodes{size}" / name).mkdir(parents=True)
    return [node_copy(zoo[name], workdir / f"nodes{size}" / name / f"rank{r}", SPLITS[size], r) for r in range(size)]


@pytest.fixture(scope="module")
def ring2(workdir: Path, zoo: dict[str, Path], support: dict[str, Support]) -> list[dict[str, Any]]:
    cases = [Case(f"{name}/pipeline", rank_copies(workdir, zoo, name, 2), "pipeline", SPLITS[2]) for name in MODELS]
    cases += [Case(f"{name}/tensor", [zoo[name]] * 2, "tensor") for name in MODELS if support[name].tensor]
    return run_matrix(cases, workdir, "ring2")


@pytest.fixture(scope="module")
def ring3(workdir: Path, zoo: dict[str, Path]) -> list[dict[str, Any]]:
    cases = [Case(f"{name}/pipeline", rank_copies(workdir, zoo, name, 3), "pipeline", SPLITS[3]) for name in MODELS]
    return run_matrix(cases, workdir, "ring3")


@pytest.fixture(scope="module")
def references() -> References:
    return References()


def check(result: dict[str, Any], model_dir: Path, references: References) -> None:
    assert len(set(references(model_dir, prompts(model_dir)["alone"]))) > 2  # a model stuck on one token proves little
    assert mismatches(result, model_dir, references) == []


@pytest.mark.parametrize("name", MODELS)
def test_two_pipeline_ranks_answer_as_mlx_lm(name: str, ring2: list[dict], zoo: dict[str, Path], references) -> None:
    check(ring2[0][f"{name}/pipeline"], zoo[name], references)


@pytest.mark.parametrize("name", MODELS)
def test_three_pipeline_ranks_answer_as_mlx_lm(name: str, ring3: list[dict], zoo: dict[str, Path], references) -> None:
    check(ring3[0][f"{name}/pipeline"], zoo[name], references)


@pytest.mark.parametrize("name", MODELS)
def test_two_tensor_ranks_answer_as_mlx_lm_or_are_refused_with_the_reason(
    name: str, ring2: list[dict], zoo: dict[str, Path], support: dict[str, Support], references
) -> None:
    if not support[name].tensor:
        assert "cannot be split by tensor: " in support[name].why_not_tensor
        assert f"{name}/tensor" not in ring2[0]
        return
    check(ring2[0][f"{name}/tensor"], zoo[name], references)


def stored_bytes(model_dir: Path, layers: range | None) -> int:
    """Bytes of the tensors a rank holding `layers` (None: every layer) needs, as the checkpoint stores them."""
    weight_map = json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]
    total = 0
    for file in sorted(set(weight_map.values())):
        for tensor_name, array in mx.load(str(model_dir / file)).items():
            layer = tensor_layer(tensor_name)
            if layer is None or layers is None or layer in layers:
                total += array.nbytes
    return total


@pytest.mark.parametrize("size", [2, 3])
def test_each_rank_holds_and_downloads_only_its_share(
    size: int, ring2: list[dict], ring3: list[dict], zoo: dict[str, Path], workdir: Path
) -> None:
    results = {2: ring2, 3: ring3}[size]
    for name in ["llama", "gemma3_text", "qwen3_moe", "llama-q4", "qwen3-mixed-tied"]:
        whole = stored_bytes(zoo[name], None)
        for rank in range(size):
            layers = pipeline_layers(SPLITS[size], rank)
            share = range(layers.start, layers.end)
            node_dir = workdir / f"nodes{size}" / name / f"rank{rank}"
            held = sorted(p.name for p in node_dir.glob("*.safetensors"))
            weight_map = json.loads((node_dir / INDEX_FILE).read_text())["weight_map"]
            needed = sorted({f for t, f in weight_map.items() if tensor_layer(t) is None or tensor_layer(t) in share})
            assert held == needed, f"{name} rank {rank} downloaded {held}, needs {needed}"
            resident = results[rank][f"{name}/pipeline"]["memory_bytes"]
            assert resident == stored_bytes(zoo[name], share), f"{name} rank {rank}"
            assert resident < whole


def support_table(zoo: dict[str, Path], support: dict[str, Support], ring2: list[dict], ring3: list[dict]) -> str:
    """Markdown: what the matrix showed each architecture does."""
    lines = ["| model_type | pipeline | tensor |", "|---|---|---|"]
    for arch in ARCH_MATRIX:
        piped = [
            n for n, ring in ((2, ring2), (3, ring3)) if "error" not in ring[0].get(f"{arch}/pipeline", {"error": 1})
        ]
        pipeline = f"yes ({' and '.join(map(str, piped))} ranks tested)" if piped else "no"
        if support[arch].tensor:
            own = "mlx-lm's `shard`" if "def shard" in Path(sys_module_file(zoo[arch])).read_text() else "shardline's"
            tensor = f"yes, {own}"
        else:
            tensor = "no: " + support[arch].why_not_tensor.split(": ", 1)[1]
        lines.append(f"| `{arch}` | {pipeline} | {tensor} |")
    quantized = ", ".join(
        f"`{arch}` {bits}-bit{' mixed' if mixed else ''}{' tied' if tie else ''}"
        for arch, bits, mixed, tie in QUANTIZED.values()
    )
    lines.append("")
    lines.append(f"Quantized checkpoints tested both ways: {quantized}. Not in the matrix: `gemma2`, whose mlx-lm "
                 "attention cannot take a batch's mask, split or not.")  # fmt: skip
    return "\n".join(lines)


def sys_module_file(model_dir: Path) -> str:
    model_class, _ = _get_classes(json.loads((model_dir / "config.json").read_text()))
    return sys.modules[model_class.__module__].__file__ or ""


def test_readme_lists_what_the_matrix_showed(
    zoo: dict[str, Path], support: dict[str, Support], ring2: list[dict], ring3: list[dict]
) -> None:
    """README's architecture table is this test's output: SHARDLINE_WRITE_README=1 writes it there."""
    table = support_table(zoo, support, ring2, ring3)
    text = README.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    if os.environ.get("SHARDLINE_WRITE_README") == "1":
        README.write_text(text[:start] + "\n" + table + "\n" + text[end:])
        text = README.read_text()
        start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    assert text[start:end].strip() == table, "README's table is stale: run this test with SHARDLINE_WRITE_README=1"
