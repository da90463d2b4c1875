"""schemathesis hooks for tests/integration/test_openapi_contract.py (SCHEMATHESIS_HOOKS): generated inference
requests name the model the test serves (a made-up name only ever meets a 404) and ask for a few tokens (a
random-weights model rarely stops by itself).

Schema-valid requests (the positive ones) are also made to follow the rules no JSON schema can state, as
schemathesis advises for them ("extend generators to match runtime rules"): a tool_choice names one of the
request's tools and needs some; top_logprobs needs logprobs; a JSON schema to enforce must be one the grammar
engine takes (a made-up one rarely is); a logit_bias names tokens of the served model's vocabulary; a Responses
input holds something besides earlier reasoning. Everything else stays as generated."""

import os
from typing import Any

import schemathesis
from schemathesis.generation.modes import GenerationMode

MAX_TOKENS = 2
TOKEN_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
SCHEMA = {"type": "object"}
VOCABULARY = 256  # the served test model has at least this many tokens


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    meta = getattr(case, "_meta", None)
    if meta is not None and meta.generation.mode != GenerationMode.POSITIVE:
        return case  # a request made to be refused stays as made
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        body["model"] = os.environ["SHARDLINE_SERVED_MODEL"]
        for name in TOKEN_LIMITS:
            if isinstance(body.get(name), int) and body[name] > MAX_TOKENS:
                body[name] = MAX_TOKENS
        if case.operation.path.startswith("/api/"):  # Ollama's
            options = body.get("options") if isinstance(body.get("options"), dict) else {}
            body["options"] = {**options, "num_predict": MAX_TOKENS}
        elif ("messages" in body or "prompt" in body) and not case.operation.path.endswith("count_tokens"):
            body.setdefault("max_tokens", MAX_TOKENS)  # OpenAI's default would be 512 or 16; Ollama's, unbounded
        runtime_rules(case.operation.path, body)
    return case


def runtime_rules(path: str, body: dict[str, Any]) -> None:
    if path == "/v1/chat/completions":
        openai_tools(body)
        if body.get("top_logprobs"):
            body["logprobs"] = True
    elif path == "/v1/responses":
        responses_tools(body)
        responses_input(body)
    elif path.startswith("/v1/messages"):
        anthropic_tools(body)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and isinstance(fmt.get("json_schema"), dict):
        fmt["json_schema"]["schema"] = SCHEMA
    text = body.get("text")
    if isinstance(text, dict) and isinstance(text.get("format"), dict) and "schema" in text["format"]:
        text["format"]["schema"] = SCHEMA
    config = body.get("output_config")
    if isinstance(config, dict) and isinstance(config.get("format"), dict):
        config["format"]["schema"] = SCHEMA
    if isinstance(body.get("format"), dict):
        body["format"] = SCHEMA
    if isinstance(body.get("logit_bias"), dict):
        body["logit_bias"] = {str(int(k) % VOCABULARY): b for k, b in body["logit_bias"].items()}


def openai_tools(body: dict[str, Any]) -> None:
    choice = body.get("tool_choice")
    if choice in (None, "none"):
        return
    name = choice["function"]["name"] if isinstance(choice, dict) else "f"
    tools = body.get("tools") or []
    if not any(t["function"]["name"] == name for t in tools):
        tools.append({"type": "function", "function": {"name": name}})
    for tool in tools:  # a call the grammar forces: of parameters it takes
        tool["function"]["parameters"] = SCHEMA
    body["tools"] = tools


def responses_input(body: dict[str, Any]) -> None:
    items = body.get("input")
    if isinstance(items, list) and all(i.get("type") in ("reasoning", "web_search_call") for i in items):
        items.append({"role": "user", "content": "hi"})


def responses_tools(body: dict[str, Any]) -> None:
    choice = body.get("tool_choice")
    if choice in (None, "none", "auto", "required") and not body.get("tools"):
        return
    tools = [t for t in body.get("tools") or [] if t.get("type") == "function"]
    name = choice.get("name") if isinstance(choice, dict) else "f"
    if not any(t.get("name") == name for t in tools):
        tools.append({"type": "function", "name": name})
    for tool in tools:
        tool["parameters"] = SCHEMA
    body["tools"] = tools


def anthropic_tools(body: dict[str, Any]) -> None:
    choice = body.get("tool_choice")
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("any", "tool"):
        return
    name = choice.get("name") if kind == "tool" else "f"
    tools = [t for t in body.get("tools") or [] if t.get("type") in (None, "custom")]
    if not any(t.get("name") == name for t in tools):
        tools.append({"name": name, "input_schema": SCHEMA})
    for tool in tools:
        tool["input_schema"] = SCHEMA
    body["tools"] = tools
