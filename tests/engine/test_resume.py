"""A generation resumed on a runner from the tokens its client already has goes on exactly as it would have:
the API sends the prompt and those tokens (`resume`) after losing the runner that made them."""

import asyncio
from pathlib import Path

import pytest

from tests.support.runners import PROMPT, Served, body, generate

MAX_TOKENS = 28
CUT = 11  # tokens the client had when its runner was lost


async def resumed(endpoint: str, request: dict, cut: int = CUT) -> tuple[list[tuple[str, int]], dict]:
    """What a client sees: the first `cut` tokens of an undisturbed run, then the resumed request's."""
    whole, undisturbed = await generate(endpoint, request)
    rest, final = await generate(endpoint, {**request, "resume": [t for _, t in whole[:cut]]})
    assert final["prompt_tokens"] == undisturbed["prompt_tokens"]  # usage counts the prompt, not what it resumed
    return whole[:cut] + rest, final


@pytest.mark.parametrize("instance", ["single_qwen", "pipe2"])
@pytest.mark.parametrize(
    "sampling", [{"temperature": 0.0}, {"temperature": 1.3, "top_p": 0.9, "seed": 7}], ids=["greedy", "seeded"]
)
async def test_a_resumed_generation_is_the_undisturbed_one(
    instance: str, sampling: dict, request: pytest.FixtureRequest, references, qwen_dir: Path
) -> None:
    served: Served = request.getfixturevalue(instance)
    expected = references(qwen_dir, PROMPT, MAX_TOKENS, **sampling)
    assert len({t for _, t in expected}) > 3
    request = body(PROMPT, MAX_TOKENS, **sampling)
    alone = await resumed(served.endpoint, request)
    batched = await asyncio.gather(*(resumed(served.endpoint, request, cut) for cut in (1, 5, 9, 20)))  # together
    for got, final in [alone, *batched]:
        assert got == expected
        assert final["finish_reason"] == "length" and final["completion_tokens"] == MAX_TOKENS, final


async def test_a_stop_string_held_back_when_the_runner_was_lost_still_stops_it(single_qwen: Served) -> None:
    whole, _ = await generate(single_qwen.endpoint, body(PROMPT, MAX_TOKENS))
    text = "".join(t for t, _ in whole)
    # a stop string that starts at the last character of the text of a token the client has, and ends in a later
    # one's: the first runner held that character back
    ends = [len("".join(t for t, _ in whole[: i + 1])) for i in range(len(whole))]
    starts = [ends[i] - 1 for i in range(CUT // 2, CUT) if text.find(text[ends[i] - 1 : ends[i] + 3]) == ends[i] - 1]
    start = starts[-1]
    cut = next(i + 1 for i in range(len(whole)) if ends[i] > start)
    stop = text[start : start + 4]
    assert len(stop) == 4 and ends[cut - 1] < start + 4, (text, stop)
    request = body(PROMPT, MAX_TOKENS, stop=[stop])
    undisturbed, final = await generate(single_qwen.endpoint, request)
    got, resumed_final = await resumed(single_qwen.endpoint, request, cut)
    assert "".join(t for t, _ in got) == "".join(t for t, _ in undisturbed) == text[:start]
    assert resumed_final["finish_reason"] == final["finish_reason"] == "stop"
    assert resumed_final["completion_tokens"] == final["completion_tokens"]


async def test_a_grammar_goes_on_from_where_it_stood(single_qwen: Served) -> None:
    short = {"type": "string", "minLength": 6, "maxLength": 10}
    schema = {"type": "object", "properties": {"a": short}, "required": ["a"]}
    request = body(PROMPT, 60, response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    whole, final = await generate(single_qwen.endpoint, request)
    assert len(whole) > 8 and final["finish_reason"] == "stop"
    got, resumed_final = await resumed(single_qwen.endpoint, request, cut=6)  # inside the string
    assert got == whole and resumed_final["finish_reason"] == "stop"
    # a runner lost between the end-of-sequence token and the end of the stream: only the end is sent
    rest, ended = await generate(single_qwen.endpoint, {**request, "resume": [t for _, t in whole]})
    assert rest == [] and ended["finish_reason"] == "stop" and ended["completion_tokens"] == len(whole)


async def test_a_resume_with_every_token_only_ends_the_stream(single_qwen: Served) -> None:
    whole, _ = await generate(single_qwen.endpoint, body(PROMPT, 8))
    rest, final = await generate(single_qwen.endpoint, {**body(PROMPT, 8), "resume": [t for _, t in whole]})
    assert rest == [] and final["finish_reason"] == "length" and final["completion_tokens"] == 8
