"""The dashboard: one static page (public) and the little config it needs (behind the API key, like the data)."""

from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter
from fastapi.responses import FileResponse
from pydantic import BaseModel

from api.deps import SettingsDep
from api.schemas import ErrorOut, error_responses

PAGE = Path(__file__).resolve().parents[1] / "static" / "dashboard.html"

page = APIRouter(tags=["dashboard"])
router = APIRouter(tags=["dashboard"], responses=error_responses(ErrorOut, (401, 422)))


class UiConfig(BaseModel):
    namespace: str
    temporal_ui: str  # base URL of the Temporal UI
    workflow_url: str  # append the URL-encoded workflow id to open it in the Temporal UI


@page.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # Claude Code checks the URL with HEAD
async def dashboard() -> FileResponse:
    # no-cache: a new version of the page shows up on the next reload
    return FileResponse(PAGE, media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/ui-config", response_model=UiConfig)
async def ui_config(settings: SettingsDep) -> UiConfig:
    base = settings.temporal_ui
    workflows = f"{base}/namespaces/{quote(settings.namespace, safe='')}/workflows/"
    return UiConfig(namespace=settings.namespace, temporal_ui=base, workflow_url=workflows)
