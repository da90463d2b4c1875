"""Where each piece of a model's output goes: the answer, its reasoning, or a tool call.

The tokenizer knows the markers (mlx_lm infers them from the chat template and vocabulary:
`<think>`..`</think>`, the tool parser's start and end); text between tool markers is parsed
by mlx_lm's tool parser of the model's family into {"name", "arguments"}.
"""

import json
from typing import Any

from mlx_lm.tokenizer_utils import TokenizerWrapper

from shardline.engine.stops import held_back

NORMAL, REASONING, TOOL = "text", "reasoning", "tool"


class Channels:
    def __init__(self, tokenizer: TokenizerWrapper, tools: list[dict[str, Any]] | None, thinking: bool) -> None:
        self.parser = tokenizer.tool_parser if tools and tokenizer.has_tool_calling else None
        self.tools = tools
        self.markers: dict[str, tuple[str, str]] = {}  # state -> (marker that leaves it, state it leads to)
        opens: list[tuple[str, str]] = []
        if tokenizer.has_thinking:
            opens.append((tokenizer.think_start, REASONING))
            self.markers[REASONING] = (tokenizer.think_end, NORMAL)
        if self.parser is not None:
            opens.append((tokenizer.tool_call_start, TOOL))
            self.markers[TOOL] = (tokenizer.tool_call_end, NORMAL)
        self.opens = opens
        self.state = REASONING if thinking and tokenizer.has_thinking else NORMAL
        self.pending = ""
        self.tool_text = ""
        self.calls = 0

    def feed(self, text: str, final: bool = False) -> dict[str, Any]:
        """What `text` adds to each channel: {"text", "reasoning", "tool_calls"} (only those that grew)."""
        out: dict[str, Any] = {}
        self.pending += text
        while True:
            found = self._next_marker()
            if found is None:
                break
            at, marker, state = found
            self._emit(out, self.pending[:at])
            self.pending = self.pending[at + len(marker) :]
            if self.state == TOOL:
                self._end_tool(out)
            self.state = state
        candidates = self._watched()
        keep = 0 if final else held_back(self.pending, candidates)
        self._emit(out, self.pending[: len(self.pending) - keep])
        self.pending = self.pending[len(self.pending) - keep :]
        if final and self.state == TOOL and self.tool_text:
            self._end_tool(out)  # cut off mid-call (max_tokens): parsed if it can be
        return out

    def _watched(self) -> list[str]:
        if self.state == NORMAL:
            return [marker for marker, _ in self.opens]
        return [self.markers[self.state][0]]

    def _next_marker(self) -> tuple[int, str, str] | None:
        if self.state == NORMAL:
            hits = [(at, m, s) for m, s in self.opens if (at := self.pending.find(m)) >= 0]
            return min(hits, default=None)
        marker, state = self.markers[self.state]
        at = self.pending.find(marker)
        return (at, marker, state) if at >= 0 else None

    def _emit(self, out: dict[str, Any], text: str) -> None:
        if not text:
            return
        if self.state == TOOL:
            self.tool_text += text
        else:
            out[self.state] = out.get(self.state, "") + text

    def _end_tool(self, out: dict[str, Any]) -> None:
        text, self.tool_text = self.tool_text, ""
        try:
            parsed = self.parser(text, self.tools)  # type: ignore[misc]
        except (ValueError, KeyError, TypeError, AttributeError):
            out["text"] = out.get("text", "") + text  # not a call after all: shown, never dropped
            return
        for call in parsed if isinstance(parsed, list) else [parsed]:
            arguments = call.get("arguments", {})
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            out.setdefault("tool_calls", []).append({"index": self.calls, "name": call["name"], "arguments": arguments})
            self.calls += 1
