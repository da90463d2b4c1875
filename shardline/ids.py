"""Ids users type and Temporal stores: validation and the workflow id scheme."""

import re
import uuid

from shardline.states import Kind

CONTROL_QUEUE = "shardline-control"

# The patterns of ids, as the checks below apply them (whole strings) and the API's OpenAPI document declares them
# (anchored, ECMA flavour: the same here)
NODE_ID = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
MODEL_PART = r"(?![^/]*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,95}"  # no ".." inside
MODEL_ID = rf"{MODEL_PART}/{MODEL_PART}"
DOWNLOAD_ID = rf"download:{NODE_ID}:{MODEL_ID}"
WORKFLOW_ID = rf"(?:download|delete):{NODE_ID}:{MODEL_ID}|(?:node|serve|preview):[\s\S]+"
_NODE_ID = re.compile(NODE_ID)
_MODEL_PART = re.compile(MODEL_PART)


def anchored(pattern: str) -> str:
    """A pattern as a JSON schema's `pattern` (which matches anywhere) for the whole string."""
    return f"^(?:{pattern})$"


class InvalidId(ValueError):
    """A node or model id that cannot be used; the message says why."""


def check_node_id(node_id: str) -> str:
    if not _NODE_ID.fullmatch(node_id):
        raise InvalidId(
            f"invalid node id {node_id!r}: use 1-64 letters, digits, '-' or '_', starting with a letter or digit"
        )
    return node_id


def check_model_id(model_id: str) -> str:
    """A hub model id, exactly `org/name`, each part safe as a directory name. One-part ids (`gpt2`) are
    refused: their directory would be an org's, holding (and on delete removing) every model of that org;
    the hub itself now names them with an org (`openai-community/gpt2`)."""
    parts = model_id.split("/")
    if len(parts) != 2:
        raise InvalidId(
            f"invalid model id {model_id!r}: expected 'org/name' (e.g. mlx-community/Llama-3.2-1B-Instruct-4bit), "
            f"got {len(parts)} part{'s' if len(parts) != 1 else ''}"
        )
    for part in parts:
        if not _MODEL_PART.fullmatch(part):
            raise InvalidId(
                f"invalid model id {model_id!r}: each part must be 1-96 letters, digits, '.', '-' or '_', "
                "start with a letter or digit, and not contain '..'"
            )
    return model_id


def node_queue(node_id: str) -> str:
    return f"shardline-node-{node_id}"


def node_workflow_id(node_id: str) -> str:
    return f"{Kind.NODE}:{node_id}"


def download_workflow_id(node_id: str, model_id: str) -> str:
    return f"{Kind.DOWNLOAD}:{node_id}:{model_id}"


def delete_workflow_id(node_id: str, model_id: str) -> str:
    return f"{Kind.DELETE}:{node_id}:{model_id}"


def serve_workflow_id(instance_id: str) -> str:
    return f"{Kind.SERVE}:{instance_id}"


def preview_workflow_id(preview_id: str) -> str:
    """One preview of where a model would go (a fresh id each time, as `new_instance_id` makes)."""
    return f"{Kind.PREVIEW}:{preview_id}"


def new_instance_id(model_id: str) -> str:
    """A fresh instance id that says which model it serves: `llama-3.2-1b-4bit-1a2b3c`."""
    return f"{model_id.rsplit('/', 1)[-1].lower()[:40]}-{uuid.uuid4().hex[:6]}"


def _suffix(workflow_id: str, kind: Kind) -> str:
    prefix, sep, rest = workflow_id.partition(":")
    if prefix != kind or not sep or not rest:
        raise InvalidId(f"invalid workflow id {workflow_id!r}: expected '{kind}:<id>'")
    return rest


def node_of(workflow_id: str) -> str:
    """`node:n1` -> "n1"."""
    return _suffix(workflow_id, Kind.NODE)


def instance_of(workflow_id: str) -> str:
    """`serve:llama-1a2b3c` -> "llama-1a2b3c"."""
    return _suffix(workflow_id, Kind.SERVE)


def parse_workflow_id(workflow_id: str) -> tuple[str, list[str]]:
    """`download:n1:org/m` -> ("download", ["n1", "org/m"])."""
    kind, _, rest = workflow_id.partition(":")
    if not rest:
        raise InvalidId(f"invalid workflow id {workflow_id!r}: expected '<kind>:<...>'")
    if kind in (Kind.DOWNLOAD, Kind.DELETE):
        node_id, sep, model_id = rest.partition(":")
        if not sep:
            raise InvalidId(f"invalid workflow id {workflow_id!r}: expected '{kind}:<node_id>:<model_id>'")
        return kind, [check_node_id(node_id), check_model_id(model_id)]
    return kind, [rest]
