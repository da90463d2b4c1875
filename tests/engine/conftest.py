"""Runners of tiny models made on the spot, and plain mlx_lm in this process to compare them with."""

from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_sampler

from tests.support.model_factory import make_tiny_model
from tests.support.runners import Served, node_copy, rank_specs, serving


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine")


@pytest.fixture(scope="module")
def qwen_dir(workdir: Path) -> Path:
    # One layer per file, so pipeline ranks need different files.
    return make_tiny_model(workdir / "qwen", model_type="qwen2", num_layers=4, num_files=4)


@pytest.fixture(scope="module")
def llama_dir(workdir: Path) -> Path:
    return make_tiny_model(workdir / "llama", model_type="llama", num_layers=4, num_files=2)


@pytest.fixture(scope="module")
def single_llama(workdir: Path, llama_dir: Path) -> Iterator[Served]:
    with serving(rank_specs([llama_dir], "single"), workdir, "single-llama") as served:
        yield served


@pytest.fixture(scope="module")
def single_qwen(workdir: Path, qwen_dir: Path) -> Iterator[Served]:
    with serving(rank_specs([qwen_dir], "single", draft_max_batch=8), workdir, "single-qwen") as served:
        yield served


@pytest.fixture(scope="module")
def pipe2(workdir: Path, qwen_dir: Path) -> Iterator[Served]:
    splits = [1, 3]  # uneven: rank 0 runs layer 3, rank 1 layers 0-2
    dirs = [node_copy(qwen_dir, workdir / f"pipe2-node{rank}", splits, rank) for rank in range(2)]
    with serving(rank_specs(dirs, "pipeline", splits), workdir, "pipe2") as served:
        yield served


@pytest.fixture(scope="module")
def pipe3(workdir: Path, qwen_dir: Path) -> Iterator[Served]:
    with serving(rank_specs([qwen_dir] * 3, "pipeline", [2, 1, 1]), workdir, "pipe3") as served:
        yield served


@pytest.fixture(scope="module")
def tensor2(workdir: Path, llama_dir: Path) -> Iterator[Served]:
    with serving(rank_specs([llama_dir] * 2, "tensor"), workdir, "tensor2") as served:
        yield served


@pytest.fixture(scope="module")
def references() -> Iterator:
    models: dict[Path, tuple] = {}

    def generate(
        model_dir: Path, prompt: str | list[dict], max_tokens: int, **sampling: float
    ) -> list[tuple[str, int]]:
        if model_dir not in models:
            models[model_dir] = load(str(model_dir))
        model, tokenizer = models[model_dir]
        if isinstance(prompt, list):
            prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        mx.random.seed(int(sampling.pop("seed", 0)))
        sampler = make_sampler(sampling.get("temperature", 0.0), sampling.get("top_p", 1.0))
        responses = stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler)
        return [(r.text, r.token) for r in responses]

    return generate
