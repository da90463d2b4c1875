"""The APIs agents and chat clients speak, on a real cluster with the official clients: completions, refusals,
sampling options and logprobs, structured output, tool calls over chat/Messages/Responses, /v1/models."""

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI

from tests.conftest import QWEN, TOOLS, Cluster
from tests.support.model_factory import TOOL_ANSWER
from tests.support.serving import running_nodes, start_instance, wait_state

pytestmark = pytest.mark.asyncio(loop_scope="session")
PROMPT = "The quick brown fox"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age"],
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0}},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
async def instances(cluster: Cluster) -> AsyncIterator[dict[str, str]]:
    """QWEN on one node, the tool-calling chain model on another, for the whole module."""
    async with (
        httpx.AsyncClient(base_url=cluster.api, timeout=60) as api,
        running_nodes(cluster, api, ["ag-q", "ag-t"]),
    ):
        ids = {
            QWEN: await start_instance(api, QWEN, nodes=["ag-q"]),
            TOOLS: await start_instance(api, TOOLS, nodes=["ag-t"]),
        }
        for instance_id in ids.values():
            ready = await wait_state(api, instance_id, {"ready", "failed"})
            assert ready["state"] == "ready", ready["reason"]
        yield ids
        for instance_id in ids.values():
            await api.delete(f"/instances/{instance_id}")


def openai(cluster: Cluster) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{cluster.api}/v1", api_key="unused", max_retries=0)


def raw_reference(model_dir: Path, prompt: str, max_tokens: int) -> str:
    from mlx_lm import generate, load

    model, tokenizer = load(str(model_dir))
    return str(generate(model, tokenizer, prompt, max_tokens=max_tokens))


async def test_completions_greedy_is_mlx_lm_on_the_raw_prompt(
    cluster: Cluster, instances: dict[str, str], model_dirs: dict[str, Path]
) -> None:
    expected = raw_reference(model_dirs[QWEN], PROMPT, 10)
    client = openai(cluster)
    reply = await client.completions.create(model=QWEN, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=2)
    assert reply.choices[0].text == expected and reply.choices[0].finish_reason == "length"
    assert reply.usage and reply.usage.completion_tokens == 10
    lp = reply.choices[0].logprobs
    assert lp and len(lp.tokens or []) == 10 and all(len(t) == 2 for t in lp.top_logprobs or [])
    assert all(v <= 0 for v in lp.token_logprobs or [])
    streamed = [
        c.choices[0].text
        async for c in await client.completions.create(
            model=QWEN, prompt=PROMPT, max_tokens=10, temperature=0, stream=True
        )
        if c.choices
    ]
    assert "".join(streamed) == expected


@pytest.mark.parametrize(
    ("path", "extra", "named"),
    [
        ("/v1/chat/completions", {"n": 2}, "n"),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}],
                    }
                ]
            },
            "image_url",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ("/v1/chat/completions", {"audio": {"voice": "alloy"}}, "audio"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/completions", {"prompt": PROMPT, "echo": True}, "echo"),
        ("/v1/completions", {"prompt": PROMPT, "suffix": "x"}, "suffix"),
        ("/v1/completions", {"prompt": [PROMPT, PROMPT]}, "prompt"),
    ],
)
async def test_what_cannot_be_honoured_is_a_400_naming_it(
    cluster: Cluster, instances: dict[str, str], path: str, extra: dict[str, Any], named: str
) -> None:
    body = {"model": QWEN, "messages": ASK, "max_tokens": 4, **extra}
    if path == "/v1/completions":
        body.pop("messages")
    async with httpx.AsyncClient(base_url=cluster.api, timeout=60) as http:
        response = await http.post(path, json=body)
    assert response.status_code == 400, response.text
    assert named in response.json()["error"]["message"]


async def test_sampling_options_and_logprobs_on_chat(cluster: Cluster, instances: dict[str, str]) -> None:
    options: dict[str, Any] = {
        "temperature": 0.9,
        "seed": 5,
        "max_tokens": 8,
        "top_p": 0.95,
        "extra_body": {"top_k": 20, "min_p": 0.02, "repetition_penalty": 1.1},
        "presence_penalty": 0.3,
        "frequency_penalty": 0.2,
        "logit_bias": {"50": 1.5},
    }
    client = openai(cluster)
    one = await client.chat.completions.create(model=QWEN, messages=ASK, logprobs=True, top_logprobs=3, **options)  # type: ignore[arg-type]
    two = await client.chat.completions.create(model=QWEN, messages=ASK, logprobs=True, top_logprobs=3, **options)  # type: ignore[arg-type]
    assert one.choices[0].message.content == two.choices[0].message.content
    content = one.choices[0].logprobs and one.choices[0].logprobs.content
    assert content and len(content) == 8
    assert all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_json_schema_output_validates(cluster: Cluster, instances: dict[str, str], seed: int) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    reply = await openai(cluster).chat.completions.create(
        model=QWEN,
        messages=ASK,
        temperature=1.0,
        seed=seed,
        max_tokens=200,
        response_format=fmt,  # type: ignore[arg-type]
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), SCHEMA)


async def test_tool_round_trip_over_chat_completions(cluster: Cluster, instances: dict[str, str]) -> None:
    client = openai(cluster)
    reply = await client.chat.completions.create(model=TOOLS, messages=ASK, tools=[WEATHER], temperature=0)  # type: ignore[arg-type,list-item]
    assert reply.choices[0].finish_reason == "tool_calls"
    (call,) = reply.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    # streamed: id and name first, then the arguments
    deltas = [
        c.choices[0].delta
        async for c in await client.chat.completions.create(
            model=TOOLS, messages=ASK, tools=[WEATHER], temperature=0, stream=True
        )
        if c.choices
    ]  # type: ignore[arg-type,list-item]
    parts = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert parts[0].id and parts[0].function and parts[0].function.name == "get_weather"
    assert "".join(p.function.arguments or "" for p in parts if p.function) == call.function.arguments
    history = [
        *ASK,
        reply.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"},
    ]
    answer = await client.chat.completions.create(model=TOOLS, messages=history, tools=[WEATHER], temperature=0)  # type: ignore[arg-type,list-item]
    assert answer.choices[0].message.content == TOOL_ANSWER and answer.choices[0].finish_reason == "stop"
    streamed = [
        c.choices[0].delta.content or ""
        async for c in await client.chat.completions.create(
            model=TOOLS, messages=history, tools=[WEATHER], temperature=0, stream=True
        )
        if c.choices
    ]  # type: ignore[arg-type,list-item]
    assert "".join(streamed) == TOOL_ANSWER


ANTHROPIC_TOOL = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": WEATHER["function"]["parameters"],
}  # type: ignore[index]


async def test_tool_round_trip_over_anthropic_messages(cluster: Cluster, instances: dict[str, str]) -> None:
    client = AsyncAnthropic(base_url=cluster.api, api_key="unused", max_retries=0)
    reply = await client.messages.create(model=TOOLS, max_tokens=16, messages=ASK, tools=[ANTHROPIC_TOOL])  # type: ignore[arg-type,list-item]
    assert reply.stop_reason == "tool_use"
    (use,) = [b for b in reply.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    async with client.messages.stream(model=TOOLS, max_tokens=16, messages=ASK, tools=[ANTHROPIC_TOOL]) as stream:  # type: ignore[arg-type,list-item]
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use" and [b.input for b in final.content if b.type == "tool_use"] == [use.input]
    history = [
        *ASK,
        {"role": "assistant", "content": [b.model_dump() for b in reply.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]},
    ]
    answer = await client.messages.create(model=TOOLS, max_tokens=16, messages=history, tools=[ANTHROPIC_TOOL])  # type: ignore[arg-type,list-item]
    assert answer.stop_reason == "end_turn" and answer.content[0].text == TOOL_ANSWER  # type: ignore[union-attr]
    assert answer.usage.input_tokens > 0 and answer.usage.output_tokens == 2
    async with client.messages.stream(model=TOOLS, max_tokens=16, messages=history, tools=[ANTHROPIC_TOOL]) as stream:  # type: ignore[arg-type,list-item]
        text = "".join([t async for t in stream.text_stream])
        again = await stream.get_final_message()
    assert text == TOOL_ANSWER
    # the same prompt again: its prefix came from the cache, and Anthropic's usage says so
    assert again.usage.cache_read_input_tokens and again.usage.cache_read_input_tokens > 0
    counted = await client.messages.count_tokens(model=TOOLS, messages=history, tools=[ANTHROPIC_TOOL])  # type: ignore[arg-type,list-item]
    for usage in (answer.usage, again.usage):  # the prompt is what was computed plus what the cache held
        assert counted.input_tokens == usage.input_tokens + (usage.cache_read_input_tokens or 0)


async def test_anthropic_stop_sequences_and_errors(cluster: Cluster, instances: dict[str, str]) -> None:
    client = AsyncAnthropic(base_url=cluster.api, api_key="unused", max_retries=0)
    reply = await client.messages.create(
        model=TOOLS,
        max_tokens=16,
        messages=ASK,
        stop_sequences=["sunny"],  # type: ignore[arg-type]
        system="Be brief.",
    )
    assert reply.stop_reason in ("end_turn", "stop_sequence")
    async with httpx.AsyncClient(base_url=cluster.api, timeout=60) as http:
        bad = await http.post(
            "/v1/messages",
            json={
                "model": TOOLS,
                "max_tokens": 4,
                "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}],
            },
        )
    assert bad.status_code == 400
    assert bad.json()["type"] == "error" and "image" in bad.json()["error"]["message"]


async def test_tool_round_trip_over_responses(cluster: Cluster, instances: dict[str, str]) -> None:
    client = openai(cluster)
    tool = {"type": "function", **WEATHER["function"]}  # type: ignore[dict-item]
    reply = await client.responses.create(
        model=TOOLS,
        input="What is the weather in Paris?",
        tools=[tool],  # type: ignore[list-item]
        instructions="Use tools.",
        temperature=0,
    )
    (call,) = [o for o in reply.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    async with client.responses.stream(model=TOOLS, input="What is the weather in Paris?", tools=[tool]) as stream:  # type: ignore[list-item]
        final = await stream.get_final_response()
    assert [o.name for o in final.output if o.type == "function_call"] == ["get_weather"]
    follow = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ]
    answer = await client.responses.create(model=TOOLS, input=follow, tools=[tool], max_output_tokens=16)  # type: ignore[arg-type,list-item]
    assert answer.output_text == TOOL_ANSWER and answer.status == "completed"
    async with client.responses.stream(model=TOOLS, input=follow, tools=[tool]) as stream:  # type: ignore[arg-type,list-item]
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
    assert "".join(deltas) == TOOL_ANSWER


async def test_models_carry_context_and_placement(cluster: Cluster, instances: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=cluster.api, timeout=60) as http:
        cards = {m["id"]: m for m in (await http.get("/v1/models")).json()["data"]}
    assert cards[QWEN]["context_length"] == 4096
    (placed,) = [p for p in cards[QWEN]["placement"] if p["instance_id"] == instances[QWEN]]
    assert [s["node_id"] for s in placed["shards"]] == ["ag-q"] and placed["shards"][0]["layer_end"] == 6


async def test_a_required_tool_call_is_enforced_over_each_api(cluster: Cluster, instances: dict[str, str]) -> None:
    """After a tool's result this model answers in text; asked to call a tool, it calls one (enforced by decoding)."""
    cities = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
              "additionalProperties": False}  # fmt: skip
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": cities}}
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
               "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]  # fmt: skip
    client = openai(cluster)
    deltas = [c.choices[0].delta async for c in await client.chat.completions.create(model=TOOLS, messages=history,  # type: ignore[arg-type,list-item]
              tools=[tool], tool_choice="required", max_tokens=128, seed=1, stream=True) if c.choices]  # type: ignore[arg-type,list-item]  # fmt: skip
    parts = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert parts[0].id and parts[0].function and parts[0].function.name == "get_weather"
    pieces = [p.function.arguments for p in parts[1:] if p.function and p.function.arguments]
    assert len(pieces) > 3 and json.loads("".join(pieces))["city"]  # the arguments as they were generated
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        forced = await client.chat.completions.create(model=TOOLS, messages=history, tools=[tool],  # type: ignore[arg-type,list-item]
                                                      tool_choice=choice, max_tokens=128, seed=1)  # type: ignore[arg-type]  # fmt: skip
        (call,) = forced.choices[0].message.tool_calls or []
        assert forced.choices[0].finish_reason == "tool_calls" and json.loads(call.function.arguments)["city"]
    anthropic = AsyncAnthropic(base_url=cluster.api, api_key="unused", max_retries=0)
    answered = [*ASK, {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "get_weather",
                "input": {"city": "Paris"}}]}, {"role": "user", "content": [{"type": "tool_result",
                "tool_use_id": "c1", "content": "sunny"}]}]  # fmt: skip
    reply = await anthropic.messages.create(model=TOOLS, max_tokens=128, messages=answered, tool_choice={"type": "any"},  # type: ignore[arg-type]
                                            tools=[{"name": "get_weather", "input_schema": cities}])  # type: ignore[list-item]  # fmt: skip
    assert reply.stop_reason == "tool_use"
