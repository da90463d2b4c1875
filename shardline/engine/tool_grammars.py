"""Grammars that make the answer a tool call in the model family's own format (`tool_choice` "required", or a
named function), each call's arguments valid for its tool's parameters.

mlx-lm names the family (its tool parser, inferred from the chat template); each family writes its calls its own
way: JSON (`json_tools`, `mistral`, `kimi_k2`), XML-like parameters (`qwen3_coder`, `minimax_m2`, `glm47`,
`longcat`), Python calls (`pythonic`) or Gemma 4's. A marker the vocabulary holds as one token is forced as that
token (llguidance counts added tokens as special: their text alone would be spelled out in pieces). Values that a
family writes bare (a string parameter between tags) are free text up to the tag that closes them, or one of an
enum's values; every other value is JSON valid for its schema, which each family's parser reads back.
"""

import json
from collections.abc import Callable
from typing import Any

import llguidance
from mlx_lm.tokenizer_utils import TokenizerWrapper

from shardline.engine.channels import family_of

# the separators json.dumps writes, as the json_tools family (Qwen, Hermes) writes its calls
CALL_JSON: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MISTRAL_ARGS = "[ARGS]"  # between a Mistral call's name and its arguments
Mark = Callable[[str], str]


def forced_call(tokenizer: TokenizerWrapper, tools: list[dict[str, Any]], thinking: bool) -> str:
    """The grammar that makes the answer calls of `tools` in the model family's format (after its reasoning, where
    the prompt has opened it). Raises ValueError where the family's format cannot be forced here."""
    family = family_of(tokenizer.tool_parser)
    build = FORMATS.get(family)
    if build is None:
        known = f"its tool-call format ({family})" if family else "it has no tool-call format mlx-lm knows"
        raise ValueError(f"tool_choice: a call cannot be required of this model: {known} cannot be enforced "
                         f"(formats that can: {', '.join(sorted(FORMATS))})")  # fmt: skip
    lark = Lark(marker_for(tokenizer))
    calls = build(lark, tools, tokenizer.tool_call_start, tokenizer.tool_call_end)
    if thinking:  # its reasoning first, free, then the calls
        calls = f"{lark.free(tokenizer.think_end)} /[ \\t\\n]*/ {calls}"
    lark.lines.insert(0, f"start: {calls}")
    return lark.checked()


def marker_for(tokenizer: TokenizerWrapper) -> Mark:
    def mark(text: str) -> str:
        ids = tokenizer.encode(text, add_special_tokens=False)
        return f"<[{ids[0]}]>" if len(ids) == 1 else json.dumps(text)

    return mark


class Lark:
    """The rules of one grammar as they are written, numbered in order."""

    def __init__(self, mark: Mark) -> None:
        self.mark = mark
        self.lines: list[str] = []

    def rule(self, body: str, attributes: str = "") -> str:
        name = f"r{len(self.lines)}"
        self.lines.append(f"{name}{attributes}: {body}")
        return name

    def tags(self, *pieces: str) -> str:
        """Text and markers in a row, every marker the vocabulary has as one token forced as that token."""
        return " ".join(self.mark(p) for p in pieces if p)

    def json(self, schema: dict[str, Any]) -> str:
        return self.rule(f"%json {json.dumps({**schema, 'x-guidance': CALL_JSON})}")

    def free(self, close: str) -> str:
        """Any text, then `close` (ending it at the first `close`, as the parsers read it)."""
        closing = self.mark(close)
        if closing.startswith("<["):  # a special token: no text can be it
            return self.rule(f"/(?s:.*)/ {closing}")
        return self.rule("/(?s:.*)/", f"[suffix={json.dumps(close)}]")

    def bare(self, schema: dict[str, Any], close: str) -> str:
        """A value as XML-like formats write it, then `close`: a string as it is, anything else as JSON."""
        strings = string_choices(schema)
        if strings is not None:
            return f"({' | '.join(json.dumps(s) for s in strings)}) {self.mark(close)}"
        if is_string(schema):
            return self.free(close)
        return f"{self.json(schema)} {self.mark(close)}"

    def checked(self) -> str:
        grammar: str = llguidance.grammar_from("lark", "\n".join(self.lines))
        error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        if error:
            raise ValueError(f"the tools' parameters cannot be enforced: {'; '.join(messages)}")
        return grammar


def is_string(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "string"


def string_choices(schema: dict[str, Any]) -> list[str] | None:
    """The only strings a parameter may be (its enum or const), or None."""
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
        return values
    return None


def parameters(tool: dict[str, Any]) -> tuple[list[tuple[str, dict[str, Any]]], set[str]]:
    """(name, schema) of a tool's parameters, the required ones first (the order a call may write them in), and
    which are required."""
    params = tool["function"].get("parameters") or {}
    properties: dict[str, Any] = params.get("properties") or {}
    required = {name for name in params.get("required") or [] if name in properties}
    ordered = [n for n in properties if n in required] + [n for n in properties if n not in required]
    return [(n, properties[n] if isinstance(properties[n], dict) else {}) for n in ordered], required


def name_of(tool: dict[str, Any]) -> str:
    return str(tool["function"]["name"])


def one_of(lark: Lark, tools: list[dict[str, Any]], call: Callable[[dict[str, Any]], str]) -> str:
    return lark.rule(" | ".join(call(t) for t in tools))


def tagged(lark: Lark, tool: dict[str, Any], param: Callable[[str, dict[str, Any]], str]) -> str:
    """A tool's parameters one after another, each whole in its own tags (no separators): the optional ones may
    be left out."""
    params, required = parameters(tool)
    return " ".join(param(n, s) if n in required else f"({param(n, s)})?" for n, s in params)


def separated(items: list[tuple[str, bool]], sep: str) -> str:
    """`items` (expression, required) in order with `sep` between those written; the required come first."""
    required = [e for e, r in items if r]
    optional = [e for e, r in items if not r]
    if required:
        return " ".join([f" {sep} ".join(required), *(f"({sep} {e})?" for e in optional)])
    if not optional:
        return ""
    firsts = [" ".join([optional[i], *(f"({sep} {e})?" for e in optional[i + 1 :])]) for i in range(len(optional))]
    return f"({' | '.join(firsts)})?"


def json_tools(lark: Lark, tools: list[dict[str, Any]], start: str, end: str) -> str:
    """`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one or more."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": name_of(t)},
                           "arguments": t["function"].get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]  # fmt: skip
    call = lark.rule(f"{lark.tags(start, chr(10))} {lark.json({'anyOf': calls})} {lark.tags(chr(10), end)}")
    return f"{call} ({lark.tags(chr(10))} {call})*"


def mistral(lark: Lark, tools: list[dict[str, Any]], start: str, end: str) -> str:
    """`[TOOL_CALLS]name[ARGS]{...}`, one or more (no end marker)."""
    call = one_of(lark, tools, lambda t: f"{lark.tags(start, name_of(t), MISTRAL_ARGS)} {lark.json(object_of(t))}")
    return f"{call}+"


def kimi_k2(lark: Lark, tools: list[dict[str, Any]], start: str, end: str) -> str:
    """`<|tool_calls_section_begin|><|tool_call_begin|>functions.name:0<|tool_call_argument_begin|>{...}
    <|tool_call_end|>...<|tool_calls_section_end|>`."""
    call = one_of(lark, tools, lambda t: (
        f"{lark.tags('<|tool_call_begin|>', f'functions.{name_of(t)}:')} /[0-9]{{1,2}}/ "
        f"{lark.tags('<|tool_call_argument_begin|>')} {lark.json(object_of(t))} {lark.tags('<|tool_call_end|>')}"
    ))  # fmt: skip
    return f"{lark.tags(start)} {call}+ {lark.tags(end)}"


def qwen3_coder(lark: Lark, tools: list[dict[str, Any]], start: str, end: str) -> str:
    """`<tool_call>\n<function=name>\n<parameter=key>\nvalue\n</parameter>\n</function>\n</tool_call>`."""

    def param(name: str, schema: dict[str, Any]) -> str:
        return f"{lark.tags(f'<parameter={name}>', chr(10))} {lark.bare(schema, chr(10) + '</parameter>' + chr(10))}"

    call = one_of(lark, tools, lambda t: (
        f"{lark.tags(start, chr(10), f'<function={name_of(t)}>', chr(10))} {tagged(lark, t, param)} "
        f"{lark.tags('</function>', chr(10), end)}"
    ))  # fmt: skip
    return f"{call} ({lark.tags(chr(10))} {call})*"


def glm47(lark: Lark, tools: list[dict[str, Any]], start: str, end: str, prefix: str = "") -> str:
    """`<tool_call>name\n<arg_key>key</arg_key>\n<arg_value>value</arg_value>\n</tool_call>` (LongCat's: the tags
    start with `longcat_`)."""

    def param(name: str, schema: dict[str, Any]) -> str:
        return (f"{lark.tags(f'<{prefix}arg_key>', name, f'</{prefix}arg_key>', chr(10), f'<{prefix}arg_value>')} "
                f"{lark.bare(schema, f'</{prefix}arg_value>')} {lark.tags(chr(10))}")  # fmt: skip

    def call(tool: dict[str, Any]) -> str:
        if not parameters(tool)[0]:  # a call with no arguments is written as JSON (the parser's fallback)
            return (
                f"{lark.tags(start)} {lark.json({'const': {'name': name_of(tool), 'arguments': {}}})} {lark.tags(end)}"
            )
        return f"{lark.tags(start, name_of(tool), chr(10))} {tagged(lark, tool, param)} {lark.tags(end)}"

    one = one_of(lark, tools, call)
    return f"{one} ({lark.tags(chr(10))} {one})*"


def longcat(lark: Lark, tools: list[dict[str, Any]], start: str, end: str) -> str:
    return glm47(lark, tools, start, end, prefix="longcat_")


def minimax_m2(lark: Lark, tools: list[dict[str, Any]], start: str, end: str) -> str:
    """`<minimax:tool_call>\n<invoke name="name">\n<parameter name="key">value</parameter>\n</invoke>\n
    </minimax:tool_call>`, one or more invokes."""

    def param(name: str, schema: dict[str, Any]) -> str:
        return f"{lark.tags(f'<parameter name={json.dumps(name)}>')} {lark.bare(schema, '</parameter>' + chr(10))}"

    invoke = one_of(lark, tools, lambda t: (
        f"{lark.tags(f'<invoke name={json.dumps(name_of(t))}>', chr(10))} {tagged(lark, t, param)} "
        f"{lark.tags('</invoke>', chr(10))}"
    ))  # fmt: skip
    return f"{lark.tags(start, chr(10))} {invoke}+ {lark.tags(end)}"


def pythonic(lark: Lark, tools: list[dict[str, Any]], start: str, end: str) -> str:
    """`<|tool_call_start|>[name(key="value", n=2), ...]<|tool_call_end|>`: values are Python literals, written
    as JSON (the parser reads true/false/null too)."""

    def call(tool: dict[str, Any]) -> str:
        params, required = parameters(tool)
        items = [(f"{json.dumps(n + '=')} {lark.json(s)}", n in required) for n, s in params]
        return f"{json.dumps(name_of(tool) + '(')} {separated(items, json.dumps(', '))} {json.dumps(')')}"

    one = one_of(lark, tools, call)
    return f"{lark.tags(start)} {json.dumps('[')} {one} ({json.dumps(', ')} {one})* {json.dumps(']')} {lark.tags(end)}"


def gemma4(lark: Lark, tools: list[dict[str, Any]], start: str, end: str) -> str:
    """`<|tool_call>call:name{key:<|"|>text<|"|>,n:2}<tool_call|>`: keys bare, strings between `<|"|>`, other values
    JSON; one call per block."""
    quote = '<|"|>'

    def value(schema: dict[str, Any]) -> str:
        strings = string_choices(schema)
        if strings is not None:
            return f"{lark.tags(quote)} ({' | '.join(json.dumps(s) for s in strings)}) {lark.tags(quote)}"
        if is_string(schema):
            return f"{lark.tags(quote)} {lark.free(quote)}"
        return lark.json(schema)

    def call(tool: dict[str, Any]) -> str:
        params, required = parameters(tool)
        items = [(f"{json.dumps(n + ':')} {value(s)}", n in required) for n, s in params]
        return (
            f"{lark.tags(start, f'call:{name_of(tool)}{{')} {separated(items, json.dumps(','))} {lark.tags('}', end)}"
        )

    return f"{one_of(lark, tools, call)}+"


def minicpm5(lark: Lark, tools: list[dict[str, Any]], start: str, end: str) -> str:
    """`<function name="name"><param name="key">value</param></function>`, one or more (MiniCPM 5's markers are
    text, so a string written here holds no `<`, and so needs no CDATA)."""

    def param(name: str, schema: dict[str, Any]) -> str:
        value = lark.bare(schema, "</param>")
        if is_string(schema) and string_choices(schema) is None:  # its markers are text: a value holds no tag
            value = f"/[^<]*/ {lark.tags('</param>')}"
        return f"{lark.tags(f'<param name={json.dumps(name)}>')} {value}"

    call = one_of(lark, tools, lambda t: (
        f"{lark.tags(start, json.dumps(name_of(t)) + '>')} {tagged(lark, t, param)} {lark.tags(end)}"
    ))  # fmt: skip
    return f"{call}+"


def function_gemma(lark: Lark, tools: list[dict[str, Any]], start: str, end: str) -> str:
    """`<start_function_call>call:name{key:<escape>text<escape>,n:2}<end_function_call>`: its parser reads up to
    the first `}` and splits at commas, so strings hold neither and other values are plain JSON scalars."""
    escape = "<escape>"

    def value(name: str, schema: dict[str, Any]) -> str:
        strings = string_choices(schema)
        if strings is not None:
            return f"{lark.tags(escape)} ({' | '.join(json.dumps(s) for s in strings)}) {lark.tags(escape)}"
        if is_string(schema):
            return f"{lark.tags(escape)} /[^}}<,]*/ {lark.tags(escape)}"
        if schema.get("type") not in ("integer", "number", "boolean"):
            raise ValueError(f"tool_choice: parameter {name!r} cannot be written in this model's call format")
        return lark.json(schema)

    def call(tool: dict[str, Any]) -> str:
        params, required = parameters(tool)
        items = [(f"{json.dumps(n + ':')} {value(n, s)}", n in required) for n, s in params]
        head = lark.tags(start, f"call:{name_of(tool)}{{")
        return f"{head} {separated(items, json.dumps(','))} {lark.tags('}', end)}"

    return f"{one_of(lark, tools, call)}+"


def object_of(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object"}


FORMATS: dict[str, Callable[[Lark, list[dict[str, Any]], str, str], str]] = {
    "json_tools": json_tools, "mistral": mistral, "kimi_k2": kimi_k2, "qwen3_coder": qwen3_coder, "glm47": glm47,
    "longcat": longcat, "minimax_m2": minimax_m2, "pythonic": pythonic, "gemma4": gemma4, "minicpm5": minicpm5,
    "function_gemma": function_gemma,
}  # fmt: skip
