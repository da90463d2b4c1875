"""API behaviour that needs no cluster: auth, validation messages, settings documented."""

import re
from pathlib import Path

from pydantic import SecretStr

from shardline.settings import Settings
from tests.support.offline_app import offline_app


def test_api_key_required_everywhere_but_healthz() -> None:
    http = offline_app(None, api_key=SecretStr("s3cret"))
    assert http.get("/healthz").status_code == 200
    denied = http.get("/nodes")
    assert denied.status_code == 401 and "API key" in denied.json()["error"]["message"]
    assert http.get("/nodes", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert http.post("/downloads", json={"model": "o/m"}).status_code == 401


def test_invalid_model_id_is_a_readable_422() -> None:
    http = offline_app(None)
    response = http.post("/downloads", json={"model": "a/b/c"})
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("model: invalid model id 'a/b/c'")


def test_every_setting_is_in_the_readme() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    documented = set(re.findall(r"`(SHARDLINE_[A-Z_]+)`", readme))
    assert {f"SHARDLINE_{name.upper()}" for name in Settings.model_fields} <= documented


def test_x_api_key_is_as_good_as_bearer() -> None:
    http = offline_app(None, api_key=SecretStr("s3cret"))
    assert http.get("/v1/models", headers={"x-api-key": "wrong"}).status_code == 401
    denied = http.post("/v1/messages", json={}, headers={"x-api-key": "wrong"})
    assert denied.status_code == 401 and denied.json()["type"] == "error"  # Anthropic's shape on its endpoint
    refused = http.post("/v1/messages", json={"model": "o/m", "max_tokens": 1, "messages": []},
                        headers={"x-api-key": "s3cret"})  # fmt: skip
    assert refused.status_code == 400 and "messages" in refused.json()["error"]["message"]
