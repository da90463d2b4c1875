"""Dependencies shared by every router, as Annotated aliases."""

import secrets
from typing import Annotated

import httpx
from fastapi import Depends, Header, HTTPException, Request
from temporalio.client import Client

from api.inference import Inference
from api.instances import InstanceCache
from api.metrics import Metrics
from api.routing import Balancer
from shardline.settings import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_client(request: Request) -> Client:
    client: Client = request.app.state.client
    return client


def get_instances(request: Request) -> InstanceCache:
    cache: InstanceCache = request.app.state.instances
    return cache


def get_http(request: Request) -> httpx.AsyncClient:
    http: httpx.AsyncClient = request.app.state.http
    return http


def get_in_flight(request: Request) -> Balancer:
    in_flight: Balancer = request.app.state.in_flight
    return in_flight


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def get_inference(request: Request) -> Inference:
    state = request.app.state
    return Inference(state.instances, state.http, state.metrics, state.in_flight, state.settings)


SettingsDep = Annotated[Settings, Depends(get_settings)]
InstancesDep = Annotated[InstanceCache, Depends(get_instances)]
HttpDep = Annotated[httpx.AsyncClient, Depends(get_http)]
ClientDep = Annotated[Client, Depends(get_client)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
InFlightDep = Annotated[Balancer, Depends(get_in_flight)]
InferenceDep = Annotated[Inference, Depends(get_inference)]


def require_api_key(
    settings: SettingsDep,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> None:
    """With SHARDLINE_API_KEY set, every endpoint but /healthz wants `Authorization: Bearer <key>` or, as
    Anthropic's clients send it, `x-api-key: <key>`."""
    if settings.api_key is None:
        return
    key = settings.api_key.get_secret_value().encode()
    bearer = secrets.compare_digest((authorization or "").encode(), b"Bearer " + key)
    if not (bearer or secrets.compare_digest((x_api_key or "").encode(), key)):
        raise HTTPException(
            401, "missing or wrong API key: send 'Authorization: Bearer <SHARDLINE_API_KEY>' or 'x-api-key: <key>'"
        )
