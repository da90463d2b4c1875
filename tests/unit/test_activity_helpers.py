"""The pure parts of the node activities: error sorting, byte counting, delete rules."""

import errno
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import numpy as np
import pytest
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors.numpy import save
from temporalio.exceptions import ApplicationError

from activities.delete import case_alias, remove_model
from activities.download import bytes_on_disk, child_failure
from activities.errors import classify
from activities.hub import safetensors_sizes
from shardline.errors import ErrorType, error


def hub_error(cls: type[Exception]) -> Exception:
    return cls.__new__(cls)  # the constructor wants an HTTP response we do not have


def test_classify_sorts_what_a_retry_cannot_fix() -> None:
    assert classify(hub_error(RepositoryNotFoundError), "o/m")[0] == ErrorType.NOT_FOUND
    assert classify(hub_error(GatedRepoError), "o/m")[0] == ErrorType.GATED
    assert classify(OSError(errno.ENOSPC, "No space left"), "o/m")[0] == ErrorType.DISK_FULL
    assert classify(ConnectionResetError("peer reset"), "o/m")[0] == ErrorType.HUB_UNREACHABLE
    assert classify(httpx.ConnectTimeout("timed out"), "o/m")[0] == ErrorType.HUB_UNREACHABLE
    # no hub, and not in the local cache: the hub may be back on the next attempt
    assert classify(LocalEntryNotFoundError("cannot reach"), "o/m")[0] == ErrorType.HUB_UNREACHABLE
    assert classify(ValueError("odd"), "o/m")[0] == ErrorType.TRANSIENT
    assert error(ErrorType.NOT_FOUND, "x").non_retryable and error(ErrorType.NOT_FOUND, "x").type == "not_found"
    assert not error(ErrorType.TRANSIENT, "x").non_retryable


def test_child_failure_reads_the_last_report() -> None:
    stderr = b'noise\n{"kind": "not_found", "message": "repo o/m not found"}\n'
    assert child_failure(stderr, "o/m") == (ErrorType.NOT_FOUND, "repo o/m not found")
    assert child_failure(b"Killed", "o/m")[0] == ErrorType.TRANSIENT


def test_bytes_on_disk_counts_complete_files_and_partials(tmp_path: Path) -> None:
    (tmp_path / "a.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "b.safetensors").write_bytes(b"x" * 3)  # wrong size: not complete
    partials = tmp_path / ".cache" / "huggingface" / "download"
    partials.mkdir(parents=True)
    (partials / "Zm9vYmFy.etag.1234abcd.incomplete").write_bytes(b"x" * 4)
    files = {"a.safetensors": 10, "b.safetensors": 5, "c.safetensors": 8}
    assert bytes_on_disk(tmp_path, files) == (14, 1)


def test_remove_model_absent_present_and_odd(tmp_path: Path) -> None:
    models = tmp_path / "models"
    assert remove_model(models, "org/m").removed is False
    (models / "org" / "m").mkdir(parents=True)
    (models / "org" / "m" / "w.safetensors").write_bytes(b"x" * 7)
    result = remove_model(models, "org/m")
    assert result.removed and result.bytes_freed == 7 and not (models / "org").exists()

    (models / "org").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (models / "org" / "link").symlink_to(elsewhere)
    with pytest.raises(ApplicationError, match="refusing to delete") as err:
        remove_model(models, "org/link")
    assert err.value.non_retryable and err.value.type == ErrorType.CONFLICT and elsewhere.exists()


def test_remove_model_refuses_what_is_not_exactly_one_model(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "org" / "m").mkdir(parents=True)
    (models / "org" / "m" / "w.safetensors").write_bytes(b"x")
    for bad in ["org", "org/m/..", "org/../org/m", "org/m/sub"]:
        with pytest.raises(ApplicationError, match="invalid model id") as err:
            remove_model(models, bad)
        assert err.value.non_retryable and err.value.type == ErrorType.BAD_INPUT
    assert (models / "org" / "m" / "w.safetensors").exists()


def test_ids_differing_only_by_case_never_share_a_directory(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "Org" / "Model").mkdir(parents=True)
    assert case_alias(models, "Org/Model") is None
    assert case_alias(models, "org/model") == "Org/Model"
    assert case_alias(models, "Org/model") == "Org/Model"
    assert case_alias(models, "other/model") is None
    with pytest.raises(ApplicationError, match="use Org/Model") as err:
        remove_model(models, "org/model")  # on a case-insensitive disk this would be Org/Model's directory
    assert err.value.type == ErrorType.CONFLICT and err.value.non_retryable and (models / "Org" / "Model").exists()
    assert remove_model(models, "Org/Model").removed


def test_remove_model_keeps_the_org_while_it_holds_another_model(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for name in ("a", "b"):
        (models / "org" / name).mkdir(parents=True)
    assert remove_model(models, "org/a").removed
    assert (models / "org" / "b").is_dir() and not (models / "org" / "a").exists()


def test_runner_blas_choice() -> None:
    from activities.runner import blas_works, optimized_blas

    assert optimized_blas("reference") is None
    assert optimized_blas("/opt/lib/libblis.so") == "/opt/lib/libblis.so"
    auto = optimized_blas("auto")
    assert auto is None or (auto.endswith("libopenblas.so.0") and blas_works(auto))


def test_ring_wait_library_is_built_once_or_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from activities.ring_wait import ring_wait_library
    from activities.runner import runner_env

    assert ring_wait_library("spin") is None
    built = ring_wait_library("poll", tmp_path / "ok")
    if sys.platform == "linux":
        assert built is not None and Path(built).stat().st_size > 0 and Path(built).parent == tmp_path / "ok"
        assert Path(built).name in runner_env("reference", "poll")["LD_PRELOAD"]  # the machine's copy
        assert "ring_wait" not in runner_env("reference", "spin").get("LD_PRELOAD", "")
    for compiler in ("/nonexistent/cc", "false"):  # none, or one that fails: runners go without (they spin)
        monkeypatch.setenv("CC", compiler)
        assert ring_wait_library("poll", tmp_path / compiler.strip("/").replace("/", "-")) is None


class WeightServer(BaseHTTPRequestHandler):
    """Serves one safetensors file at any path; honours a Range header or, like olah's local mirrors, ignores
    it and sends the whole file. Records how many bytes each answer wrote before the client hung up."""

    data = b""
    honour_range = False
    sent: ClassVar[list[int]] = []

    def do_GET(self) -> None:
        body, status = self.data, 200
        ask = self.headers.get("Range", "")
        if self.honour_range and ask.startswith("bytes="):
            start, _, end = ask.removeprefix("bytes=").partition("-")
            body, status = body[int(start) : int(end) + 1], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        sent = 0
        try:
            for at in range(0, len(body), 1 << 16):
                self.wfile.write(body[at : at + (1 << 16)])
                sent += min(1 << 16, len(body) - at)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.sent.append(sent)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def weight_server() -> Iterator[tuple[str, type[WeightServer]]]:
    handler = type("Handler", (WeightServer,), {"sent": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("honour_range", [True, False])
def test_header_sizes_read_from_the_first_bytes_alone(
    weight_server: tuple[str, type[WeightServer]], honour_range: bool
) -> None:
    endpoint, handler = weight_server
    # 3000 tensors: a header past the 100 kB huggingface_hub reads first; 32 MiB of weights after it
    tensors = {f"model.layers.{i}.w": np.zeros(4, np.float16) for i in range(3000)}
    tensors["model.embed_tokens.weight"] = np.zeros((1 << 24,), np.float16)
    handler.data, handler.honour_range = save(tensors), honour_range
    sizes = safetensors_sizes("o/m", "model.safetensors", "main", timeout_s=10, endpoint=endpoint)
    assert sizes == {name: array.nbytes for name, array in tensors.items()}
    deadline = time.monotonic() + 10  # the server thread counts what it sent once its write ends: after the client
    while not handler.sent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(handler.sent) == 1 and handler.sent[0] < len(handler.data) // 2  # it stopped once the header was in
