"""Ollama's API on a real cluster, through the official `ollama` Python client: chat and generate (NDJSON streams,
tools, format as a JSON schema, options), the model listings, and pull / delete as the cluster's downloads."""

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jsonschema
import pytest
from ollama import AsyncClient, ResponseError

from tests.conftest import TINY, TOOLS, Cluster
from tests.support.model_factory import PLAIN_ANSWER, TOOL_ANSWER
from tests.support.serving import running_nodes, start_instance, wait_state
from tests.support.waits import eventually

pytestmark = pytest.mark.asyncio(loop_scope="session")
NODE = "ol-n"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
async def served(cluster: Cluster) -> AsyncIterator[None]:
    """The tool model on one node, the only one online (a pull goes onto every online node)."""
    async with httpx.AsyncClient(base_url=cluster.api, timeout=60) as api, running_nodes(cluster, api, [NODE]):

        async def alone() -> bool:
            nodes = (await api.get("/nodes")).json()
            return [n["node_id"] for n in nodes if n["state"] == "online"] == [NODE]

        await eventually(alone, 30, f"{NODE} is the only node online")
        instance_id = await start_instance(api, TOOLS, nodes=[NODE])
        ready = await wait_state(api, instance_id, {"ready", "failed"})
        assert ready["state"] == "ready", ready["reason"]
        yield
        await api.delete(f"/instances/{instance_id}")


def client(cluster: Cluster) -> AsyncClient:
    return AsyncClient(host=cluster.api)


async def test_chat_calls_a_tool_and_answers_with_its_result(cluster: Cluster, served: None) -> None:
    ollama = client(cluster)
    reply = await ollama.chat(model=TOOLS, messages=ASK, tools=[WEATHER], options=GREEDY, stream=False)
    assert reply.done and reply.done_reason == "stop" and reply.prompt_eval_count and reply.eval_count
    (call,) = reply.message.tool_calls or []
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    history = [*ASK, reply.message, {"role": "tool", "content": "sunny, 24 C", "tool_name": "get_weather"}]
    answer = await ollama.chat(model=TOOLS, messages=history, tools=[WEATHER], options=GREEDY, stream=False)
    assert answer.message.content == TOOL_ANSWER
    parts = [p async for p in await ollama.chat(model=f"{TOOLS}:latest", messages=history, tools=[WEATHER],
                                                 options=GREEDY, stream=True)]  # fmt: skip
    assert parts[0].message.content == "" and not parts[0].done  # the first line comes before the prefill
    assert "".join(p.message.content or "" for p in parts) == TOOL_ANSWER and parts[-1].done
    streamed_calls = [c async for p in await ollama.chat(model=TOOLS, messages=ASK, tools=[WEATHER], options=GREEDY,
                                                          stream=True) for c in p.message.tool_calls or []]  # fmt: skip
    assert [c.function.arguments for c in streamed_calls] == [{"city": "Paris"}]


async def test_generate_streams_and_maps_options(cluster: Cluster, served: None) -> None:
    ollama = client(cluster)
    reply = await ollama.generate(model=TOOLS, prompt="Hello", options=GREEDY, stream=False)
    assert reply.response == PLAIN_ANSWER and reply.done_reason == "stop"
    parts = [p async for p in await ollama.generate(model=TOOLS, prompt="Hello", options=GREEDY, stream=True)]
    assert "".join(p.response or "" for p in parts) == PLAIN_ANSWER and parts[-1].eval_count == 2
    options = {**GREEDY, "num_predict": 3, "seed": 1, "top_k": 5, "repeat_penalty": 1.1}
    cut = await ollama.generate(model=TOOLS, prompt="The quick brown fox", raw=True, options=options, stream=False)
    assert cut.eval_count and cut.eval_count <= 3
    loaded = await ollama.generate(model=TOOLS, prompt="")  # what clients send to load a model
    assert loaded.done and loaded.done_reason == "load"


async def test_format_is_a_json_schema_the_output_follows(cluster: Cluster, served: None) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}  # fmt: skip
    reply = await client(cluster).chat(model=TOOLS, messages=ASK, format=schema, options={"num_predict": 64,
                                                                                          "seed": 3})  # fmt: skip
    jsonschema.validate(json.loads(reply.message.content or ""), schema)


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"options": {"mirostat": 2}}, "mirostat"),
        ({"messages": [{"role": "user", "content": "hi", "images": ["AAAA"]}]}, "images"),
        ({"format": "yaml"}, "format"),
        ({"model": "test-org/nowhere"}, "not served"),
    ],
)
async def test_what_cannot_be_honoured_is_an_ollama_error_naming_it(
    cluster: Cluster, served: None, body: dict[str, Any], named: str
) -> None:
    request = {"model": TOOLS, "messages": ASK, "stream": False, **body}
    async with httpx.AsyncClient(base_url=cluster.api, timeout=60) as http:
        response = await http.post("/api/chat", json=request)
    assert response.status_code in (400, 404) and named in response.json()["error"]
    if "format" not in body:  # the client checks that one itself
        with pytest.raises(ResponseError, match=named):
            await client(cluster).chat(**request)


async def test_models_listed_shown_and_running(cluster: Cluster, served: None) -> None:
    ollama = client(cluster)
    assert TOOLS in [m.model for m in (await ollama.list()).models]
    (running,) = [m for m in (await ollama.ps()).models if m.model == TOOLS]
    assert running.context_length == 4096
    shown = await ollama.show(TOOLS)
    assert shown.capabilities == ["completion", "tools"] and shown.modelinfo
    with pytest.raises(ResponseError) as missing:
        await ollama.show("test-org/nowhere")
    assert missing.value.status_code == 404
    async with httpx.AsyncClient(base_url=cluster.api) as http:
        assert (await http.get("/api/version")).json()["version"]


async def test_pull_is_a_download_with_ollama_s_progress_and_delete_removes_it(cluster: Cluster, served: None) -> None:
    ollama = client(cluster)
    updates = [p async for p in await ollama.pull(TINY, stream=True)]
    assert updates[0].status == "pulling manifest" and updates[-1].status == "success"
    bytes_seen = [p for p in updates if p.digest == f"download:{NODE}:{TINY}"]
    assert bytes_seen and bytes_seen[-1].completed == bytes_seen[-1].total > 0

    async def listed() -> bool:
        return TINY in [m.model for m in (await ollama.list()).models]

    await eventually(listed, 30, f"{TINY} listed once on the node's disk")
    assert (await ollama.pull(TINY, stream=False)).status == "success"  # all on disk: nothing to fetch
    assert (await ollama.delete(TINY)).status == "success"

    async def gone() -> bool:
        return not await listed()

    await eventually(gone, 30, f"{TINY} gone from the listing")
    with pytest.raises(ResponseError) as again:
        await ollama.delete(TINY)
    assert again.value.status_code == 404
