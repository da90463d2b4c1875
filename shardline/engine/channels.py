"""Where each piece of a model's output goes: the answer, its reasoning, or a tool call.

The tokenizer knows the markers (mlx_lm infers them from the chat template and vocabulary:
`<think>`..`</think>`, the tool parser's start and end); text between tool markers is parsed
by mlx_lm's tool parser of the model's family into {"name", "arguments"}.
"""

import json
import re
from collections.abc import Callable
from typing import Any

import structlog
from mlx_lm.tokenizer_utils import TokenizerWrapper

from shardline.engine.stops import held_back

log = structlog.get_logger(__name__)

NORMAL, REASONING, TOOL = "text", "reasoning", "tool"
PARSERS = "mlx_lm.tool_parsers."
CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')  # json_tools'
MISTRAL_HEAD = re.compile(r"\s*([\w-]+)\s*\[ARGS\]\s*")
KIMI_HEAD = re.compile(r"\s*<\|tool_call_begin\|>\s*(?:functions\.)?([^\s:<]+):\d+\s*<\|tool_call_argument_begin\|>\s*")
PYTHON_HEAD = re.compile(r"\s*[\[,]?\s*([\w.]+)\(")


def after_marker(end: str, own: bool) -> Callable[[str], tuple[str, str] | None]:
    """Calls that end at `end` (own: that text is the call's; else the next call's marker)."""

    def split(text: str) -> tuple[str, str] | None:
        at = text.find(end, 0 if own else 1)
        if at < 0:
            return None
        return text[: at + len(end) if own else at], text[at + len(end) :]

    return split


class ArgumentStream:
    """A call whose arguments are a JSON object, as it is written: its name once the head before the arguments is
    whole (json_tools' `{"name": ..., "arguments": `, Mistral's `name[ARGS]`, Kimi's `functions.name:0` and its
    marker), then each piece of the arguments up to where they close (strings and escapes followed, so a `}`
    inside one is text)."""

    def __init__(self, head: re.Pattern[str] = CALL_HEAD, quoted: bool = True) -> None:
        self.head, self.quoted = head, quoted  # quoted: the name is a JSON string's inside
        self.named = False
        self.sent = 0  # characters of the arguments already passed on
        self.depth, self.in_string, self.escaped, self.done = 0, False, False, False

    def feed(self, call_text: str) -> tuple[str | None, str]:
        """(the name, the first time it is known; the arguments' new text) for the call's text so far."""
        head = self.head.match(call_text)
        if head is None:
            return None, ""
        name = None
        if not self.named:
            self.named, name = True, json.loads(f'"{head.group(1)}"') if self.quoted else head.group(1)
        rest = call_text[head.end() :]
        start, end = self.sent, self.sent
        while end < len(rest) and not self.done:
            self.step(rest[end])
            end += 1
        self.sent = end
        return name, rest[start:end]

    def step(self, char: str) -> None:
        if self.in_string:
            self.escaped, self.in_string = (False, True) if self.escaped else (char == "\\", char != '"')
        elif char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
            self.done = self.depth == 0

    def finish(self, call_text: str, arguments: str) -> tuple[str, str]:
        """(what is left to send, the arguments as the call has them): the model's own text of them, when whole."""
        return "", written(call_text, self) or arguments


class TaggedArguments:
    """A call whose parameters are written one per pair of tags (Qwen3-Coder's, GLM's, LongCat's formats): its
    name once its header is written, then its arguments as JSON, a parameter at a time as each one's closing tag
    comes (the family's own parser reads each value, with the tool's types), and the closing brace at the end."""

    def __init__(self, parser: Any, tools: list[dict[str, Any]] | None, header: str, closed: str, tail: str) -> None:
        self.parser, self.tools = parser, tools
        self.header = re.compile(header)
        self.closed, self.tail = closed, tail  # a parameter's closing tag; what makes a call of the text so far
        self.named = False
        self.sent = ""
        self.parsed: str | None = None  # the call so far as last parsed

    def feed(self, call_text: str) -> tuple[str | None, str]:
        name = None
        if not self.named:
            head = self.header.match(call_text)
            if head is None:
                return None, ""
            self.named, name = True, head.group(1)
        whole = self.whole(call_text)
        if whole is None or whole == self.parsed:  # no new whole parameter: nothing to parse again
            return name, ""
        self.parsed = whole
        try:
            arguments = self.parser(whole, self.tools)["arguments"]
        except (ValueError, KeyError, TypeError, AttributeError, SyntaxError):
            return name, ""
        text = json.dumps(arguments, ensure_ascii=False)[:-1]  # all but the closing brace
        if not text.startswith(self.sent) or len(text) == len(self.sent):
            return name, ""
        piece, self.sent = text[len(self.sent) :], text
        return name, piece

    def whole(self, call_text: str) -> str | None:
        """The call so far cut after its last whole parameter and closed, as its parser reads a whole call."""
        cut = call_text.rfind(self.closed)
        return None if cut < 0 else call_text[: cut + len(self.closed)] + self.tail

    def finish(self, call_text: str, arguments: str) -> tuple[str, str]:
        if not arguments.startswith(self.sent):  # the parser read the whole call otherwise than its parts
            log.warning("channels.stream_mismatch", sent=self.sent, arguments=arguments)
        return arguments[len(self.sent) :] if arguments.startswith(self.sent) else "", arguments


class ListedArguments(TaggedArguments):
    """A call whose parameters are listed between brackets, separated by commas (Gemma 4's and FunctionGemma's
    `call:name{key:value,...}`, Python's `name(key=value, ...)`): a parameter is whole once a comma follows it at
    the top level, outside strings (`quotes`: the marker that opens and closes one, or Python's quotes)."""

    def __init__(self, parser: Any, tools: list[dict[str, Any]] | None, header: str, quotes: str, tail: str) -> None:
        super().__init__(parser, tools, header, ",", tail)
        self.separators = Separators(quotes)

    def whole(self, call_text: str) -> str | None:
        head = self.header.match(call_text)
        if head is None:
            return None
        cut = self.separators.scan(call_text, head.end())
        return None if cut is None else call_text[head.start(1) - self.lead(call_text, head) : cut] + self.tail

    def lead(self, call_text: str, head: re.Match[str]) -> int:
        """How much before the name the parser needs (`call:`)."""
        return len("call:") if call_text[: head.start(1)].endswith("call:") else 0


class PythonArguments(ListedArguments):
    """A pythonic call (`[name(key="value", n=2), ...]`), its parameters a keyword argument at a time."""

    def __init__(self, parser: Any, tools: list[dict[str, Any]] | None) -> None:
        super().__init__(parser, tools, PYTHON_HEAD.pattern, "python", ")]")

    def whole(self, call_text: str) -> str | None:
        head = self.header.match(call_text)
        cut = None if head is None else self.separators.scan(call_text, head.end())
        return None if head is None or cut is None else "[" + call_text[head.start(1) : cut] + self.tail


class Separators:
    """The last comma at the top level of a growing text (strings and nested brackets skipped), each character
    looked at once however often the text grows. `quotes`: the marker that opens and closes a string, or "python"
    for Python's quoted strings."""

    def __init__(self, quotes: str) -> None:
        self.quotes = quotes
        self.at: int | None = None
        self.depth, self.quote, self.last, self.closed = 0, "", None, False

    def scan(self, text: str, start: int) -> int | None:
        at = start if self.at is None else self.at
        python, marker = self.quotes == "python", self.quotes
        while at < len(text) and not self.closed:
            char = text[at]
            if not python and marker.startswith(text[at : at + len(marker)]) and len(text) - at < len(marker):
                break  # a marker may be arriving in pieces
            if self.quote:  # inside a string: find its end
                if python and char == "\\":
                    at += 2
                    continue
                if python and char == self.quote:
                    self.quote = ""
                elif not python and text.startswith(marker, at):
                    self.quote, at = "", at + len(marker) - 1
            elif not python and text.startswith(marker, at):
                self.quote, at = marker, at + len(marker) - 1
            elif python and char in "\"'":
                self.quote = char
            elif char in "([{":
                self.depth += 1
            elif char in ")]}":
                self.depth -= 1
                self.closed = self.depth < 0
            elif char == "," and self.depth == 0:
                self.last = at
            at += 1
        self.at = at
        return self.last


def python_call_end(text: str) -> tuple[str, str] | None:
    """The first whole call of a pythonic list (`[a(x=1), b(y=2)]`): (that call as its parser reads one, what follows
    it), or None while it is being written."""
    head = PYTHON_HEAD.match(text)
    if head is None:
        return None
    inside = Separators("python")
    inside.scan(text, head.end())
    if not inside.closed:  # its closing parenthesis is still to come
        return None
    end = inside.at or 0  # just past the closing parenthesis
    return f"[{text[head.start(1) : end]}]", text[end:]


def family_of(parser: Any) -> str:
    """The mlx-lm tool-parser family a parser belongs to (its module's name), "" for none."""
    return getattr(parser, "__module__", "").removeprefix(PARSERS)


def argument_stream(parser: Any, tools: list[dict[str, Any]] | None) -> ArgumentStream | TaggedArguments | None:
    """How this family's calls are passed on as they are written."""
    family = family_of(parser)
    if family == "json_tools":
        return ArgumentStream()
    if family == "mistral":
        return ArgumentStream(MISTRAL_HEAD, quoted=False)
    if family == "kimi_k2":
        return ArgumentStream(KIMI_HEAD, quoted=False)
    if family == "minicpm5":
        return TaggedArguments(parser, tools, r'\s*(?:name\s*=\s*)?"?([^"\s<>]+)"?\s*>', "</param>", "")
    if family == "gemma4":
        return ListedArguments(parser, tools, r"\s*call:([\w-]+)\{", '<|"|>', "}")
    if family == "function_gemma":
        return ListedArguments(parser, tools, r"\s*call:(\w+)\{", "<escape>", "}")
    if family == "pythonic":
        return PythonArguments(parser, tools)
    if family == "minimax_m2":
        return TaggedArguments(parser, tools, r'\s*<invoke name="?([^">]+)"?>', "</parameter>", "</invoke>")
    if family == "qwen3_coder":
        return TaggedArguments(parser, tools, r"\s*<function=([^\s<>]+)>", "</parameter>", "\n</function>")
    if family in ("glm47", "longcat"):
        tag = "<longcat_arg_key>" if family == "longcat" else "<arg_key>"
        return TaggedArguments(
            parser, tools, rf"\s*([^\s<{{]+)\s*{tag}", tag.replace("key", "value").replace("<", "</"), ""
        )
    return None


# families that write several calls inside one pair of markers: the first whole call of the text and what follows
SPLITS = {
    "kimi_k2": after_marker("<|tool_call_end|>", True), "minimax_m2": after_marker("</invoke>", True),
    "mistral": after_marker("[TOOL_CALLS]", False), "pythonic": python_call_end,
}  # fmt: skip


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
            if tokenizer.tool_call_end:  # Mistral's family has none: its calls run to the end of the output
                self.markers[TOOL] = (tokenizer.tool_call_end, NORMAL)
        self.opens = opens
        self.state = REASONING if thinking and tokenizer.has_thinking else NORMAL
        self.pending = ""
        self.tool_text = ""
        self.calls = 0
        self.arguments = argument_stream(self.parser, tools)
        self.split = SPLITS.get(family_of(self.parser))

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
        return [self.markers[self.state][0]] if self.state in self.markers else []

    def _next_marker(self) -> tuple[int, str, str] | None:
        if self.state == NORMAL:
            hits = [(at, m, s) for m, s in self.opens if (at := self.pending.find(m)) >= 0]
            return min(hits, default=None)
        if self.state not in self.markers:
            return None
        marker, state = self.markers[self.state]
        at = self.pending.find(marker)
        return (at, marker, state) if at >= 0 else None

    def _emit(self, out: dict[str, Any], text: str) -> None:
        if not text:
            return
        if self.state == TOOL:
            self.tool_text += text
            self._split_calls(out)
            self._stream_arguments(out)
        else:
            out[self.state] = out.get(self.state, "") + text

    def _stream_arguments(self, out: dict[str, Any]) -> None:
        """`tool_call_deltas`: the call's name, then its arguments as they come (where the family's format allows)."""
        if self.arguments is None:
            return
        name, piece = self.arguments.feed(self.tool_text)
        if name is not None:
            out.setdefault("tool_call_deltas", []).append({"index": self.calls, "name": name})
        if piece:
            out.setdefault("tool_call_deltas", []).append({"index": self.calls, "arguments": piece})

    def _split_calls(self, out: dict[str, Any]) -> None:
        """Each call that ends inside the markers is parsed (and its stream closed) as it ends, before the next."""
        if self.split is None:
            return
        while (found := self.split(self.tool_text)) is not None:
            self.tool_text, rest = found
            self._end_tool(out)
            self.tool_text = rest

    def _end_tool(self, out: dict[str, Any]) -> None:
        text, self.tool_text = self.tool_text, ""
        streamed, self.arguments = self.arguments, argument_stream(self.parser, self.tools)
        if not text.strip() or (self.split is python_call_end and not text.strip(" \t\n,]")):
            return  # the space between calls, or the end of a pythonic list
        try:
            parsed = self.parser(text, self.tools)  # type: ignore[misc]
        except (ValueError, KeyError, TypeError, AttributeError):
            out["text"] = out.get("text", "") + text  # not a call after all: shown, never dropped
            return
        calls = parsed if isinstance(parsed, list) else [parsed]
        for call in calls:
            arguments = call.get("arguments", {})
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            done = {"index": self.calls, "name": call["name"], "arguments": arguments}
            if streamed is not None and streamed.named and len(calls) == 1:
                done["streamed"] = True  # its name and arguments went out as tool_call_deltas
                rest, done["arguments"] = streamed.finish(text, arguments)
                if rest:
                    out.setdefault("tool_call_deltas", []).append({"index": self.calls, "arguments": rest})
            out.setdefault("tool_calls", []).append(done)
            self.calls += 1


def written(call_text: str, streamed: ArgumentStream) -> str:
    """The arguments as the model wrote them (what the deltas added up to), when they are a whole JSON value."""
    head = streamed.head.match(call_text)
    text = call_text[head.end() :][: streamed.sent] if head else ""
    try:
        json.loads(text)
    except ValueError:
        return ""
    return text
