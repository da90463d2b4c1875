"""delete_model: a model's files off this node. Absent is success; odd directories fail clearly."""

import asyncio
import errno
import shutil
from pathlib import Path

import structlog
from temporalio import activity

from activities.errors import application_error
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


def remove_model(models_dir: Path, model_id: str) -> DeleteResult:
    path = model_path(models_dir, model_id)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise application_error("bad_input", f"refusing to delete {path}: not a directory shardline made")
    if not path.exists():
        return DeleteResult(removed=False, bytes_freed=0)
    size = tree_size(path)
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass  # removed under us: the goal is reached
    except OSError as exc:
        kind = "transient" if exc.errno in _TRANSIENT else "bad_input"
        raise application_error(kind, f"cannot delete {model_id}: {exc.strerror or exc}: {exc.filename}") from exc
    if path.parent != models_dir and not any(path.parent.iterdir()):
        path.parent.rmdir()  # the org directory, now empty
    return DeleteResult(removed=True, bytes_freed=size)


class DeleteActivities:
    def __init__(self, models_dir: Path) -> None:
        self._models_dir = models_dir

    @activity.defn(name="delete_model")
    async def delete_model(self, req: DeleteRequest) -> DeleteResult:
        try:
            check_model_id(req.model_id)
        except InvalidId as exc:
            raise application_error("bad_input", str(exc)) from exc
        activity.heartbeat()
        result = await asyncio.to_thread(remove_model, self._models_dir, req.model_id)
        log.info(
            "model.deleted",
            model_id=req.model_id,
            removed=result.removed,
            bytes_freed=result.bytes_freed,
        )
        return result
