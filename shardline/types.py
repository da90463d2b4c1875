"""Domain types shared by workflows, activities and the API (plain, serialisable dataclasses)."""

from dataclasses import dataclass, field

MAX_DRAFT_TOKENS = 16  # speculative decoding by prompt lookup: draft tokens a step, at most
# ... and only while at most this many requests decode together (past it, measured on a 2-core CPU, the forward
# pass is busy with the batch already, and checking every row's drafts costs more than they save)
DRAFT_MAX_BATCH = 4


@dataclass(frozen=True)
class LayerRange:
    """Transformer layers [start, end): half-open, like Python slices."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"invalid layer range [{self.start}, {self.end})")

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and self.start <= layer < self.end


@dataclass
class PartialModel:
    """A model a node holds only some layers of (a serve's download): the ranges whose weights are complete."""

    model_id: str
    layers: list[LayerRange] = field(default_factory=list)


@dataclass
class NodeResources:
    node_id: str
    hostname: str
    backend: str  # cpu | metal | cuda
    chip: str
    memory_total: int
    memory_available: int
    disk_free: int
    models: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    prompt_cache_bytes: int = 0  # KV state this node's runners keep in their prefix caches
    partial_models: list[PartialModel] = field(default_factory=list)  # not in `models`: only some layers here


@dataclass
class PresenceInput:
    node_id: str
    report_every_s: float
    lease_s: float


@dataclass
class DownloadRequest:
    node_id: str
    model_id: str
    revision: str | None = None
    layers: LayerRange | None = None


@dataclass
class DownloadProgress:
    phase: str  # listing | downloading | done
    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0
    bytes_per_s: float = 0.0
    eta_s: float | None = None


@dataclass
class DownloadResult:
    model_id: str
    path: str
    files: list[str]
    bytes_total: int
    bytes_fetched: int  # what crossed the network in the last attempt; 0 = all already on disk
    seconds: float


@dataclass
class DeleteRequest:
    node_id: str
    model_id: str


@dataclass
class DeleteResult:
    removed: bool
    bytes_freed: int


@dataclass
class ShardSpec:
    """One rank of a served instance, as the serving workflow hands it to run_shard."""

    instance_id: str
    model_id: str
    strategy: str  # pipeline | tensor
    rank: int
    world_size: int
    layers: LayerRange
    splits: list[int]  # layers per rank, in rank order (pipeline)
    hosts: list[str]  # "ip:port" of every rank's ring endpoint, in rank order
    generation: int = 0  # which placement of the instance this runner belongs to
    secret: str = ""  # rank 0 serves only requests that carry it; "" = open (instances started before it existed)
    draft_tokens: int = 0  # speculative decoding by prompt lookup, drafts a step, for requests that do not say
    draft_max_batch: int = DRAFT_MAX_BATCH  # speculate only while at most this many requests decode together
    draft_model: str | None = None  # speculative decoding by a draft model (rank 0 loads it): its model id


@dataclass
class RunnerReady:
    instance_id: str
    rank: int
    node_id: str
    endpoint: str | None  # rank 0's HTTP endpoint
    generation: int = 0
    memory_bytes: int = 0


@dataclass
class InspectRequest:
    model_id: str
    revision: str | None = None
