import pytest

from shardline.engine.protocol import GENERATE, Header, Sampling, decode_header, encode_header
from shardline.engine.spec import RunnerSpec, pipeline_layers
from shardline.types import LayerRange

HOSTS = ["127.0.0.1:5000", "127.0.0.1:5001", "127.0.0.1:5002"]


def test_round_trip() -> None:
    spec = RunnerSpec(
        model_path="/m", strategy="pipeline", rank=1, world_size=3, layers=LayerRange(2, 5), splits=[3, 3, 2],
        hosts=HOSTS, http_port=8123,
    )  # fmt: skip
    assert RunnerSpec.from_json(spec.to_json()) == spec


def test_rank_zero_runs_the_last_layers() -> None:
    assert [pipeline_layers([1, 3], rank) for rank in range(2)] == [LayerRange(3, 4), LayerRange(0, 3)]
    assert [pipeline_layers([2, 1, 1], rank) for rank in range(3)] == [
        LayerRange(2, 4), LayerRange(1, 2), LayerRange(0, 1)
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"strategy": "data"}, "strategy must be one of"),
        ({"strategy": "pipeline", "world_size": 1}, "does not fit world size 1"),
        ({"strategy": "tensor", "world_size": 2, "hosts": HOSTS}, "3 ring hosts given for world size 2"),
        ({"strategy": "pipeline", "world_size": 2, "hosts": HOSTS[:2], "splits": [4]}, "positive layer count"),
        (
            {"strategy": "pipeline", "world_size": 2, "hosts": HOSTS[:2], "splits": [1, 3], "layers": LayerRange(0, 1)},
            "put it on [3, 4)",
        ),
        ({"rank": 1}, "outside world size 1"),
    ],
)
def test_bad_specs(fields: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        RunnerSpec(model_path="/m", **fields)


@pytest.mark.parametrize("seed", [0, 1, 2**31, 2**32 + 5, 2**64 - 1])
def test_header_round_trip(seed: int) -> None:
    header = Header(GENERATE, 17, Sampling(max_tokens=99, temperature=0.7, top_p=0.95, seed=seed))
    decoded = decode_header(encode_header(header))
    assert decoded.prompt_len == 17 and decoded.sampling.seed == seed and decoded.sampling.max_tokens == 99
    assert decoded.sampling.temperature == pytest.approx(0.7) and decoded.sampling.top_p == pytest.approx(0.95)
