"""Every activity's contract: its name on the wire (the stub's own name), its input and its result.

Workflows call the stubs (`workflow.execute_activity(contracts.download_model, req, ...)`), so a typo is an
import error and the result type comes from the annotation; activities bind to them with `@implements`,
which checks at import time that the implementation takes and returns what its contract says."""

import inspect
from collections.abc import Callable
from typing import Any, TypeVar, get_type_hints

from temporalio import activity

from shardline.placement import ModelProfile, NodeCapacity
from shardline.types import (
    DeleteRequest,
    DeleteResult,
    DownloadRequest,
    DownloadResult,
    InspectRequest,
    PresenceInput,
    ShardSpec,
)

F = TypeVar("F", bound=Callable[..., Any])


class ContractMismatch(TypeError):
    """An activity implementation whose parameters or result differ from its contract's."""


def _stub() -> NotImplementedError:
    return NotImplementedError("an activity contract: register its implementation (see @implements) instead")


# Node activities, on the node's own queue (`node_queue(node_id)`)


@activity.defn
async def node_presence(inp: PresenceInput) -> None:
    """Heartbeats while the node lives (signalling NodeWorkflow.online first); returns after `lease_s`."""
    raise _stub()


@activity.defn
async def download_model(req: DownloadRequest) -> DownloadResult:
    """A model's files (all, or one layer range's) onto the node, resuming partial files."""
    raise _stub()


@activity.defn
async def delete_model(req: DeleteRequest) -> DeleteResult:
    """A model's files off the node; already absent is success."""
    raise _stub()


@activity.defn
async def run_shard(spec: ShardSpec) -> None:
    """One rank of an instance, for as long as it runs (signalling ServingWorkflow.runner_ready once loaded)."""
    raise _stub()


# Control activities, on the control queue: reads of the cluster's state and of the hub


@activity.defn
async def online_nodes(asking: str = "") -> list[NodeCapacity]:
    """Online nodes and their free memory, less what instances other than `asking` reserved."""
    raise _stub()


@activity.defn
async def node_state(node_id: str) -> str:
    """The node's NodeState as its presence workflow says, or "unknown" if it never joined."""
    raise _stub()


@activity.defn
async def model_users(req: DeleteRequest) -> list[str]:
    """Running workflows that need this model on this node."""
    raise _stub()


@activity.defn
async def inspect_model(req: InspectRequest) -> ModelProfile:
    """What placing a model needs to know: its layers and their sizes, how mlx-lm can split it."""
    raise _stub()


@activity.defn
async def wait_workflow_end(workflow_id: str) -> str:
    """Until the workflow's latest run ends; its final status name, or NOT_FOUND."""
    raise _stub()


def _signature(fn: Callable[..., Any]) -> tuple[list[object], object]:
    """(parameter types, result type) of a function or method, `self` left out."""
    hints = get_type_hints(fn)
    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    missing = [p.name for p in params if p.name not in hints]
    if missing or "return" not in hints:
        raise ContractMismatch(f"{fn.__qualname__}: annotate every parameter and the result ({missing or 'return'})")
    return [hints[p.name] for p in params], hints["return"]


def implements(contract: Callable[..., Any]) -> Callable[[F], F]:
    """Register the decorated function or method as the activity `contract` names, after checking that it
    takes and returns the same types (so a worker never runs something a workflow cannot decode)."""
    name = contract.__name__
    if getattr(contract, "__temporal_activity_definition", None) is None:
        raise ContractMismatch(f"{name} is not an activity contract (decorate it with @activity.defn)")
    expected = _signature(contract)

    def bind(fn: F) -> F:
        found = _signature(fn)
        if found != expected:
            raise ContractMismatch(
                f"{fn.__qualname__} implements {name}{_show(expected)} but is {_show(found)}: change both or neither"
            )
        return activity.defn(name=name)(fn)

    return bind


def _show(signature: tuple[list[object], object]) -> str:
    params, result = signature
    return f"({', '.join(map(_name, params))}) -> {_name(result)}"


def _name(hint: object) -> str:
    return str(hint) if hasattr(hint, "__args__") else getattr(hint, "__name__", str(hint))
