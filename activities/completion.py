"""The completion marker on disk: which files of a model this node holds complete (see model_files.Completion)."""

import json
import os
from dataclasses import asdict
from pathlib import Path

from shardline.model_files import COMPLETE_MARKER, INDEX_FILE, Completion


def read_completion(dest: Path) -> Completion | None:
    """The marker of the model in `dest`; None when there is none or it cannot be read."""
    try:
        raw = json.loads((dest / COMPLETE_MARKER).read_text())
        if "repo" in raw:
            return Completion(raw["model_id"], raw["commit"], raw["repo"], raw["complete"])
        # written before ranges were recorded: it lists the files of one download, complete then
        sizes = {name: (dest / name).stat().st_size for name in raw["files"] if (dest / name).is_file()}
        return Completion(raw["model_id"], raw["commit"], sizes, sizes)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_completion(dest: Path, completion: Completion) -> None:
    """Atomically: presence may read it at any moment."""
    staged = dest / f"{COMPLETE_MARKER}.tmp"
    staged.write_text(json.dumps({**asdict(completion), "full": completion.full}))
    os.replace(staged, dest / COMPLETE_MARKER)


def intact(dest: Path, files: dict[str, int]) -> bool:
    """Every file is on disk at its recorded size."""
    for name, size in files.items():
        path = dest / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def local_weight_map(dest: Path) -> dict[str, str] | None:
    try:
        weight_map: dict[str, str] = json.loads((dest / INDEX_FILE).read_text())["weight_map"]
        return weight_map
    except (OSError, ValueError, KeyError):
        return None
