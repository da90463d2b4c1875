"""Where a model's output goes, for tool-call families whose markers differ from the test models' own."""

from pathlib import Path

from mlx_lm.tokenizer_utils import TokenizerWrapper, load
from mlx_lm.tool_parsers import mistral

from shardline.engine.channels import Channels

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def mistral_family(model_dir: Path) -> TokenizerWrapper:
    """The tokenizer as mlx-lm sets it up for a Mistral model: `[TOOL_CALLS]` opens a call, and nothing closes it."""
    loaded = load(model_dir)
    return TokenizerWrapper(loaded._tokenizer, tool_call_start=mistral.tool_call_start,
                            tool_call_end=mistral.tool_call_end, tool_parser=mistral.parse_tool_call)  # fmt: skip


def test_a_mistral_call_runs_to_the_end_of_the_output(qwen_dir: Path) -> None:
    channels = Channels(mistral_family(qwen_dir), TOOLS, thinking=False)
    pieces = ("Let me look. ", "[TOOL_CALLS]get_weather", '[ARGS]{"city": ', '"Paris"}')
    out = [channels.feed(piece) for piece in pieces]
    out.append(channels.feed("", final=True))
    assert "".join(o.get("text", "") for o in out) == "Let me look. "
    calls = [c for o in out for c in o.get("tool_calls", [])]
    assert calls == [{"index": 0, "name": "get_weather", "arguments": '{"city": "Paris"}', "streamed": True}]
    deltas = [d for o in out for d in o.get("tool_call_deltas", [])]  # the name, then the arguments as they came
    assert deltas[0] == {"index": 0, "name": "get_weather"}
    assert [d["arguments"] for d in deltas[1:]] == ['{"city": ', '"Paris"}']


def test_two_mistral_calls_in_one_output(qwen_dir: Path) -> None:
    channels = Channels(mistral_family(qwen_dir), TOOLS, thinking=False)
    first = channels.feed('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}')
    assert [c["arguments"] for c in first["tool_calls"]] == ['{"city": "Paris"}']  # done as the next one starts
    calls = first["tool_calls"] + channels.feed("", final=True)["tool_calls"]
    assert [(c["index"], c["arguments"]) for c in calls] == [(0, '{"city": "Paris"}'), (1, '{"city": "Rome"}')]
