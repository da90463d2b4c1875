"""Every error leaves the API as JSON a person can act on: {"error": {"message", "type", "code"}}. The admin
endpoints' `type` is shardline's ErrorType, which also picks the status (here, and only here); the inference
endpoints under /v1 speak OpenAI's (or Anthropic's) error types, as their clients expect."""

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from temporalio.client import WorkflowFailureError
from temporalio.service import RPCError

from shardline.errors import ErrorType, ShardlineError, cause_message, error_type

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
STATUS = {
    # 422, as FastAPI answers a request it validates; the inference endpoints answer 400, as OpenAI does
    ErrorType.BAD_INPUT: 422,
    ErrorType.NOT_FOUND: 404,
    ErrorType.GATED: 403,  # the hub refuses: the node needs a token with access
    ErrorType.DISK_FULL: 507,
    ErrorType.CONFLICT: 409,
    ErrorType.IN_USE: 409,
    # 409, not 503: the cluster as it is cannot take it, and the same request fails again until a person adds a
    # node or frees memory; a 503 would invite clients to retry it blindly
    ErrorType.PLACEMENT: 409,
    ErrorType.DEPARTED: 409,  # the node will not come back by itself: restart it first
    ErrorType.CANCELED: 409,  # someone canceled the work
    ErrorType.NODE_UNAVAILABLE: 503,  # it may be back: try again later
    ErrorType.RUNNER_FAILED: 502,
    ErrorType.HUB_UNREACHABLE: 502,
    ErrorType.GAVE_UP: 503,
    ErrorType.TRANSIENT: 503,
    ErrorType.UNAVAILABLE: 503,
    ErrorType.INTERNAL: 500,
}


def status_for(kind: ErrorType) -> int:
    return STATUS[kind]


def error_response(
    status: int, message: str, kind: str = "invalid_request_error", headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": kind, "code": status}},
        headers=headers,
    )


def openai_error_type(status: int) -> str:
    kinds = {404: "not_found_error", 429: "rate_limit_error"}
    return kinds.get(status, "invalid_request_error" if status < 500 else "server_error")


def anthropic_error_type(status: int) -> str:
    kinds = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error"}
    return kinds.get(status, "invalid_request_error" if status < 500 else "api_error")


def anthropic_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Anthropic's error shape, for /v1/messages."""
    content = {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}
    return JSONResponse(status_code=status, content=content, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        # pydantic's labels of union members (`list[...]`, `tagged-union[...]`) are no place in the request
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body" and "[" not in str(p))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "this field is not supported (refused rather than ignored)"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def is_anthropic(request: Request) -> bool:
    return request.url.path.startswith("/v1/messages")


def is_inference(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def is_ollama(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def ollama_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Ollama's error shape, for /api/*: `{"error": message}`."""
    return JSONResponse(status_code=status, content={"error": message}, headers=headers)


def typed_error(request: Request, kind: ErrorType, message: str, status: int | None = None) -> JSONResponse:
    """The one answer to a failure of a known type, in the wire format of the endpoint that failed."""
    status = status or status_for(kind)
    if is_ollama(request):
        return ollama_error(status, message)
    if is_anthropic(request):
        return anthropic_error(status, message)
    if is_inference(request):
        return error_response(status, message, openai_error_type(status))
    return error_response(status, message, kind.value)


def allowed_methods(request: Request) -> list[str]:
    """The methods of the most specific documented path that matches, as the schema lists them: `/instances/preview`
    (POST), not `/instances/{instance_id}` (GET, DELETE) too; a path the schema leaves out (the dashboard's `/`):
    every method some route takes there (Starlette names only those of the first route it tried)."""
    path = request.url.path
    documented = [(template.count("{"), ops) for template, ops in request.app.openapi()["paths"].items()
                  if re.fullmatch(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)), path)]  # fmt: skip
    if documented:
        return [m.upper() for m in min(documented, key=lambda entry: entry[0])[1]]
    return [m for m in METHODS if any(r.matches({**request.scope, "method": m})[0] == Match.FULL
                                      for r in request.app.routes)]  # fmt: skip


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)  # FastAPI's and Starlette's own (405, a body that is not JSON)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:  # every method the path has, not only those of the first route that matched
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed_methods(request))}
        if is_anthropic(request):
            return anthropic_error(exc.status_code, str(exc.detail), exc.headers)
        if is_ollama(request):
            return ollama_error(exc.status_code, str(exc.detail), exc.headers)
        return error_response(exc.status_code, str(exc.detail), openai_error_type(exc.status_code), exc.headers)

    @app.exception_handler(ShardlineError)
    async def _typed(request: Request, exc: ShardlineError) -> JSONResponse:
        return typed_error(request, exc.type, exc.message)

    @app.exception_handler(WorkflowFailureError)
    async def _failed(request: Request, exc: WorkflowFailureError) -> JSONResponse:
        # a workflow the request waited for failed: its type was set where it failed and kept by the workflow
        return typed_error(request, error_type(exc) or ErrorType.INTERNAL, cause_message(exc))

    @app.exception_handler(RPCError)
    async def _temporal(request: Request, exc: RPCError) -> JSONResponse:
        message = f"the cluster's Temporal server did not answer ({exc}): try again shortly"
        return typed_error(request, ErrorType.UNAVAILABLE, message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # the inference endpoints answer a request they cannot honour as OpenAI and Anthropic do: 400
        if is_anthropic(request):
            return anthropic_error(400, _validation_message(exc))
        status = 400 if is_inference(request) or is_ollama(request) else None
        return typed_error(request, ErrorType.BAD_INPUT, _validation_message(exc), status)
