"""The dashboard at GET / in a real headless browser (Debian's chromium driven by playwright)."""

import asyncio
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from playwright.async_api import BrowserContext, Page, async_playwright, expect

from tests.conftest import QWEN, TINY, Cluster
from tests.support.processes import free_port, wait_http
from tests.support.serving import MAX_TOKENS, MESSAGES, reference, start_instance, start_nodes, wait_state
from tests.support.waits import start_download, wait_download

pytestmark = pytest.mark.asyncio(loop_scope="session")
FLAGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip
SCREENSHOT = Path("/tmp/dashboard.png")
SEEN_S = 20_000  # ms the page gets to show what the API already has (it polls every 2 s)


@pytest.fixture(scope="module")
async def browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BrowserContext]:
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed: `apt-get install -y chromium` (.ci/run installs it before `make test`)"
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"),  # a fresh --user-data-dir
            executable_path=chromium,
            headless=True,  # with chromium_sandbox off (the default), playwright adds --no-sandbox
            args=FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        yield context
        await context.close()


async def open_page(browser: BrowserContext, url: str, errors: list[str] | None = None) -> Page:
    page = await browser.new_page()
    if errors is not None:
        page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(url)
    return page


async def served(cluster: Cluster, node: str) -> tuple[str, str, dict[str, Any]]:
    """One node online, TINY downloaded onto it, QWEN served on it: (download id, instance id, instance)."""
    async with httpx.AsyncClient(base_url=cluster.api, timeout=60) as api:
        await start_nodes(cluster, api, [node])
        workflow_id = await start_download(api, TINY, node)
        assert (await wait_download(api, workflow_id))["state"] == "completed"
        instance_id = await start_instance(api, QWEN, nodes=[node])
        instance = await wait_state(api, instance_id, {"ready", "failed"})
        assert instance["state"] == "ready", instance
        return workflow_id, instance_id, instance


async def test_dashboard_shows_the_cluster_and_chats(
    cluster: Cluster, browser: BrowserContext, model_dirs: dict[str, Path]
) -> None:
    node = "dash-a"
    workflow_id, instance_id, instance = await served(cluster, node)
    errors: list[str] = []
    try:
        page = await open_page(browser, f"{cluster.api}/", errors)

        card = page.locator(f'#nodes [data-node="{node}"]')
        await expect(card).to_contain_text(node, timeout=SEEN_S)
        await expect(card).to_contain_text("online")
        await expect(card.locator(".bar")).to_contain_text("free of")

        row = page.locator(f'#downloads [data-download="{workflow_id}"]')
        await expect(row).to_contain_text(workflow_id, timeout=SEEN_S)
        await expect(row).to_contain_text("completed")
        link = await row.locator("a.temporal-link").get_attribute("href")
        assert (
            link
            and link.startswith("http://127.0.0.1:")
            and link.endswith(f"/namespaces/default/workflows/{quote(workflow_id, safe='')}")
        )

        shown = page.locator(f'#instances [data-instance="{instance_id}"]')
        await expect(shown).to_contain_text(QWEN, timeout=SEEN_S)
        await expect(shown).to_contain_text("ready")
        for shard in instance["shards"]:
            start, end = shard["layers"]
            await expect(shown.locator(".placement")).to_contain_text(f"{shard['node_id']} [{start}, {end})")

        await expect(page.locator(f'#model option[value="{QWEN}"]')).to_have_count(1, timeout=SEEN_S)
        await page.select_option("#model", QWEN)
        await page.fill("#temperature", "0")
        await page.fill("#max-tokens", str(MAX_TOKENS))
        await page.fill("#prompt", MESSAGES[0]["content"])
        await page.click("#send")
        answer = page.locator(".msg.assistant[data-done]")
        await expect(answer).to_have_count(1, timeout=60_000)
        text = await answer.locator(".text").text_content()
        assert text and text.strip(), "the assistant answered something"
        assert await answer.get_attribute("data-finish") == "length"
        assert text == reference(model_dirs[QWEN])  # greedy: what plain mlx_lm says to the same message

        await page.screenshot(path=str(SCREENSHOT), full_page=True)
        assert not errors, errors
    finally:
        async with httpx.AsyncClient(base_url=cluster.api, timeout=90) as api:
            await api.delete(f"/instances/{instance_id}")
        cluster.stop(f"node-{node}")


async def test_dashboard_asks_once_for_the_api_key(cluster: Cluster, browser: BrowserContext) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cluster.spawn("api-keyed", [sys.executable, "-m", "shardline", "api"], SHARDLINE_API_PORT=str(port),
                  SHARDLINE_API_KEY="dash-s3cret")  # fmt: skip
    try:
        await asyncio.to_thread(wait_http, f"{url}/healthz")
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/")).status_code == 200, "the page itself is public"
            assert (await http.get("/ui-config")).status_code == 401, "the data is not"
        page = await open_page(browser, f"{url}/")
        await expect(page.locator("#keyform")).to_be_visible(timeout=SEEN_S)
        await page.fill("#api-key", "dash-s3cret")
        await page.click("#keyform button[type=submit]")
        await expect(page.locator("#keyform")).to_be_hidden()
        await expect(page.locator("#status")).to_contain_text("updated", timeout=SEEN_S)
        await expect(page.locator("#temporal-ui")).to_be_visible()

        await page.reload()  # the key is kept: no second question
        await expect(page.locator("#status")).to_contain_text("updated", timeout=SEEN_S)
        await expect(page.locator("#keyform")).to_be_hidden()
    finally:
        cluster.stop("api-keyed")
