"""Ollama's API next to OpenAI's, for the tools that speak only it (Open WebUI, editors, LangChain's and
LlamaIndex's Ollama classes): chat and generate (NDJSON streams), the models on the cluster's nodes and those served,
and pull / delete as the cluster's durable downloads and deletes."""

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from api import views
from api.deps import ClientDep, HttpDep, InferenceDep, InstancesDep, SettingsDep
from api.errors import status_for
from api.inference import gather
from api.ollama_types import VERSION, ModelRef, OllamaChat, OllamaGenerate, OllamaStream, Pull, line, loaded, now_iso
from api.routes.downloads import start_downloads
from api.routes.nodes import delete_model
from api.runners import runner_stats
from api.schemas import OLLAMA_STATUSES, DownloadCreate, DownloadOut, OllamaErrorOut, error_responses, streamed
from api.streaming import sse_response
from shardline.errors import ErrorType, ShardlineError
from shardline.ids import InvalidId, check_model_id
from shardline.states import InstanceState, NodeState, WorkState
from workflows.serve import InstanceStatus

router = APIRouter(prefix="/api", tags=["ollama"], responses=error_responses(OllamaErrorOut, OLLAMA_STATUSES))
PULL_POLL_S = 0.5
NDJSON = "application/x-ndjson"
NEVER = "2100-01-01T00:00:00Z"  # an instance stays loaded until someone stops it


@router.post("/chat", response_model=None, responses=streamed(NDJSON))
async def chat(body: OllamaChat, inference: InferenceDep) -> StreamingResponse | JSONResponse:
    return await answer(body, inference, chat=True, empty=not body.messages)


@router.post("/generate", response_model=None, responses=streamed(NDJSON))
async def generate(body: OllamaGenerate, inference: InferenceDep) -> StreamingResponse | JSONResponse:
    return await answer(body, inference, chat=False, empty=not body.prompt)


async def answer(
    body: OllamaChat | OllamaGenerate, inference: InferenceDep, *, chat: bool, empty: bool
) -> StreamingResponse | JSONResponse:
    stream = OllamaStream(body.model, chat=chat)
    if empty:  # a client loading the model: it is loaded while it is served
        await inference.instance_for(body.served)
        return JSONResponse(loaded(body.model, chat=chat))
    lines = await inference.start(body.served, body.generate_body())
    if body.stream:
        return sse_response(lines, stream)
    done = await gather(lines)
    return JSONResponse(stream.final(done.final, done.text, done.reasoning, done.tool_calls if chat else None))


def digest(model: str) -> str:
    return hashlib.sha256(model.encode()).hexdigest()


def details() -> dict[str, Any]:
    return {"parent_model": "", "format": "mlx", "family": "", "families": [], "parameter_size": "",
            "quantization_level": ""}  # fmt: skip


def entry(model: str) -> dict[str, Any]:
    return {"name": model, "model": model, "modified_at": now_iso(), "size": 0, "digest": digest(model),
            "details": details()}  # fmt: skip


async def on_disk(client: ClientDep) -> set[str]:
    return {m for n in await views.list_nodes(client) if n.state == NodeState.ONLINE for m in n.models}


async def ready(instances: InstancesDep) -> list[InstanceStatus]:
    return [i for i in await instances.all() if i.state == InstanceState.READY and i.endpoint]


@router.get("/tags")
async def tags(client: ClientDep, instances: InstancesDep) -> dict[str, Any]:
    """Every model on an online node's disk, and every one served."""
    models = await on_disk(client) | {i.model_id for i in await ready(instances)}
    return {"models": [entry(m) for m in sorted(models)]}


@router.get("/ps")
async def ps(instances: InstancesDep, http: HttpDep) -> dict[str, Any]:
    """The models served now (each once, however many instances serve it)."""
    first: dict[str, InstanceStatus] = {}
    for instance in await ready(instances):
        first.setdefault(instance.model_id, instance)
    stats = await asyncio.gather(*(runner_stats(http, i) for i in first.values()))
    return {"models": [entry(m) | {"expires_at": NEVER, "size_vram": 0, "context_length": (s or {}).get("context")}
                       for m, s in zip(first, stats, strict=True)]}  # fmt: skip


@router.post("/show")
async def show(body: ModelRef, client: ClientDep, instances: InstancesDep, http: HttpDep) -> dict[str, Any]:
    model = body.served
    served = [i for i in await ready(instances) if i.model_id == model]
    if not served and model not in await on_disk(client):
        raise ShardlineError(ErrorType.NOT_FOUND, f"model {model!r} not found: pull it with /api/pull")
    stats = (await runner_stats(http, served[0]) or {}) if served else {}
    info = {"general.architecture": "", "general.name": model}
    if stats.get("context"):
        info["shardline.context_length"] = stats["context"]
    return {"modelfile": "", "parameters": "", "template": "", "details": details(), "model_info": info,
            "capabilities": stats.get("capabilities", ["completion"]), "modified_at": now_iso()}  # fmt: skip


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": VERSION}


@router.post("/pull", response_model=None, responses=streamed(NDJSON))
async def pull(body: Pull, client: ClientDep, settings: SettingsDep) -> StreamingResponse | JSONResponse:
    """A download workflow onto every online node, its progress as Ollama streams a pull's."""
    try:
        model = check_model_id(body.served)
    except InvalidId as exc:
        raise ShardlineError(ErrorType.BAD_INPUT, str(exc)) from exc
    started = await start_downloads(DownloadCreate(model=model), client, settings)
    progress = pull_progress(client, started.workflow_ids)
    if body.stream:
        return StreamingResponse(pull_lines(progress), media_type=NDJSON)
    last = [update async for update in progress][-1]
    if "error" in last:
        return JSONResponse(last, status_code=status_for(ErrorType(last["type"])))
    return JSONResponse({"status": "success"})


async def pull_lines(progress: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    yield line({"status": "pulling manifest"})
    async for update in progress:
        yield line({k: v for k, v in update.items() if k != "type"})


async def pull_progress(client: ClientDep, workflow_ids: list[str]) -> AsyncIterator[dict[str, Any]]:
    """Each download's bytes as they change, then `success`, or the first failure as `error`."""
    seen: dict[str, tuple[int, int]] = {}
    while True:
        found = [await views.download_detail(client, w) for w in workflow_ids]
        for w, d in zip(workflow_ids, found, strict=True):
            if d is None:
                continue
            done = d.progress.bytes_done if d.progress else 0
            total = d.progress.bytes_total if d.progress else 0
            if d.state == WorkState.COMPLETED:  # its size as the result says (a quick one may never have reported)
                done = total = int((d.result or {}).get("bytes_total", max(total, done)))
            if (done, total) != seen.get(w):
                seen[w] = (done, total)
                yield {"status": f"pulling {d.model_id} onto {d.node_id}", "digest": w, "total": total,
                       "completed": done}  # fmt: skip
        failed = [d for d in found if d is not None and d.state in (WorkState.FAILED, WorkState.CANCELED)]
        if failed:
            d = failed[0]
            yield failure(d)
            return
        if all(d is not None and d.state == WorkState.COMPLETED for d in found):
            for status in ("verifying sha256 digest", "writing manifest", "success"):
                yield {"status": status}
            return
        await asyncio.sleep(PULL_POLL_S)


def failure(d: DownloadOut) -> dict[str, Any]:
    kind = d.error_type or ErrorType.INTERNAL
    return {"error": f"pulling {d.model_id} onto {d.node_id} {d.state}: {d.reason}", "type": kind.value}


@router.delete("/delete")
async def delete(body: ModelRef, client: ClientDep, settings: SettingsDep) -> dict[str, Any]:
    """The model's files off every node that has them (refused while a download or an instance uses them)."""
    model = body.served
    holders = [n.node_id for n in await views.list_nodes(client) if model in n.models]
    if not holders:
        raise ShardlineError(ErrorType.NOT_FOUND, f"model {model!r} not found")
    for node_id in holders:
        await delete_model(node_id, model, client, settings)
    return {"status": "success"}
