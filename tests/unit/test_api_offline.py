"""API behaviour that needs no cluster: auth, validation messages, settings documented."""

import re
from pathlib import Path

from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.app import create_app
from shardline.settings import Settings


def app_without_temporal(**overrides: object) -> TestClient:
    app = create_app(Settings(**overrides))  # type: ignore[arg-type]
    app.router.lifespan_context = _no_lifespan
    app.state.settings = Settings(**overrides)  # type: ignore[arg-type]
    app.state.client = None
    return TestClient(app)


async def _no_lifespan(_app: object):  # type: ignore[no-untyped-def]
    yield


def test_api_key_required_everywhere_but_healthz() -> None:
    http = app_without_temporal(api_key=SecretStr("s3cret"))
    assert http.get("/healthz").status_code == 200
    denied = http.get("/nodes")
    assert denied.status_code == 401 and "API key" in denied.json()["error"]["message"]
    assert http.get("/nodes", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert http.post("/downloads", json={"model": "o/m"}).status_code == 401


def test_invalid_model_id_is_a_readable_422() -> None:
    http = app_without_temporal()
    response = http.post("/downloads", json={"model": "a/b/c"})
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("model: invalid model id 'a/b/c'")


def test_every_setting_is_in_the_readme() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    documented = set(re.findall(r"`(SHARDLINE_[A-Z_]+)`", readme))
    assert {f"SHARDLINE_{name.upper()}" for name in Settings.model_fields} <= documented
