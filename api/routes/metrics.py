import asyncio

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import ClientDep, HttpDep, InFlightDep, InstancesDep, MetricsDep
from api.runners import runner_stats
from api.schemas import ErrorOut, error_responses
from shardline.states import InstanceState

router = APIRouter(tags=["metrics"], responses=error_responses(ErrorOut, (401, 422)))


@router.get("/metrics", response_class=Response)
async def metrics(
    metrics: MetricsDep, client: ClientDep, instances: InstancesDep, http: HttpDep, in_flight: InFlightDep
) -> Response:
    """Prometheus text: chat requests since the API started, the cluster's workflows by state right now, and
    each ready instance's batch, queue and prefix cache."""
    temporal_up = await metrics.read_cluster(client)
    ready = [i for i in await instances.known(refresh=temporal_up) if i.state == InstanceState.READY and i.endpoint]
    stats = await asyncio.gather(*(runner_stats(http, i) for i in ready))
    metrics.set_runners(list(zip(ready, stats, strict=True)), in_flight)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
