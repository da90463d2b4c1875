"""The API app with no Temporal behind it: for what the API decides on its own (auth, validation)."""

from typing import Any

import httpx
from fastapi.testclient import TestClient

from api.app import create_app
from api.instances import InstanceCache
from shardline.settings import Settings


def offline_app(client: Any, **overrides: object) -> TestClient:
    app = create_app(Settings(**overrides))  # type: ignore[arg-type]
    app.router.lifespan_context = _no_lifespan
    app.state.settings = Settings(**overrides)  # type: ignore[arg-type]
    app.state.client = client
    app.state.instances = InstanceCache(client)
    app.state.http = httpx.AsyncClient()
    return TestClient(app)


async def _no_lifespan(_app: object):  # type: ignore[no-untyped-def]
    yield
