"""What placement learns of a model from the hub, through a real mirror (olah): each layer's bytes as the weight
files' headers say, for float and mixed-bit quantized checkpoints with tied embeddings; the estimate when the
headers cannot be read. olah's local mirrors ignore byte ranges: the header is read from the stream's start."""

import json
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
from mlx_lm import convert
from safetensors import safe_open

import activities.cluster
from activities.cluster import profile_model
from shardline.model_files import layer_sizes, tensor_layer
from shardline.types import InspectRequest
from tests.support.hub_mirror import HubMirror, publish_model
from tests.support.model_factory import make_tiny_model

FLOAT, QUANTIZED = "test-org/tied", "test-org/tied-mixed-3-6"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("profile")
    tied = make_tiny_model(root / "tied", num_layers=6, hidden_size=128, intermediate_size=256, num_files=3,
                           tie_word_embeddings=True)  # fmt: skip
    quantized = root / "quantized"
    convert(str(tied), str(quantized), quantize=True, quant_predicate="mixed_3_6")  # 6-bit and 3-bit layers
    return {FLOAT: tied, QUANTIZED: quantized}


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]) -> Iterator[HubMirror]:
    root = tmp_path_factory.mktemp("profile-hub")
    for repo_id, source in sources.items():
        publish_model(source, root / "mirrors", repo_id)
    with HubMirror(root / "mirrors", root / "olah") as hub, pytest.MonkeyPatch.context() as patch:
        # what HF_ENDPOINT sets when huggingface_hub is imported (it was, before the mirror had a port)
        patch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        patch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                      hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")  # fmt: skip
        yield hub


def stored(model_dir: Path, num_layers: int) -> tuple[list[int], int]:
    """Each layer's bytes and the rest, as the files on disk hold them."""
    layers, outer = [0] * num_layers, 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "numpy") as weights:
            for name in weights.keys():  # noqa: SIM118 - safe_open is no mapping
                size = weights.get_tensor(name).nbytes
                layer = tensor_layer(name)
                if layer is None:
                    outer += size
                else:
                    layers[layer] += size
    return layers, outer


@pytest.mark.parametrize("repo_id", [FLOAT, QUANTIZED])
def test_each_layers_bytes_come_from_the_headers(
    mirror: HubMirror, sources: dict[str, Path], tmp_path: Path, repo_id: str
) -> None:
    profile = profile_model(InspectRequest(repo_id, None), tmp_path)
    assert (profile.layer_sizes, profile.outer_bytes) == stored(sources[repo_id], 6)
    assert profile.layer_bytes == max(profile.layer_sizes)
    assert profile.why_not_pipeline == ("" if profile.pipeline else "model type 'llama' does not support pipeline "
                                        "parallelism")  # fmt: skip


def test_mixed_bits_are_counted_as_stored(mirror: HubMirror, sources: dict[str, Path], tmp_path: Path) -> None:
    profile = profile_model(InspectRequest(QUANTIZED, None), tmp_path)
    assert len(set(profile.layer_sizes)) == 2  # 6-bit layers hold more than 3-bit ones
    weights = sum(p.stat().st_size for p in sources[QUANTIZED].glob("*.safetensors"))
    config = json.loads((sources[QUANTIZED] / "config.json").read_text())
    _, even_share, _ = layer_sizes(config, weights)
    assert even_share < profile.layer_bytes  # the estimate would have planned less than the 6-bit layers hold


def test_headers_that_cannot_be_read_leave_the_estimate(
    mirror: HubMirror, sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(*_: object, **__: object) -> dict[str, int]:
        raise ValueError("a safetensors header of 0 bytes: not a safetensors file")

    monkeypatch.setattr(activities.cluster, "safetensors_sizes", unreadable)
    profile = profile_model(InspectRequest(QUANTIZED, None), tmp_path)
    weights = sum(p.stat().st_size for p in sources[QUANTIZED].glob("*.safetensors"))
    config = json.loads((sources[QUANTIZED] / "config.json").read_text())
    assert profile.layer_sizes == []
    assert (profile.num_layers, profile.layer_bytes, profile.outer_bytes) == layer_sizes(config, weights)
