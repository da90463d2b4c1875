"""Sampling options, logprobs, structured output and tool calls on real runners, checked against plain mlx_lm."""

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import mlx.core as mx
import pytest
from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from tests.support.model_factory import (
    QWEN3_CODER_TEMPLATE,
    TOOL_ANSWER,
    TOOL_CALL,
    make_family_tool_model,
    make_mistral_tool_model,
    make_tool_model,
)
from tests.support.runners import PROMPT, Served, body, generate, rank_specs, serving

pytestmark = pytest.mark.slow(6)  # seconds in make test: tests/conftest.py starts the longest files first

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip


@pytest.fixture(scope="module")
def tool_dir(workdir: Path) -> Path:
    return make_tool_model(workdir / "tool")


@pytest.fixture(scope="module")
def tool_runner(workdir: Path, tool_dir: Path) -> Iterator[Served]:
    with serving(rank_specs([tool_dir], "single"), workdir, "tool") as served:
        yield served


def mlx_reference(
    model_dir: Path, prompt: str, max_tokens: int, seed: int, **options: float
) -> list[tuple[int, float]]:
    """(token, logprob) from mlx_lm's stream_generate with make_sampler and make_logits_processors."""
    model, tokenizer = load(str(model_dir))
    mx.random.seed(seed)
    sampler = make_sampler(options.get("temperature", 0.0), options.get("top_p", 1.0), min_p=options.get("min_p", 0.0),
                           top_k=int(options.get("top_k", 0)))  # fmt: skip
    processors = make_logits_processors(options.get("logit_bias"), options.get("repetition_penalty"),  # type: ignore[arg-type]
                                        presence_penalty=options.get("presence_penalty"),
                                        frequency_penalty=options.get("frequency_penalty"))  # fmt: skip
    out = stream_generate(
        model, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler, logits_processors=processors
    )
    return [(r.token, r.logprobs[r.token].item()) for r in out]


OPTIONS = [
    {"temperature": 1.0, "top_k": 5},
    {"temperature": 0.8, "min_p": 0.05, "top_p": 0.9},
    {"temperature": 0.0, "repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.4},
    {"temperature": 0.0, "logit_bias": {7: 30.0}},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o))
async def test_sampling_options_match_mlx_lm_on_a_pipeline(pipe2: Served, qwen_dir: Path, options: dict) -> None:
    expected = mlx_reference(qwen_dir, PROMPT, 16, seed=11, **options)
    got, final = await generate(pipe2.endpoint, body(PROMPT, 16, seed=11, logprobs=0, **options))
    assert final["completion_tokens"] == 16
    assert [t for _, t in got] == [t for t, _ in expected]


async def test_logprobs_are_mlx_lm_s(single_qwen: Served, qwen_dir: Path) -> None:
    expected = mlx_reference(qwen_dir, PROMPT, 8, seed=0)
    lines = await raw_events(single_qwen.endpoint, body(PROMPT, 8, temperature=0.0, logprobs=3))
    tokens = [e for e in lines if "token" in e]
    assert [e["token"] for e in tokens] == [t for t, _ in expected]
    for event, (_, logprob) in zip(tokens, expected, strict=True):
        assert event["logprob"] == pytest.approx(logprob, abs=1e-3)
        top = event["top_logprobs"]
        assert len(top) == 3 and top[0]["token"] == event["token"]  # greedy: the likeliest
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)


async def raw_events(endpoint: str, request: dict) -> list[dict]:
    import httpx

    async with httpx.AsyncClient(base_url=endpoint, timeout=60) as http:
        response = await http.post("/generate", json=request)
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines() if line]


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_json_schema_output_validates_on_every_rank(pipe2: Served, seed: int) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    got, final = await generate(pipe2.endpoint, body(PROMPT, 300, temperature=1.0, seed=seed, response_format=fmt))
    text = "".join(t for t, _ in got)
    assert final["finish_reason"] == "stop", text
    jsonschema.validate(json.loads(text), SCHEMA)


async def test_json_object_output_parses(single_llama: Served) -> None:
    fmt = {"type": "json_object"}
    got, final = await generate(single_llama.endpoint, body(PROMPT, 64, temperature=0.0, response_format=fmt))
    text = "".join(t for t, _ in got)
    assert text.startswith("{")
    if final["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)


async def test_a_schema_that_cannot_be_enforced_is_a_400(single_llama: Served) -> None:
    import httpx

    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "$ref": "#/nope"}}}
    async with httpx.AsyncClient(base_url=single_llama.endpoint, timeout=60) as http:
        response = await http.post("/generate", json=body(PROMPT, 8, response_format=fmt))
    assert response.status_code == 400 and "schema" in response.text


async def test_tool_call_is_parsed_where_the_tokenizer_lives(tool_runner: Served) -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    lines = await raw_events(tool_runner.endpoint, body(messages, 8, temperature=0.0, tools=TOOLS))
    calls = [c for e in lines for c in e.get("tool_calls", [])]
    assert calls == [{"index": 0, "name": "get_weather", "arguments": '{"city": "Paris"}', "streamed": True}]
    deltas = [d for e in lines for d in e.get("tool_call_deltas", [])]
    assert deltas == [{"index": 0, "name": "get_weather"}, {"index": 0, "arguments": '{"city": "Paris"}'}]
    assert "".join(e.get("text", "") for e in lines) == ""
    assert lines[-1]["finish_reason"] == "tool_calls"
    assert TOOL_CALL.startswith("<tool_call>")
    answer = [*messages, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]  # fmt: skip
    lines = await raw_events(tool_runner.endpoint, body(answer, 8, temperature=0.0, tools=TOOLS))
    assert "".join(e.get("text", "") for e in lines) == TOOL_ANSWER
    assert lines[-1]["finish_reason"] == "stop"


async def test_a_required_call_is_enforced_in_the_family_s_format(tool_runner: Served) -> None:
    cities = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Rome"]}}, "required": ["city"], "additionalProperties": False}}}]  # fmt: skip
    answered = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]  # fmt: skip
    free = await raw_events(tool_runner.endpoint, body(answered, 32, temperature=0.0, tools=cities))
    assert free[-1]["finish_reason"] == "stop"  # left alone, it answers in text after a result
    for seed in (1, 2):  # forced: a call, in its family's format, whose arguments follow the tool's parameters
        forced = await raw_events(tool_runner.endpoint, body(answered, 128, temperature=1.0, seed=seed, tools=cities,
                                                             tool_required=True))  # fmt: skip
        (call,) = [c for e in forced for c in e.get("tool_calls", [])]
        assert call["name"] == "get_weather" and json.loads(call["arguments"])["city"] in ("Paris", "Rome")
        # written a piece at a time, its arguments went out as they came
        pieces = [d["arguments"] for e in forced for d in e.get("tool_call_deltas", []) if "arguments" in d]
        assert len(pieces) > 3 and "".join(pieces) == call["arguments"]
        assert forced[-1]["finish_reason"] == "tool_calls" and "".join(e.get("text", "") for e in forced) == ""


async def test_a_top_k_past_the_vocabulary_is_no_top_k(single_qwen: Served) -> None:
    """It once failed the step of every request in the batch (mlx_lm refuses it), found by schemathesis."""
    huge, _ = await generate(single_qwen.endpoint, body(PROMPT, 6, temperature=1.0, seed=4, top_k=10**12))
    off, _ = await generate(single_qwen.endpoint, body(PROMPT, 6, temperature=1.0, seed=4, top_k=0))
    assert huge == off


async def test_a_tool_call_resumed_mid_arguments_comes_out_whole(tool_runner: Served) -> None:
    """The API resumes a generation whose runner was lost from the tokens its client has: the call's parser and
    its grammar go on from where they stood, and the client sees each delta once."""
    cities = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Rome"]}}, "required": ["city"], "additionalProperties": False}}}]  # fmt: skip
    asked = [{"role": "user", "content": "Weather in Paris?"}]
    request = body(asked, 128, temperature=1.0, seed=3, tools=cities, tool_required=True)
    whole = [e for e in await raw_events(tool_runner.endpoint, request) if not e.get("accepted")]
    tokens = [e for e in whole if "token" in e]
    deltas = [d for e in tokens for d in e.get("tool_call_deltas", [])]
    assert len(deltas) > 3  # a call written a piece at a time
    for cut in (len(tokens) // 3, len(tokens) // 2):  # inside the call's arguments
        resumed = {**request, "resume": [e["token"] for e in tokens[:cut]]}
        rest = [e for e in await raw_events(tool_runner.endpoint, resumed) if not e.get("accepted")]
        assert tokens[:cut] + rest[:-1] == tokens
        assert {k: rest[-1][k] for k in ("finish_reason", "completion_tokens")} == {
            "finish_reason": "tool_calls", "completion_tokens": len(tokens)}  # fmt: skip


@pytest.fixture(scope="module")
def mistral_runner(workdir: Path) -> Iterator[Served]:
    model_dir = make_mistral_tool_model(workdir / "mistral-tools")
    with serving(rank_specs([model_dir], "single"), workdir, "mistral-tools") as served:
        yield served


async def test_a_required_call_is_enforced_in_mistral_s_format(mistral_runner: Served) -> None:
    """Mistral's family writes `[TOOL_CALLS]name[ARGS]{...}` with no end marker: forced, each call is in that
    format, and the calls come back parsed (they run to the end of the output)."""
    cities = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Rome"]}}, "required": ["city"], "additionalProperties": False}}}]  # fmt: skip
    asked = [{"role": "user", "content": "Weather in Paris?"}]
    for seed in (1, 2, 3):
        forced = await raw_events(mistral_runner.endpoint, body(asked, 64, temperature=1.0, seed=seed, tools=cities,
                                                                tool_required=True))  # fmt: skip
        calls = [c for e in forced for c in e.get("tool_calls", [])]
        assert calls and all(c["name"] == "get_weather" for c in calls), forced
        assert all(json.loads(c["arguments"])["city"] in ("Paris", "Rome") for c in calls), calls
        assert "".join(e.get("text", "") for e in forced) == ""
        assert forced[-1]["finish_reason"] == "tool_calls", forced[-1]


@pytest.fixture(scope="module")
def qwen3_coder_runner(workdir: Path) -> Iterator[Served]:
    model_dir = make_family_tool_model(workdir / "coder-tools", QWEN3_CODER_TEMPLATE, ["<tool_call>", "</tool_call>"])
    with serving(rank_specs([model_dir], "single"), workdir, "coder-tools") as served:
        yield served


async def test_a_required_call_is_enforced_and_streamed_in_qwen3_coder_s_format(qwen3_coder_runner: Served) -> None:
    """Qwen3-Coder's family writes each parameter between XML-like tags: forced, the calls are of the named tool
    with its parameters' types (an integer read back as one), and each parameter goes out as it is closed."""
    alarm = [{"type": "function", "function": {"name": "set_alarm", "parameters": {"type": "object", "properties": {
        "hour": {"type": "integer", "minimum": 0, "maximum": 23}, "loud": {"type": "boolean"},
        "day": {"enum": ["mon", "tue"]}}, "required": ["hour", "loud", "day"], "additionalProperties": False}}},
    ]  # fmt: skip
    asked = [{"role": "user", "content": "Wake me up"}]
    for seed in (1, 2, 3):
        forced = await raw_events(qwen3_coder_runner.endpoint, body(asked, 400, temperature=1.0, seed=seed,
                                                                    tools=alarm, tool_required=True))  # fmt: skip
        calls = [c for e in forced for c in e.get("tool_calls", [])]
        assert calls and all(c["name"] == "set_alarm" for c in calls), forced
        for call in calls:
            arguments = json.loads(call["arguments"])
            assert set(arguments) == {"hour", "loud", "day"} and 0 <= arguments["hour"] <= 23, arguments
            assert isinstance(arguments["hour"], int) and isinstance(arguments["loud"], bool), arguments
        first = [d for e in forced for d in e.get("tool_call_deltas", []) if d["index"] == 0]
        assert first[0] == {"index": 0, "name": "set_alarm"} and len(first) >= 4, first  # name, then 3 parameters
        assert "".join(d.get("arguments", "") for d in first) == calls[0]["arguments"]
        assert "".join(e.get("text", "") for e in forced).strip() == ""  # at most the newlines between calls
        assert forced[-1]["finish_reason"] == "tool_calls", forced[-1]
