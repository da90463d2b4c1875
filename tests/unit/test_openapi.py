"""The OpenAPI document tells the truth: every route declares the statuses its handlers can answer, each with the
error shape of its wire format (OpenAI's, Anthropic's, Ollama's, or the admin endpoints')."""

from typing import Any

from api.schemas import ADMIN_STATUSES, INFERENCE_STATUSES, OLLAMA_STATUSES
from tests.support.offline_app import offline_app

PUBLIC = {"/healthz", "/"}


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    document = offline_app(None).get("/openapi.json").json()
    return [(path, method, op) for path, ops in document["paths"].items() for method, op in ops.items()]


def expected(path: str) -> tuple[set[int], str]:
    if path.startswith("/v1/messages"):
        return set(INFERENCE_STATUSES), "AnthropicErrorOut"
    if path.startswith("/v1/"):
        return set(INFERENCE_STATUSES), "ErrorOut"
    if path.startswith("/api/"):
        return set(OLLAMA_STATUSES), "OllamaErrorOut"
    if path in ("/metrics", "/ui-config"):
        return {401, 422}, "ErrorOut"
    return set(ADMIN_STATUSES), "ErrorOut"


def test_every_route_declares_the_statuses_it_can_answer() -> None:
    checked = 0
    for path, method, op in operations():
        if path in PUBLIC:
            continue
        statuses, model = expected(path)
        declared = {int(s) for s in op["responses"]}
        assert statuses <= declared, f"{method.upper()} {path} leaves out {sorted(statuses - declared)}"
        for status in statuses:
            ref = op["responses"][str(status)]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith(f"/{model}"), f"{method.upper()} {path} {status}: {ref}"
        checked += 1
    assert checked >= 25


def test_validation_errors_are_declared_as_answered() -> None:
    """FastAPI's own 422 (`{"detail": [...]}`) is never what this API answers: admin routes answer 422 in the
    admin shape (declared over FastAPI's); inference routes answer 400, and FastAPI's 422 stays declared there
    unused."""
    for path, method, op in operations():
        schema = op["responses"].get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
        if path.startswith(("/v1/", "/api/")) or path in PUBLIC:
            continue
        assert not schema or schema["$ref"].endswith("/ErrorOut"), f"{method.upper()} {path}"


def test_starlette_s_own_errors_come_in_each_wire_format() -> None:
    """A body that is not JSON, a method a path does not take: the endpoint's error shape, as documented, and an
    `Allow` naming every method of the path as the schema lists it (Starlette names only those of the first route
    it tried)."""
    http = offline_app(None)
    garbage = {"content": b"\x00not json", "headers": {"content-type": "application/json"}}
    assert isinstance(http.post("/api/show", **garbage).json()["error"], str)  # type: ignore[arg-type]
    assert http.post("/v1/messages", **garbage).json()["type"] == "error"  # type: ignore[arg-type]
    assert http.post("/v1/chat/completions", **garbage).json()["error"]["code"] == 400  # type: ignore[arg-type]
    wrong = http.request("PUT", "/instances/abc")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, DELETE" and wrong.json()["error"]
    literal = http.request("PUT", "/instances/preview")  # a literal path, not the template it also matches
    assert literal.status_code == 405 and literal.headers["allow"] == "POST"
    assert http.post("/instances/preview", **garbage).status_code == 400  # type: ignore[arg-type]  (documented)
