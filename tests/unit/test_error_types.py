"""The API's one mapping from error types to HTTP statuses and bodies."""

from api.errors import STATUS, status_for
from shardline.errors import ErrorType
from tests.support.offline_app import offline_app


def test_every_type_has_one_status() -> None:
    assert set(STATUS) == set(ErrorType)
    assert status_for(ErrorType.DISK_FULL) == 507 and status_for(ErrorType.IN_USE) == 409


def test_admin_errors_carry_their_type_and_inference_errors_openai_s() -> None:
    http = offline_app(None)
    odd = http.get("/downloads/serve:x")
    assert odd.status_code == 422 and odd.json()["error"]["type"] == ErrorType.BAD_INPUT, odd.text
    invalid = http.post("/instances", json={"model": "a/b/c"})
    assert invalid.status_code == 422 and invalid.json()["error"]["type"] == ErrorType.BAD_INPUT
    chat = http.post("/v1/chat/completions", json={"model": "o/m"})
    assert chat.status_code == 400 and chat.json()["error"]["type"] == "invalid_request_error"
