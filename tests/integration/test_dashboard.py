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
from temporalio.client import Client

from shardline.types import LayerRange
from tests.conftest import CHUNKY, QWEN, TINY, Cluster
from tests.support.processes import free_port, wait_http
from tests.support.relay import Relay
from tests.support.serving import MAX_TOKENS, MESSAGES, reference, start_instance, start_nodes, wait_state
from tests.support.waits import start_download, start_download_workflow, wait_download, wait_node, wait_progress
from workflows.download import DownloadInput

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow(43)]  # slow: s in make test
FLAGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip
SCREENSHOT = Path("/tmp/dashboard.png")
OPS_SCREENSHOT = Path("/tmp/dashboard-ops.png")
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


async def twice(page: Page, button: str) -> None:
    """A destructive button: the first click arms it, the second acts."""
    await page.click(button)
    await page.click(button)


async def test_dashboard_operates_the_cluster(
    cluster: Cluster, browser: BrowserContext, client: Client, slow_link: Relay
) -> None:
    node, small = "dash-ops", "dash-small"  # the small one: no room for a model, and its downloads crawl
    async with httpx.AsyncClient(base_url=cluster.api, timeout=60) as api:
        await start_nodes(cluster, api, [node])
        cluster.start_node(small, hub=slow_link.endpoint, SHARDLINE_NODE_MEMORY="65536")
        await wait_node(api, small, "online")
    errors: list[str] = []
    try:
        page = await open_page(browser, f"{cluster.api}/", errors)
        notice, card = page.locator("#notice"), page.locator(f'#nodes [data-node="{node}"]')

        # a download onto the node ticked
        await page.locator(f'#download-nodes input[data-node="{node}"]').check(timeout=SEEN_S)
        await page.fill("#download-model", TINY)
        await page.click("#download-go")
        await expect(notice).to_contain_text(f"started download:{node}:{TINY}", timeout=SEEN_S)
        row = page.locator(f'#downloads [data-download="download:{node}:{TINY}"]')
        await expect(row).to_contain_text("completed", timeout=60_000)
        await expect(card.locator(f'.chip[data-model="{TINY}"]')).to_be_visible(timeout=SEEN_S)

        # serve: the preview first (refused where it does not fit, with why), then confirmed
        await page.fill("#serve-model", QWEN)
        await page.locator(f'#serve-nodes input[data-node="{small}"]').check()
        await page.click("#preview-go")
        await expect(page.locator("#preview .refused")).to_contain_text(f"{QWEN} does not fit", timeout=60_000)
        await page.locator(f'#serve-nodes input[data-node="{small}"]').uncheck()
        await page.locator(f'#serve-nodes input[data-node="{node}"]').check()
        await page.fill("#serve-draft", TINY)  # speculative decoding, drafts by a model already on the node
        await page.click("#preview-go")
        plan = page.locator("#preview .plan")
        await expect(plan).to_contain_text("fits", timeout=60_000)
        await expect(plan).to_contain_text("also holds the draft model")
        await expect(plan.locator(f'tr[data-node="{node}"]')).to_contain_text("[0, 6)")
        await expect(page.locator(f'#downloads [data-download="download:{node}:{QWEN}"]')).to_have_count(0)
        await page.click("#serve-go")
        await expect(notice).to_contain_text("started serve:", timeout=SEEN_S)
        instance = page.locator("#instances .instance", has_text=QWEN)
        await expect(instance).to_contain_text("ready", timeout=120_000)
        await expect(instance).to_contain_text(f"speculative: drafts by {TINY}")

        # deleting what the instance uses is refused, saying who uses it
        chip = card.locator(f'.chip[data-model="{QWEN}"]')
        await expect(chip).to_be_visible(timeout=SEEN_S)
        await twice(page, f'#nodes [data-node="{node}"] .chip[data-model="{QWEN}"] button')
        await expect(notice).to_contain_text("in use by serve:", timeout=SEEN_S)
        await expect(notice).to_have_class("show bad")

        # stop it; then the delete goes through
        await twice(page, "#instances .instance button.stop-instance")
        await expect(notice).to_contain_text(": stopped", timeout=90_000)
        await expect(instance).to_have_count(0, timeout=SEEN_S)
        await twice(page, f'#nodes [data-node="{node}"] .chip[data-model="{QWEN}"] button')
        await expect(notice).to_contain_text(f"delete:{node}:{QWEN}: completed", timeout=SEEN_S)
        await expect(chip).to_have_count(0, timeout=SEEN_S)

        # a node holding some layers of a model lists them (a pipeline rank's download)
        partial = await start_download_workflow(client, DownloadInput(node, QWEN, layers=LayerRange(0, 2)))
        await partial.result()
        await expect(card.locator(f'.chip.partial[data-model="{QWEN}"]')).to_contain_text("[0, 2)", timeout=SEEN_S)

        # cancel a download in flight
        with slow_link.capped(2**20):
            await page.locator(f'#download-nodes input[data-node="{node}"]').uncheck()
            await page.locator(f'#download-nodes input[data-node="{small}"]').check()
            await page.fill("#download-model", CHUNKY)
            await page.click("#download-go")
            crawling = f"download:{small}:{CHUNKY}"
            await expect(notice).to_contain_text(f"started {crawling}", timeout=SEEN_S)
            async with httpx.AsyncClient(base_url=cluster.api, timeout=60) as api:
                await wait_progress(api, crawling)
            await expect(page.locator(f'#downloads [data-download="{crawling}"] .bar')).to_contain_text(
                "%", timeout=SEEN_S
            )  # its progress, as it goes
            await twice(page, f'#downloads [data-download="{crawling}"] button.cancel-download')
            await expect(notice).to_contain_text(f"{crawling}: canceling", timeout=SEEN_S)
            await expect(page.locator(f'#downloads [data-download="{crawling}"]')).to_contain_text(
                "canceled", timeout=30_000
            )

        await page.screenshot(path=str(OPS_SCREENSHOT), full_page=True)
        assert not errors, errors
    finally:
        async with httpx.AsyncClient(base_url=cluster.api, timeout=90) as api:
            for instance in (await api.get("/instances")).json():
                if instance["model"] == QWEN:
                    await api.delete(f"/instances/{instance['instance_id']}")
        cluster.stop(f"node-{node}")
        cluster.stop(f"node-{small}")


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

        await page.fill("#serve-model", TINY)  # an action goes with the key too: answered, placed or not
        await page.click("#preview-go")
        await expect(page.locator("#preview [data-fits]")).to_have_count(1, timeout=60_000)
        await expect(page.locator("#keyform")).to_be_hidden()
    finally:
        cluster.stop("api-keyed")
