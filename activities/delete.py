"""delete_model: a model's files off this node. Absent is success; odd directories fail clearly."""

import asyncio
import errno
import shutil
from pathlib import Path

import structlog
from temporalio import activity

from shardline import contracts
from shardline.contracts import implements
from shardline.errors import ErrorType, error
from shardline.ids import InvalidId, check_model_id
from shardline.model_files import model_path
from shardline.types import DeleteRequest, DeleteResult

log = structlog.get_logger(__name__)
_TRANSIENT = (
    errno.ENOTEMPTY,
    errno.EBUSY,
    errno.EAGAIN,
)  # a writer racing us: the retry may win


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def case_alias(models_dir: Path, model_id: str) -> str | None:
    """The id of a model directory on disk that differs from `model_id` only by case, when no directory of
    exactly `model_id` exists. On a case-insensitive disk (macOS) both ids name that one directory; shardline
    treats them as different models on every disk, so the same command means the same thing everywhere."""
    found, parent = [], models_dir
    for part in model_id.split("/"):
        entries = {e.name for e in parent.iterdir()} if parent.is_dir() else set()
        if part not in entries:
            twins = sorted(e for e in entries if e.lower() == part.lower())
            if not twins:
                return None
            part = twins[0]
        found.append(part)
        parent = parent / part
    alias = "/".join(found)
    return alias if alias != model_id else None


def checked_model_dir(models_dir: Path, model_id: str) -> Path:
    """The directory of exactly this model: refused (bad_input) for an id that is not `org/name`, a directory
    reached through a link, or one that only a different case of the id names."""
    try:
        check_model_id(model_id)
    except InvalidId as exc:
        raise error(ErrorType.BAD_INPUT, str(exc)) from exc
    path = model_path(models_dir, model_id)
    if path.parent.is_symlink() or path.is_symlink() or (path.exists() and not path.is_dir()):
        raise error(ErrorType.CONFLICT, f"refusing to delete {path}: not a directory shardline made")
    alias = case_alias(models_dir, model_id)
    if alias is not None:
        why = f"this node holds {alias}, which differs only by case; use {alias}"
        raise error(ErrorType.CONFLICT, f"refusing to touch {model_id}: {why}")
    return path


def remove_model(models_dir: Path, model_id: str) -> DeleteResult:
    path = checked_model_dir(models_dir, model_id)
    if not path.exists():
        return DeleteResult(removed=False, bytes_freed=0)
    size = tree_size(path)
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass  # removed under us: the goal is reached
    except OSError as exc:
        kind = ErrorType.TRANSIENT if exc.errno in _TRANSIENT else ErrorType.CONFLICT
        raise error(kind, f"cannot delete {model_id}: {exc.strerror or exc}: {exc.filename}") from exc
    if not any(path.parent.iterdir()):
        path.parent.rmdir()  # the org directory, now empty
    return DeleteResult(removed=True, bytes_freed=size)


class DeleteActivities:
    def __init__(self, models_dir: Path) -> None:
        self._models_dir = models_dir

    @implements(contracts.delete_model)
    async def delete_model(self, req: DeleteRequest) -> DeleteResult:
        activity.heartbeat()
        result = await asyncio.to_thread(remove_model, self._models_dir, req.model_id)
        log.info(
            "model.deleted",
            model_id=req.model_id,
            removed=result.removed,
            bytes_freed=result.bytes_freed,
        )
        return result
