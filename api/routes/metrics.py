from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import ClientDep, MetricsDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics(metrics: MetricsDep, client: ClientDep) -> Response:
    """Prometheus text: chat requests since the API started, and the cluster's workflows by state right now."""
    await metrics.read_cluster(client)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
