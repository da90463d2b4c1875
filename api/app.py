"""create_app(settings): the FastAPI application, connected to Temporal for its lifetime."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import Depends, FastAPI

from api.deps import require_api_key
from api.errors import install_error_handlers
from api.instances import InstanceCache
from api.metrics import Metrics
from api.routes import (
    anthropic,
    dashboard,
    downloads,
    health,
    instances,
    metrics,
    nodes,
    ollama,
    openai,
    responses,
    workflows,
)
from api.routing import Balancer
from shardline.settings import Settings
from shardline.temporal import connect

RUNNER_POOL_EXPIRY_S = 30.0  # less than a runner keeps an idle connection (shardline.engine.server.KEEP_ALIVE_S)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.client = await connect(settings, wait_s=60)
        app.state.instances = InstanceCache(app.state.client)
        # no pool limit: a model with many streams open must never make another model's requests wait
        # for a connection (each runner bounds its own queue and answers 429 past it)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=RUNNER_POOL_EXPIRY_S)
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None), limits=limits) as http:
            app.state.http = http
            yield

    app = FastAPI(title="shardline", lifespan=lifespan)
    app.state.metrics = Metrics()  # this app's own registry
    app.state.in_flight = Balancer(settings.route_slack)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(dashboard.page)  # the page is public; it asks for the key the data wants
    protected = (nodes.router, downloads.router, instances.router, openai.router, anthropic.router, responses.router,
                 ollama.router, dashboard.router, metrics.router, workflows.router)  # fmt: skip
    for router in protected:
        app.include_router(router, dependencies=[Depends(require_api_key)])
    return app
