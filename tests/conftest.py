"""One real cluster per test session: Temporal dev server, control worker and API as processes,
a hub mirror (olah) on loopback serving models made on the spot, and node workers per test."""

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client

from shardline.settings import Settings
from shardline.temporal import connect
from tests.support.hub_mirror import HubMirror, publish_model
from tests.support.model_factory import make_tiny_model, make_tool_model
from tests.support.processes import TIMEOUTS, Cluster
from tests.support.relay import Relay

__all__ = ["TIMEOUTS", "Cluster"]
TINY = "test-org/tiny"  # 4 layers in 3 files: quick
QWEN = "test-org/qwen-tiny"  # qwen2: pipeline and tensor parallel in mlx-lm
TOOLS = "test-org/tool-chain"  # calls a tool, deterministically (model_factory.make_tool_model)
CHUNKY = "test-org/chunky"  # ~26 MB in 4 weight files: slow enough, behind the throttle, to act mid-download


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--reverse", action="store_true", help="run the tests in reverse order (no test may need another)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first (`pytest.mark.slow(<seconds>)`: how long each took in `make test`), the rest as
    collected: `make test` hands whole files to its workers in this order, so the long drills start at once instead
    of ending last, and wall-bound files (the time-skipping workflows) overlap the CPU-bound ones instead of ending
    the run on one busy core. `--reverse` turns every file's tests, and the files, the other way round first."""
    if config.getoption("reverse"):
        items.reverse()

    def expected_s(item: pytest.Item) -> float:
        mark = item.get_closest_marker("slow")
        return float(mark.args[0]) if mark and mark.args else 0.0

    items.sort(key=expected_s, reverse=True)  # stable: the order within a file, and of the rest, stays


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The source of each model the mirror serves (tests compare against plain mlx_lm on these)."""
    root = tmp_path_factory.mktemp("models")
    return {
        TINY: make_tiny_model(root / "tiny", num_layers=4, num_files=3),
        QWEN: make_tiny_model(root / "qwen", model_type="qwen2", num_layers=6, num_files=4, seed=1),
        TOOLS: make_tool_model(root / "tools"),
    }


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory, model_dirs: dict[str, Path]) -> Iterator[HubMirror]:
    root = tmp_path_factory.mktemp("hub")
    mirrors = root / "mirrors"
    for repo_id, source in model_dirs.items():
        publish_model(source, mirrors, repo_id)
    chunky = make_tiny_model(root / "src-chunky", num_layers=4, hidden_size=512, intermediate_size=1536,
                             vocab_size=512, num_files=4)  # fmt: skip
    publish_model(chunky, mirrors, CHUNKY)
    mirror = HubMirror(mirrors, root / "olah")
    mirror.start()
    yield mirror
    mirror.stop()


@pytest.fixture(scope="session")
def slow_link(hub: HubMirror) -> Iterator[Relay]:
    proxy = Relay(int(hub.endpoint.rsplit(":", 1)[1]), bytes_per_s=4 * 2**20).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, hub: HubMirror) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"), hub.endpoint).start_all()
    yield c
    c.stop_all()


@pytest.fixture(scope="session")
async def client(cluster: Cluster) -> Client:
    return await connect(Settings(temporal_address=cluster.address), wait_s=30)


@pytest.fixture
async def api(cluster: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=cluster.api, timeout=60) as http:
        yield http


@pytest.fixture
def node_id(cluster: Cluster) -> Iterator[str]:
    """A fresh node id; its worker (if the test starts one) is stopped afterwards."""
    node = f"n{uuid.uuid4().hex[:8]}"
    yield node
    cluster.stop(f"node-{node}")
