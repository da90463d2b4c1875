"""Cluster-wide activities, run by the control worker: which nodes are online, what a model needs."""

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import structlog
from huggingface_hub import HfApi, RepoFile, hf_hub_download
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.errors import classify
from activities.hub import DEFAULT_TIMEOUT_S, bound_hub_calls, safetensors_sizes
from shardline import contracts
from shardline.contracts import implements
from shardline.engine.capabilities import sharding_support
from shardline.errors import RETRYABLE, ErrorType, error
from shardline.model_files import INDEX_FILE, layer_sizes, sizes_from_tensors
from shardline.placement import ModelProfile, NodeCapacity
from shardline.states import NodeState
from shardline.types import DeleteRequest, InspectRequest
from workflows import state

log = structlog.get_logger(__name__)
PROFILE_FILE = "shardline-profile.json"
HEADER_READERS = 8  # weight files whose headers are read at once
WAIT_POLL_S = 2.0  # how soon a serve starts its own download once the one it waited for has ended


def profile_model(req: InspectRequest, cache: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> ModelProfile:
    hub = HfApi()
    revision = hub.model_info(req.model_id, revision=req.revision or "main", timeout=timeout_s).sha
    tree = hub.list_repo_tree(req.model_id, revision=revision, recursive=True)
    sizes = {f.path: f.size for f in tree if isinstance(f, RepoFile)}
    config_path = hf_hub_download(req.model_id, "config.json", revision=revision, local_dir=cache,
                                  etag_timeout=timeout_s)  # fmt: skip
    config = json.loads(Path(config_path).read_text())
    if INDEX_FILE not in sizes and "model.safetensors" not in sizes:
        raise error(ErrorType.BAD_INPUT, f"{req.model_id} has no safetensors weights: mlx-lm cannot load it")
    weight_bytes = sum(size for name, size in sizes.items() if name.endswith(".safetensors"))
    layers, layer_bytes, outer = layer_sizes(config, weight_bytes)
    try:
        support = sharding_support(config)
    except (ValueError, ImportError) as exc:
        raise error(ErrorType.BAD_INPUT, f"{req.model_id}: mlx-lm does not support it: {exc}") from exc
    per_layer: list[int] = []  # unknown: every layer counts as the estimate's layer_bytes
    if (exact := stored_sizes(req.model_id, revision, sizes, cache, layers, timeout_s)) is not None:
        per_layer, outer = exact
        layer_bytes = max(per_layer)
    heads = int(config.get("num_attention_heads", 1))
    return ModelProfile(req.model_id, layers, layer_bytes, outer, support.pipeline, support.tensor, heads,
                        int(config.get("num_key_value_heads", heads)), support.why_not_pipeline,
                        support.why_not_tensor, per_layer)  # fmt: skip


def stored_sizes(model_id: str, revision: str, sizes: dict[str, int], cache: Path, layers: int,
                 timeout_s: float) -> tuple[list[int], int] | None:  # fmt: skip
    """(bytes of each layer, bytes outside them) as the weight files' headers say; None when they cannot be read
    (or name no tensor of some layer): then the estimate from the config places it, less closely."""
    try:
        files = weight_files(model_id, revision, sizes, cache, timeout_s)
        per_layer, outer = sizes_from_tensors(read_weight_headers(model_id, revision, files, timeout_s), layers)
    except Exception as exc:  # noqa: BLE001 - any failure here leaves the estimate
        log.warning("profile.headers_unread", model_id=model_id, reason=f"{type(exc).__name__}: {exc}")
        return None
    if not per_layer or min(per_layer) == 0:
        log.warning("profile.layers_unnamed", model_id=model_id, missing=per_layer.index(0) if per_layer else 0)
        return None
    return per_layer, outer


def weight_files(model_id: str, revision: str, sizes: dict[str, int], cache: Path, timeout_s: float) -> list[str]:
    """The safetensors files a loader reads: those the index names, else the one file."""
    if INDEX_FILE not in sizes:
        return ["model.safetensors"]
    index = hf_hub_download(model_id, INDEX_FILE, revision=revision, local_dir=cache, etag_timeout=timeout_s)
    return sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))


def read_weight_headers(model_id: str, revision: str, files: list[str], timeout_s: float) -> dict[str, int]:
    """Every tensor's stored bytes, from the headers of `files` (a few at a time: a large model has dozens)."""
    with ThreadPoolExecutor(max_workers=HEADER_READERS) as pool:
        read = pool.map(lambda name: safetensors_sizes(model_id, name, revision, timeout_s), files)
        return {tensor: size for sizes in read for tensor, size in sizes.items()}


def remember_profile(cache: Path, req: InspectRequest, profile: ModelProfile) -> None:
    """So that a serve can still place a model it has seen when the hub is unreachable (its files may be
    complete on the nodes)."""
    cache.mkdir(parents=True, exist_ok=True)
    (cache / PROFILE_FILE).write_text(json.dumps({"revision": req.revision, "profile": asdict(profile)}))


def remembered_profile(cache: Path, req: InspectRequest) -> ModelProfile | None:
    try:
        raw = json.loads((cache / PROFILE_FILE).read_text())
        return ModelProfile(**raw["profile"]) if raw["revision"] == req.revision else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


class ClusterActivities:
    def __init__(self, client: Client, cache: Path, hub_timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._client = client
        self._cache = cache
        self._hub_timeout_s = hub_timeout_s
        bound_hub_calls(hub_timeout_s)

    @implements(contracts.online_nodes)
    async def online_nodes(self, asking: str = "") -> list[NodeCapacity]:
        """Online nodes and their free memory, less what instances other than `asking` have placed on them
        and not loaded yet (their nodes' readings do not show it): two placements never count on the same bytes."""
        views = await state.list_nodes(self._client)
        reserved = await state.reserved_memory(self._client, exclude=asking) if asking else {}
        return [
            NodeCapacity(v.node_id, max(0, v.resources.memory_available - reserved.get(v.node_id, 0)), v.resources.host)
            for v in views
            if v.state == NodeState.ONLINE and v.resources is not None
        ]

    @implements(contracts.node_state)
    async def node_state(self, node_id: str) -> str:
        """online | offline | departed as the node's presence workflow says; unknown if it never joined."""
        view = await state.get_node(self._client, node_id)
        return view.state if view else NodeState.UNKNOWN

    @implements(contracts.model_users)
    async def model_users(self, req: DeleteRequest) -> list[str]:
        """Running workflows that need this model on this node (see state.model_users)."""
        return await state.model_users(self._client, req.node_id, req.model_id)

    @implements(contracts.inspect_model)
    async def inspect_model(self, req: InspectRequest) -> ModelProfile:
        cache = self._cache / req.model_id
        try:
            profile = await asyncio.to_thread(profile_model, req, cache, self._hub_timeout_s)
        except ApplicationError:
            raise
        except Exception as exc:
            kind, message = classify(exc, req.model_id)
            known = await asyncio.to_thread(remembered_profile, cache, req) if kind in RETRYABLE else None
            if known is None:
                raise error(kind, message) from exc
            activity.logger.warning("hub unreachable (%s): using the profile of %s seen before", message, req.model_id)
            return known
        await asyncio.to_thread(remember_profile, cache, req, profile)
        return profile

    @implements(contracts.wait_workflow_end)
    async def wait_workflow_end(self, workflow_id: str) -> str:
        """Until the workflow's latest run ends, however long it runs (heartbeating, so a restarted control
        worker picks the wait up again); its final status, or NOT_FOUND."""
        handle = self._client.get_workflow_handle(workflow_id)
        while True:
            try:
                status = (await handle.describe()).status
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise
                return "NOT_FOUND"
            if status != WorkflowExecutionStatus.RUNNING:
                return status.name if status else "UNKNOWN"
            activity.heartbeat()
            await asyncio.sleep(WAIT_POLL_S)
