"""create_app(settings): the FastAPI application, connected to Temporal for its lifetime."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from api.deps import require_api_key
from api.errors import install_error_handlers
from api.routes import downloads, health, nodes
from shardline.settings import Settings
from shardline.temporal import connect


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.client = await connect(settings, wait_s=60)
        yield

    app = FastAPI(title="shardline", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(health.router)
    for router in (nodes.router, downloads.router):
        app.include_router(router, dependencies=[Depends(require_api_key)])
    return app
