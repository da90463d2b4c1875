"""Activity contracts: an implementation that drifts from its contract fails at import, every registered
activity has one, and the workflow definitions stay off the client side."""

import ast
from pathlib import Path

import pytest

from activities.cluster import ClusterActivities
from activities.delete import DeleteActivities
from activities.download import DownloadActivities
from activities.presence import PresenceActivities
from activities.runner import ShardActivities
from shardline import contracts
from shardline.contracts import ContractMismatch, implements
from shardline.types import DeleteRequest, DownloadRequest, DownloadResult

REPO = Path(__file__).resolve().parents[2]
WORKFLOW_DEFINITIONS = ["workflows.node", "workflows.download", "workflows.serve", "workflows.delete",
                        "workflows.common", "workflows.starts"]  # fmt: skip


def test_an_implementation_matching_its_contract_registers_under_its_name() -> None:
    class Fetcher:
        @implements(contracts.download_model)
        async def fetch(self, req: DownloadRequest) -> DownloadResult:
            raise NotImplementedError

    definition = getattr(Fetcher().fetch, "__temporal_activity_definition")
    assert definition.name == "download_model"
    assert definition.ret_type is DownloadResult


def test_a_different_input_fails_at_import() -> None:
    with pytest.raises(ContractMismatch, match=r"implements download_model\(DownloadRequest\)"):

        class Fetcher:
            @implements(contracts.download_model)
            async def download_model(self, req: DeleteRequest) -> DownloadResult:
                raise NotImplementedError


def test_a_different_result_fails_at_import() -> None:
    with pytest.raises(ContractMismatch, match="node_state"):

        @implements(contracts.node_state)
        async def node_state(node_id: str) -> int:
            raise NotImplementedError


def test_an_extra_argument_fails_at_import() -> None:
    with pytest.raises(ContractMismatch, match="online_nodes"):

        @implements(contracts.online_nodes)
        async def online_nodes(asking: str, limit: int) -> list[object]:
            raise NotImplementedError


def test_a_plain_function_is_no_contract() -> None:
    async def helper(x: str) -> str:
        return x

    with pytest.raises(ContractMismatch, match="not an activity contract"):
        implements(helper)


def test_every_activity_the_workers_register_is_a_contract() -> None:
    stubs = {
        name
        for name in dir(contracts)
        if getattr(getattr(contracts, name), "__temporal_activity_definition", None) is not None
    }
    registered = set()
    for cls in (ClusterActivities, DeleteActivities, DownloadActivities, PresenceActivities, ShardActivities):
        for member in vars(cls).values():
            definition = getattr(member, "__temporal_activity_definition", None)
            if definition is not None:
                registered.add(definition.name)
                assert definition.name in stubs, f"{cls.__name__} registers {definition.name}, which has no contract"
    assert registered == stubs


async def test_a_contract_registered_by_mistake_refuses_to_run() -> None:
    with pytest.raises(NotImplementedError, match="register its implementation"):
        await contracts.node_state("n1")


def source_of(module: str) -> Path | None:
    path = REPO / module.replace(".", "/")
    return next((p for p in (path.with_suffix(".py"), path / "__init__.py") if p.is_file()), None)


def imports_reached(module: str) -> set[str]:
    """Every module `module` imports, directly or through first-party modules (read from their source)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        source = source_of(name)
        if source is None:  # not ours: not followed
            continue
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from workflows import client` imports the module workflows.client
                todo += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return seen


@pytest.mark.parametrize("module", WORKFLOW_DEFINITIONS)
def test_workflow_definitions_do_no_client_io(module: str) -> None:
    # import-linter cannot forbid a subpackage of an external package; this reads the imports instead
    imported = imports_reached(module)
    assert "temporalio.client" not in imported
    assert "workflows.client" not in imported and "workflows.state" not in imported


def test_the_import_reader_sees_the_client_side() -> None:
    assert "temporalio.client" in imports_reached("workflows.client")
    assert "temporalio.client" in imports_reached("api.routes.instances")  # through workflows.client
