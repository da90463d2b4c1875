"""Every error leaves the API as JSON a person can act on: {"error": {"message", "type", "code"}}."""

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from temporalio.service import RPCError


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
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "this field is not supported (refused rather than ignored)"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def is_anthropic(request: Request) -> bool:
    return request.url.path.startswith("/v1/messages")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if is_anthropic(request):
            return anthropic_error(exc.status_code, str(exc.detail), exc.headers)
        return error_response(exc.status_code, str(exc.detail), openai_error_type(exc.status_code), exc.headers)

    @app.exception_handler(RPCError)
    async def _temporal(_: Request, exc: RPCError) -> JSONResponse:
        return error_response(
            503, f"the cluster's Temporal server did not answer ({exc}): try again shortly", "unavailable"
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # the inference endpoints answer a request they cannot honour as OpenAI and Anthropic do: 400
        if is_anthropic(request):
            return anthropic_error(400, _validation_message(exc))
        status = 400 if request.url.path.startswith("/v1/") else 422
        return error_response(status, _validation_message(exc))
