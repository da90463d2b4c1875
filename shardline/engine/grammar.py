"""Structured output: llguidance grammars applied to the logits of one request, the same on every rank.

llguidance (Rust, no torch) computes the set of allowed next tokens as a bitmask in tens of
microseconds; the mask is applied here with MLX ops (llguidance's own MLX helper is a Metal-only
kernel), so it works wherever MLX does. Every rank consumes the same sampled tokens and so
computes the same masks.
"""

import json
from typing import Any

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask
from mlx_lm.tokenizer_utils import TokenizerWrapper

BITS = mx.arange(32, dtype=mx.int32)
# Compact JSON: a random-weights model cannot wander through whitespace forever.
JSON_OPTIONS: Any = {"whitespace_flexible": False}


def grammar_for(response_format: dict[str, Any]) -> str:
    """The llguidance grammar for an OpenAI `response_format` (`json_object` or `json_schema`); "" = free text.
    Raises ValueError for a format or schema that cannot be enforced."""
    kind = response_format.get("type")
    if kind in (None, "text"):
        return ""
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema", spec if "type" in spec else None)
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema must be a JSON schema object")
    else:
        raise ValueError(f"response_format type {kind!r} is not supported: use text, json_object or json_schema")
    grammar: str = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if error:
        raise ValueError(f"the JSON schema cannot be enforced: {'; '.join(messages)}")
    return grammar


class Grammars:
    """One rank's llguidance view of the tokenizer, built at the first grammar (a second or so for big vocabularies)."""

    def __init__(self, tokenizer: TokenizerWrapper) -> None:
        self.tokenizer = tokenizer
        self._lltok: Any = None

    @property
    def lltok(self) -> Any:
        if self._lltok is None:
            eos = sorted(self.tokenizer.eos_token_ids)
            self._lltok = llguidance.hf.from_tokenizer(self.tokenizer._tokenizer, eos_token=eos)
        return self._lltok

    def processor(self, grammar: str, matched: list[int] | None = None) -> "GrammarProcessor":
        """`matched`: output the grammar has already accepted (a resumed request's), consumed before the first mask."""
        eos = sorted(self.tokenizer.eos_token_ids)
        matcher = llguidance.LLMatcher(self.lltok, grammar, log_level=0)
        if matched:
            matcher.consume_tokens(matched)
        return GrammarProcessor(matcher, self.lltok.vocab_size, eos)

    def check(self, grammar: str) -> None:
        """Raises ValueError when this vocabulary cannot even start an output the grammar allows."""
        matcher = llguidance.LLMatcher(self.lltok, grammar, log_level=0)
        mask = allocate_token_bitmask(1, self.lltok.vocab_size)
        if not matcher.is_error():
            fill_next_token_bitmask(matcher, mask, 0)
        if matcher.is_error() or not mask.any():
            raise ValueError(f"this model cannot produce output in that format: {why(matcher)}")


class GrammarProcessor:
    """An mlx_lm logits processor: (tokens so far, logits) -> logits with every disallowed token at -inf.

    Called once per step; from the second call on, the last of `tokens` is the token sampled the step before."""

    def __init__(self, matcher: Any, vocab_size: int, eos: list[int]) -> None:
        self.matcher = matcher
        self.mask = allocate_token_bitmask(1, vocab_size)
        self.eos = eos
        self.started = False
        self.error: str | None = None  # why the grammar could not be followed: the request fails with it
        self.drafted = 0  # draft tokens consumed by the last speculative step, until `settle`

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.started and not self.matcher.is_stopped():
            self.matcher.consume_token(int(tokens[-1].item()))  # waits for the step before: its token is needed
        self.started = True
        # This step's forward pass needs only that token too: start it now, so that it runs while llguidance
        # computes the mask below, instead of after it (mlx_lm evaluates the step only once it has sampled).
        mx.async_eval(logits)
        return self.masked(logits)

    def masked(self, logits: mx.array) -> mx.array:
        """`logits` with what the matcher's state allows next; only end-of-sequence once it cannot go on."""
        if not self.matcher.is_error():
            fill_next_token_bitmask(self.matcher, self.mask, 0)
        if self.matcher.is_error() or not self.mask.any():
            # never fail the whole batch's step: this request ends here, on every rank alike, and rank 0 fails it
            self.error = self.error or why(self.matcher)
            return only(logits, self.eos)
        return apply_bitmask(logits, self.mask)

    def draft(self, logits: mx.array, fed: list[int]) -> mx.array:
        """A speculative step's logits, one row per input of `fed` (the token sampled last, then the drafts), each
        masked as the grammar allows after the inputs up to it. Drafts are consumed while the grammar takes them
        (past the first it refuses, no row is ever used: that draft is rejected at the row before); `settle` then
        keeps what the step kept."""
        rows = []
        self.drafted = 0
        for j, token in enumerate(fed):
            if j == 0:
                if self.started and not self.matcher.is_stopped():
                    self.matcher.consume_token(token)  # sampled under this grammar's mask
                self.started = True
            elif self.matcher.is_error() or self.matcher.is_stopped() or not self.matcher.try_consume_tokens([token]):
                rows += rows[-1:] * (len(fed) - j)
                break
            else:
                self.drafted += 1
            rows.append(self.masked(logits[j]))
        return mx.stack(rows)

    def settle(self, kept: int) -> None:
        """The speculative step kept the first `kept` of its inputs: forget the drafts consumed past them."""
        extra = self.drafted - (kept - 1)
        if extra > 0:
            self.matcher.rollback(extra)
        self.drafted = 0


def why(matcher: Any) -> str:
    """llguidance's reason, its first line (the rest is the parser's state)."""
    reason = (matcher.get_error() or "").strip().splitlines()
    return f"no token of its vocabulary can continue it ({reason[0]})" if reason else "no token of its vocabulary can"


def only(logits: mx.array, tokens: list[int]) -> mx.array:
    keep = mx.zeros(logits.shape[-1], dtype=mx.bool_)
    keep[mx.array(tokens)] = True
    return mx.where(keep, logits, mx.array(-mx.inf, dtype=logits.dtype))


def apply_bitmask(logits: mx.array, mask: np.ndarray) -> mx.array:
    words = mx.array(mask[0])
    allowed = ((words[:, None] >> BITS) & 1).reshape(-1).astype(mx.bool_)
    vocab = logits.shape[-1]
    if allowed.shape[0] < vocab:
        allowed = mx.concatenate([allowed, mx.zeros(vocab - allowed.shape[0], dtype=mx.bool_)])
    return mx.where(allowed[:vocab], logits, mx.array(-mx.inf, dtype=logits.dtype))
