"""One Temporal dev server with time skipping for the package (`start_time_skipping_v2`: each workflow's clock
skips ahead whenever nothing of it is in flight); each test gets the control worker and fake nodes in-process."""

from collections.abc import AsyncIterator

import pytest
from temporalio.testing import WorkflowEnvironment

from shardline import search
from shardline.temporal import temporal_cli
from tests.support.fake_nodes import FakeCluster

# the timer queue may fire a timer up to a second late, which costs every skip a second of real time
FAST_TIMERS = 'history.timerProcessorMaxTimeShift="10ms"'


async def time_skipping_env(*dynamic_config: str) -> WorkflowEnvironment:
    args: list[str] = []
    for value in ("frontend.WorkflowTimeSkippingEnabled=true", FAST_TIMERS, *dynamic_config):
        args += ["--dynamic-config-value", value]
    return await WorkflowEnvironment.start_time_skipping_v2(
        dev_server_existing_path=temporal_cli(), dev_server_extra_args=args, search_attributes=search.ALL
    )


@pytest.fixture(scope="session")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    async with await time_skipping_env() as started:
        yield started


@pytest.fixture(scope="session")
async def short_history_env() -> AsyncIterator[WorkflowEnvironment]:
    """A server that suggests continue-as-new after a few dozen events (production: thousands)."""
    async with await time_skipping_env("limit.historyCount.suggestContinueAsNew=40") as started:
        yield started


@pytest.fixture
async def fake_cluster(env: WorkflowEnvironment) -> AsyncIterator[FakeCluster]:
    async with FakeCluster(env) as cluster:
        yield cluster
