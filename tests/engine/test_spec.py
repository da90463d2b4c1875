import pytest

from shardline.engine.protocol import Join, Sampling, Step, decode_step, encode_step
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
def test_step_round_trip(seed: int) -> None:
    sampling = Sampling(max_tokens=99, temperature=0.7, top_p=0.95, seed=seed)
    step = Step(
        leaves=[3, 9], drops=[2], joins=[Join([5, 6, 7], sampling, entry=2, reuse=2), Join([1], sampling)]
    )  # fmt: skip
    decoded = decode_step(encode_step(step))
    assert decoded.leaves == [3, 9] and decoded.drops == [2]
    first, second = decoded.joins
    assert (first.tokens, first.entry, first.reuse) == ([5, 6, 7], 2, 2)
    assert (second.tokens, second.entry, second.reuse) == ([1], None, 0)
    assert first.sampling.seed == seed and first.sampling.max_tokens == 99
    assert first.sampling.temperature == pytest.approx(0.7) and first.sampling.top_p == pytest.approx(0.95)


def test_empty_step_is_empty() -> None:
    assert not decode_step(encode_step(Step())) and encode_step(Step()) == []
