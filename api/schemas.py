"""Request and response models of the admin endpoints."""

from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, field_validator

from shardline.errors import ErrorType
from shardline.ids import (
    DOWNLOAD_ID,
    MODEL_ID,
    NODE_ID,
    WORKFLOW_ID,
    anchored,
    check_model_id,
    check_node_id,
    serve_workflow_id,
)
from shardline.types import DRAFT_MAX_BATCH, MAX_DRAFT_TOKENS

# What the OpenAPI document says of ids: the patterns the API checks them against (shardline/ids.py), its own
# checks giving the message
ModelId = Annotated[str, Field(json_schema_extra={"pattern": anchored(MODEL_ID)})]
NodeId = Annotated[str, Field(json_schema_extra={"pattern": anchored(NODE_ID)})]
NodePath = Annotated[str, Path(json_schema_extra={"pattern": anchored(NODE_ID)})]
ModelPath = Annotated[str, Path(json_schema_extra={"pattern": anchored(MODEL_ID)})]
DownloadPath = Annotated[str, Path(json_schema_extra={"pattern": anchored(DOWNLOAD_ID)})]
WorkflowPath = Annotated[str, Path(json_schema_extra={"pattern": anchored(WORKFLOW_ID)})]


class ErrorBody(BaseModel):
    message: str
    type: str
    code: int


class ErrorOut(BaseModel):
    error: ErrorBody


class PartialModelOut(BaseModel):
    model: str
    layers: list[tuple[int, int]] = Field(description="the layer ranges [start, end) held complete")


class AnthropicErrorBody(BaseModel):
    type: str
    message: str


class AnthropicErrorOut(BaseModel):
    type: Literal["error"] = "error"
    error: AnthropicErrorBody


class OllamaErrorOut(BaseModel):
    error: str


# what the handlers of api/errors.py can answer, declared on each router so the OpenAPI document tells the truth
ADMIN_STATUSES = (400, 401, 403, 404, 409, 422, 500, 502, 503, 507)  # 400: a body that is not JSON; 401: the API key
INFERENCE_STATUSES = (400, 401, 404, 429, 500, 502, 503)  # 400: what cannot be honoured; 429: a full queue
OLLAMA_STATUSES = (*INFERENCE_STATUSES, 403, 409, 422, 507)  # pull and delete answer as downloads and deletes do


def streamed(media_type: str) -> dict[int | str, dict[str, Any]]:
    """A route that answers JSON, or a stream when asked (`stream: true`)."""
    return {200: {"content": {"application/json": {}, media_type: {}}, "description": "the answer, or its stream"}}


def error_responses(model: type[BaseModel], statuses: tuple[int, ...]) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": model, "description": "an error a person can act on"} for status in statuses}


class NodeOut(BaseModel):
    node_id: str
    state: str
    workflow_id: str
    hostname: str | None = None
    host: str | None = Field(default=None, description="address the node's runners listen on (SHARDLINE_NODE_HOST)")
    backend: str | None = None
    chip: str | None = None
    memory_total: int | None = None
    memory_available: int | None = None
    disk_free: int | None = None
    models: list[str] = Field(default_factory=list)  # held whole
    partial_models: list[PartialModelOut] = Field(
        default_factory=list, description="models of which only some layers are here (a serve's downloads)"
    )
    prompt_cache_bytes: int = 0  # KV state the node's runners keep in their prefix caches


class DownloadCreate(BaseModel):
    model: ModelId
    node_id: NodeId | None = None
    revision: str | None = None

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return check_model_id(value)

    @field_validator("node_id")
    @classmethod
    def _node(cls, value: str | None) -> str | None:
        return None if value is None else check_node_id(value)


class DownloadsStarted(BaseModel):
    workflow_ids: list[str]


class Progress(BaseModel):
    phase: str
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    bytes_per_s: float
    eta_s: float | None
    percent: float


class DownloadOut(BaseModel):
    workflow_id: str
    node_id: str | None
    model_id: str | None
    state: str
    status: str
    started_at: str | None = None
    closed_at: str | None = None
    attempt: int | None = None
    progress: Progress | None = None
    last_failure: str | None = None
    reason: str | None = None
    error_type: ErrorType | None = None  # why it failed (or canceled), as a program reads it
    result: dict[str, Any] | None = None


class Accepted(BaseModel):
    workflow_id: str
    state: str
    result: dict[str, Any] | None = None


class PromptLookup(BaseModel):
    """Speculative decoding for every request of the instance that does not say otherwise (`num_draft_tokens` on a
    request): draft tokens copied from the context where it repeats itself, checked in one forward pass."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["prompt_lookup"] = "prompt_lookup"
    num_draft_tokens: int = Field(4, ge=1, le=MAX_DRAFT_TOKENS, description="draft tokens a step, at most")
    max_batch: int = Field(
        DRAFT_MAX_BATCH, ge=1, description="speculate only while at most this many requests decode together (past "
        "that a busy CPU spends more checking drafts than they save; raise it where decoding waits on memory)"
    )  # fmt: skip


class DraftModel(PromptLookup):
    """Speculative decoding as by prompt lookup, with drafts written by a small model that shares the model's
    tokenizer (downloaded whole onto rank 0's node)."""

    method: Literal["draft_model"]  # type: ignore[assignment]
    draft_model: ModelId = Field(description="the draft model's id")

    @field_validator("draft_model")
    @classmethod
    def _draft_model(cls, value: str) -> str:
        return check_model_id(value)


Speculative = DraftModel | PromptLookup


class InstanceCreate(BaseModel):
    model: ModelId
    nodes: list[NodeId] | None = None
    strategy: Literal["auto", "pipeline", "tensor"] | None = Field(
        None, description="omitted, null or auto: placement picks what the architecture supports and fits"
    )
    revision: str | None = None
    speculative: Speculative | None = Field(None, description="omitted or null: off")

    @property
    def draft_model(self) -> str | None:
        return self.speculative.draft_model if isinstance(self.speculative, DraftModel) else None

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return check_model_id(value)

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [check_node_id(n) for n in value]


class ShardOut(BaseModel):
    node_id: str
    rank: int
    layers: tuple[int, int]  # [start, end)
    ready: bool


class PreviewShardOut(BaseModel):
    node_id: str
    rank: int
    layers: tuple[int, int]  # [start, end)
    bytes: int = Field(description="what the node would hold: its layers' weights and the embeddings and head it needs")


class PreviewOut(BaseModel):
    model: str
    strategy: str = Field(description="what would run: pipeline, tensor, or single (whole on one node)")
    reason: str = Field(description="why that strategy and those nodes")
    shards: list[PreviewShardOut]
    total_bytes: int = Field(description="the whole model's weights")

    @classmethod
    def from_preview(cls, p: Any) -> "PreviewOut":
        shards = [PreviewShardOut(node_id=s.node_id, rank=s.rank, layers=(s.layer_start, s.layer_end),
                                  bytes=s.planned_bytes) for s in p.shards]  # fmt: skip
        return cls(model=p.model_id, strategy=p.strategy, reason=p.reason, shards=shards, total_bytes=p.total_bytes)


class InstanceOut(BaseModel):
    instance_id: str
    workflow_id: str
    model: str
    state: str
    strategy: str = Field(description="as asked until placed; then pipeline, tensor, or single (whole on one node)")
    strategy_reason: str | None = Field(None, description="why that strategy and those nodes, once placed")
    shards: list[ShardOut] = Field(default_factory=list)
    endpoint: str | None = None
    recoveries: int = 0
    reason: str | None = None
    error_type: ErrorType | None = None  # why it failed, as a program reads it
    incidents: list[str] = Field(default_factory=list, description="why it recovered, newest last")
    carried_over: int = Field(0, description="generations the API resumed after a runner of this instance was lost")
    speculative: Speculative | None = None

    @classmethod
    def of(cls, instance_id: str, model: str, state: str, strategy: str) -> "InstanceOut":
        return cls(instance_id=instance_id, workflow_id=serve_workflow_id(instance_id), model=model, state=state,
                   strategy=strategy)  # fmt: skip

    @classmethod
    def from_status(cls, s: Any) -> "InstanceOut":
        shards = [ShardOut(node_id=x.node_id, rank=x.rank, layers=(x.layer_start, x.layer_end), ready=x.ready)
                  for x in s.shards]  # fmt: skip
        out = cls.of(s.instance_id, s.model_id, s.state, s.strategy)
        kind = ErrorType(s.error_type) if s.error_type else None
        drafts: Speculative | None = None
        if s.draft_tokens:
            common = {"num_draft_tokens": s.draft_tokens, "max_batch": s.draft_max_batch}
            drafts = (DraftModel(method="draft_model", draft_model=s.draft_model, **common) if s.draft_model
                      else PromptLookup(**common))  # fmt: skip
        return out.model_copy(update={"shards": shards, "endpoint": s.endpoint, "recoveries": s.recoveries,
                                      "reason": s.reason, "error_type": kind, "incidents": list(s.incidents),
                                      "strategy_reason": s.strategy_reason or None,
                                      "carried_over": s.carried_over, "speculative": drafts})  # fmt: skip
