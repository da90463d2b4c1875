"""schemathesis hooks for tests/integration/test_openapi_contract.py (SCHEMATHESIS_HOOKS): generated inference
requests name the model the test serves (a made-up name only ever meets a 404) and ask for a few tokens (a
random-weights model rarely stops by itself)."""

import os
from typing import Any

import schemathesis
from schemathesis.generation.modes import GenerationMode

MAX_TOKENS = 2
TOKEN_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


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
        if isinstance(body.get("options"), dict):
            body["options"]["num_predict"] = MAX_TOKENS
        elif "messages" in body or "prompt" in body:
            body.setdefault("max_tokens", MAX_TOKENS)  # OpenAI's default would be 512 or 16; Ollama's, unbounded
    return case
