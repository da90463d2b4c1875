"""A node's id is stable: from SHARDLINE_NODE_ID, else made once and kept in the data dir."""

import secrets
from pathlib import Path

from shardline.ids import check_node_id


def resolve_node_id(configured: str | None, home: Path) -> str:
    if configured:
        return check_node_id(configured)
    path = home / "node_id"
    if path.exists():
        return check_node_id(path.read_text().strip())
    home.mkdir(parents=True, exist_ok=True)
    node_id = f"node-{secrets.token_hex(4)}"
    path.write_text(node_id + "\n")
    return node_id
