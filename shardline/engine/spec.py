"""What one runner process serves: the JSON file handed to `python -m shardline.engine.runner`.

Importable without MLX, so the activity that writes the spec need not load the engine.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shardline.types import DRAFT_MAX_BATCH, MAX_DRAFT_TOKENS, LayerRange

STRATEGIES = ("single", "pipeline", "tensor")
DRAFT_METHODS = ("prompt_lookup", "draft_model")


@dataclass(frozen=True)
class RunnerSpec:
    """One rank of an instance.

    Pipeline: rank 0 runs the LAST layers and rank world_size-1 the FIRST (mlx_lm's
    convention), so `layers` must equal [sum(splits[rank+1:]), sum(splits[rank:])).
    """

    model_path: str
    strategy: str = "single"  # single | pipeline | tensor
    rank: int = 0
    world_size: int = 1
    layers: LayerRange | None = None  # this rank's layers (pipeline); None = all
    splits: list[int] = field(default_factory=list)  # layers per rank, in rank order (pipeline)
    hosts: list[str] = field(default_factory=list)  # "ip:port" ring endpoint of every rank, in rank order
    http_host: str = "127.0.0.1"
    http_port: int = 0  # 0 = any free port; only rank 0 serves HTTP
    # rank 0's scheduling (the other ranks follow it, whatever their own values)
    max_batch: int = 32  # requests decoded together
    max_queue: int = 256  # requests waiting to join; past that the runner answers 429
    prompt_cache_bytes: int = 1 << 30  # prefix cache budget, per rank; 0 = off
    draft_tokens: int = 0  # speculative decoding by prompt lookup, drafts a step, for requests that do not say; 0 = off
    draft_max_batch: int = DRAFT_MAX_BATCH  # speculate only while at most this many requests decode (every rank alike)
    draft_method: str = "prompt_lookup"  # where drafts come from (every rank alike): prompt_lookup | draft_model
    draft_model_path: str = ""  # draft_model: the draft model's directory, on rank 0 ("" on the others)
    overlap: bool = True  # pipeline: decode in micro-batches that keep every rank busy (every rank alike; overlap.py)
    secret: str = ""  # rank 0 answers /generate and /stats only with `Authorization: Bearer <secret>`; "" = open

    def __post_init__(self) -> None:
        problem = spec_problem(self)
        if problem:
            raise ValueError(problem)

    def to_json(self) -> str:
        data = asdict(self)
        data["layers"] = [self.layers.start, self.layers.end] if self.layers else None
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "RunnerSpec":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("runner spec must be a JSON object")
        layers = data.pop("layers", None)
        return cls(**data, layers=LayerRange(*layers) if layers is not None else None)

    @classmethod
    def read(cls, path: Path) -> "RunnerSpec":
        return cls.from_json(path.read_text(encoding="utf-8"))


def spec_problem(spec: RunnerSpec) -> str | None:
    """Why a spec cannot be served, or None."""
    if spec.strategy not in STRATEGIES:
        return f"strategy must be one of {', '.join(STRATEGIES)}, not {spec.strategy!r}"
    if not 0 <= spec.rank < spec.world_size:
        return f"rank {spec.rank} is outside world size {spec.world_size}"
    if (spec.strategy == "single") != (spec.world_size == 1):
        return f"strategy {spec.strategy!r} does not fit world size {spec.world_size}"
    if spec.max_batch < 1 or spec.max_queue < 1 or spec.prompt_cache_bytes < 0:
        return "max_batch and max_queue must be at least 1, prompt_cache_bytes at least 0"
    if not 0 <= spec.draft_tokens <= MAX_DRAFT_TOKENS:
        return f"draft_tokens must be 0 (off) to {MAX_DRAFT_TOKENS}"
    if spec.draft_max_batch < 1:
        return "draft_max_batch must be at least 1"
    if spec.draft_method not in DRAFT_METHODS:
        return f"draft_method must be one of {', '.join(DRAFT_METHODS)}, not {spec.draft_method!r}"
    if spec.draft_method == "draft_model" and spec.rank == 0 and not spec.draft_model_path:
        return "draft_method draft_model needs draft_model_path on rank 0"
    if spec.world_size > 1 and len(spec.hosts) != spec.world_size:
        return f"{len(spec.hosts)} ring hosts given for world size {spec.world_size}"
    if spec.strategy == "pipeline":
        return pipeline_problem(spec)
    return None


def pipeline_problem(spec: RunnerSpec) -> str | None:
    if len(spec.splits) != spec.world_size or any(n <= 0 for n in spec.splits):
        return f"splits {spec.splits} must give a positive layer count for each of {spec.world_size} ranks"
    expected = pipeline_layers(spec.splits, spec.rank)
    if spec.layers is not None and spec.layers != expected:
        return (
            f"rank {spec.rank} was given layers [{spec.layers.start}, {spec.layers.end}) but splits "
            f"{spec.splits} put it on [{expected.start}, {expected.end}) (rank 0 runs the last layers)"
        )
    return None


def pipeline_layers(splits: list[int], rank: int) -> LayerRange:
    """The layers mlx_lm's `pipeline(group, splits)` gives `rank`: rank 0 the last ones."""
    start = sum(splits[rank + 1 :])
    return LayerRange(start, start + splits[rank])
