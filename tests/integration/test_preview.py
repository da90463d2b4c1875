"""`POST /instances/preview` and `shardline serve --dry-run` on a real cluster: where a model would go, before
anything is downloaded, or 409 with why it does not fit."""

import httpx

from tests.conftest import TINY, Cluster
from tests.integration.test_cli import shardline
from tests.support.serving import running_nodes


async def test_preview_before_any_download(cluster: Cluster, api: httpx.AsyncClient, node_id: str) -> None:
    small = f"{node_id}-small"
    async with (
        running_nodes(cluster, api, [node_id]),
        running_nodes(cluster, api, [small], SHARDLINE_NODE_MEMORY="65536"),
    ):
        fits = await api.post("/instances/preview", json={"model": TINY, "nodes": [node_id]})
        assert fits.status_code == 200, fits.text
        preview = fits.json()
        assert [(s["node_id"], s["rank"], s["layers"]) for s in preview["shards"]] == [(node_id, 0, [0, 4])]
        assert preview["strategy"] == "single" and node_id in preview["reason"], preview
        assert preview["shards"][0]["bytes"] == preview["total_bytes"] > 0

        refused = await api.post("/instances/preview", json={"model": TINY, "nodes": [small], "strategy": "pipeline"})
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert error["type"] == "placement" and f"{TINY} does not fit" in error["message"], error
        missing = await api.post("/instances/preview", json={"model": "test-org/absent"})
        assert missing.status_code == 404 and "not found" in missing.json()["error"]["message"], missing.text

        assert (await api.get("/downloads", params={"node": node_id})).json() == []  # nothing fetched

        dry = shardline(cluster, "serve", TINY, "--nodes", node_id, "--dry-run")
        assert dry.returncode == 0 and node_id in dry.stdout and "0-3" in dry.stdout, dry.stdout + dry.stderr
        no_room = shardline(cluster, "serve", TINY, "--nodes", small, "--dry-run")
        assert no_room.returncode == 1 and "409" in no_room.stdout and "does not fit" in no_room.stdout, no_room.stdout
