"""A forced call (tool_choice required or named) in every family's format: whatever path the model takes through
the grammar, the family's own parser (through the channels that serve it) reads back calls of the offered tools
whose arguments follow their parameters, and, where streamed, the argument deltas add up to them."""

import json
import random
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import llguidance.hf
import pytest
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from shardline.engine.channels import Channels
from shardline.engine.tool_grammars import FORMATS, forced_call
from tests.support.model_factory import train_tokenizer, write_json, write_tokenizer

# each family's markers, added to the vocabulary as its real models have them (single special tokens)
MARKERS = {
    "json_tools": ["<tool_call>", "</tool_call>"],
    "mistral": ["[TOOL_CALLS]", "[ARGS]"],
    "kimi_k2": ["<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                "<|tool_call_argument_begin|>", "<|tool_call_end|>"],
    "qwen3_coder": ["<tool_call>", "</tool_call>"],
    "glm47": ["<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"],
    "longcat": ["<longcat_tool_call>", "</longcat_tool_call>"],
    "minimax_m2": ["<minimax:tool_call>", "</minimax:tool_call>"],
    "pythonic": ["<|tool_call_start|>", "<|tool_call_end|>"],
    "gemma4": ["<|tool_call>", "<tool_call|>", '<|"|>'],
    "minicpm5": [],  # its markers are text
    "function_gemma": ["<start_function_call>", "<end_function_call>", "<escape>"],
}  # fmt: skip
STREAMED = set(MARKERS)  # the families whose arguments are streamed: all
# text that ends a free value in some family: the walk leans towards it, or free text would run for ever
CLOSERS = [
    "\n</parameter>\n",
    "</parameter>\n",
    "</longcat_arg_value>",
    "</think>",
    "</param>",
    "</function>",
    '"',
    "]",
    ")",
    "}",
]
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "note": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "set_alarm", "parameters": {"type": "object", "properties": {
        "time": {"type": "string"}, "loud": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
        "required": ["time", "loud"], "additionalProperties": False}}},
]  # fmt: skip


def family_tokenizer(root: Path, family: str, thinking: bool = False) -> TokenizerWrapper:
    dest = root / f"{family}-{thinking}"
    dest.mkdir()
    tokenizer = train_tokenizer(512)
    tokenizer.add_special_tokens([*MARKERS[family], *(["<think>", "</think>"] if thinking else [])])
    write_tokenizer(dest, tokenizer)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    write_json(dest / "tokenizer_config.json", {**config, "tool_parser_type": family})
    return load_tokenizer(dest)


def walk(tokenizer: TokenizerWrapper, family: str, grammar: str, rng: random.Random, limit: int = 2000) -> list[int]:
    """A random path through the grammar: any allowed token, or (more and more often) a whole marker or closing
    text where it may come next, so that free text and repeated calls end."""
    lltok = llguidance.hf.from_tokenizer(tokenizer._tokenizer, eos_token=sorted(tokenizer.eos_token_ids))
    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    mask = allocate_token_bitmask(1, lltok.vocab_size)
    endings = [[e] for e in tokenizer.eos_token_ids] + [
        tokenizer.encode(text, add_special_tokens=False) for text in CLOSERS + MARKERS[family]
    ]
    out: list[int] = []

    def allowed() -> list[int]:
        fill_next_token_bitmask(matcher, mask, 0)
        assert not matcher.is_error(), matcher.get_error()
        return [i for i in range(lltok.vocab_size) if mask[0][i // 32] >> (i % 32) & 1]

    while not matcher.is_stopped() and len(out) < limit:
        choices = allowed()
        if rng.random() < min(0.95, 0.3 + len(out) / 100):
            whole = [e for e in endings if matcher.validate_tokens(e) == len(e)]
            if whole:
                ending = rng.choice(whole)
                assert matcher.consume_tokens(ending)
                out += ending
                continue
        token = rng.choice(choices)
        assert matcher.consume_token(token)
        out.append(token)
    assert matcher.is_stopped(), f"no end in {limit} tokens: {tokenizer.decode(out)!r}"
    return [t for t in out if t not in tokenizer.eos_token_ids]


def served_calls(
    tokenizer: TokenizerWrapper, tokens: list[int], thinking: bool, tools: list[dict[str, Any]] = TOOLS
) -> tuple[dict, list[dict]]:
    """What the channels make of the output, fed a token at a time as the runner feeds them."""
    channels = Channels(tokenizer, tools, thinking)
    out: dict[str, Any] = {}
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in tokens:
        detokenizer.add_token(token)
        merge(out, channels.feed(detokenizer.last_segment))
    detokenizer.finalize()
    merge(out, channels.feed(detokenizer.last_segment, final=True))
    return out, out.get("tool_calls", [])


def merge(out: dict[str, Any], piece: dict[str, Any]) -> None:
    for key, value in piece.items():
        out[key] = out.get(key, type(value)()) + value


@pytest.mark.parametrize("family", sorted(MARKERS))
def test_every_path_through_a_forced_call_is_a_valid_call(tmp_path: Path, family: str) -> None:
    assert set(MARKERS) == set(FORMATS)
    tokenizer = family_tokenizer(tmp_path, family)
    assert getattr(tokenizer.tool_parser, "__module__", "").endswith(family)
    tools = TOOLS
    if family == "function_gemma":  # its parser reads no list or object: such a parameter is refused
        with pytest.raises(ValueError, match="tool_choice: parameter 'tags'"):
            forced_call(tokenizer, TOOLS, thinking=False)
        tools = [TOOLS[0], without(TOOLS[1], "tags")]
    grammar = forced_call(tokenizer, tools, thinking=False)
    rng = random.Random(family)
    for _ in range(12):
        tokens = walk(tokenizer, family, grammar, rng)
        out, calls = served_calls(tokenizer, tokens, thinking=False, tools=tools)
        text = tokenizer.decode(tokens)
        assert calls and not out.get("text", "").strip(), text
        for call in calls:
            (tool,) = [t for t in tools if t["function"]["name"] == call["name"]]
            jsonschema.validate(json.loads(call["arguments"]), tool["function"]["parameters"])
        streamed = {}
        for delta in out.get("tool_call_deltas", []):
            streamed.setdefault(delta["index"], []).append(delta.get("arguments", ""))
        # a streamed call's deltas add up to its arguments (a client joins them), sent as they were written
        assert set(streamed) == ({c["index"] for c in calls} if family in STREAMED else set()), text
        for index, pieces in streamed.items():
            (whole,) = [c["arguments"] for c in calls if c["index"] == index]
            assert "".join(pieces) == whole, text
            assert len(pieces) > 1 or len(json.loads(whole)) < 2, text


def without(tool: dict[str, Any], name: str) -> dict[str, Any]:
    parameters = tool["function"]["parameters"]
    properties = {k: v for k, v in parameters["properties"].items() if k != name}
    return {**tool, "function": {**tool["function"], "parameters": {**parameters, "properties": properties}}}


def test_a_named_function_allows_only_it(tmp_path: Path) -> None:
    tokenizer = family_tokenizer(tmp_path, "qwen3_coder")
    grammar = forced_call(tokenizer, TOOLS[1:], thinking=False)
    rng = random.Random(1)
    for _ in range(6):
        _, calls = served_calls(tokenizer, walk(tokenizer, "qwen3_coder", grammar, rng), thinking=False)
        assert calls and {c["name"] for c in calls} == {"set_alarm"}


def test_a_thinking_model_reasons_first_then_calls(tmp_path: Path) -> None:
    tokenizer = family_tokenizer(tmp_path, "json_tools", thinking=True)
    assert tokenizer.has_thinking
    grammar = forced_call(tokenizer, TOOLS, thinking=True)
    rng = random.Random(2)
    for _ in range(6):
        tokens = walk(tokenizer, "json_tools", grammar, rng)
        out, calls = served_calls(tokenizer, tokens, thinking=True)
        assert calls and not out.get("text", "").strip(), tokenizer.decode(tokens)


def test_a_family_that_cannot_be_forced_is_refused_naming_tool_choice(tmp_path: Path) -> None:
    dest = tmp_path / "plain"
    dest.mkdir()
    write_tokenizer(dest, train_tokenizer(300))
    with pytest.raises(ValueError, match=r"tool_choice: .*no tool-call format"):
        forced_call(load_tokenizer(dest), TOOLS, thinking=False)
