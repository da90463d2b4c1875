"""What the CLI prints of the API's answers, with the API stood in for (the real one: tests/integration/test_cli)."""

from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from shardline import cli

SHARDS = [{"node_id": "n1", "rank": 0, "layers": [2, 4]}, {"node_id": "n2", "rank": 1, "layers": [0, 2]}]
INSTANCE = {"instance_id": "m-1", "workflow_id": "serve:m-1", "model": "o/m", "state": "ready", "reason": None,
            "strategy": "pipeline", "strategy_reason": "pipeline: layers weighted by free memory over 2 nodes",
            "shards": SHARDS}  # fmt: skip


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, Any]]:
    calls: list[tuple[str, str, Any]] = []

    def call(method: str, path: str, timeout: float = 60, **kwargs: Any) -> Any:
        calls.append((method, path, kwargs.get("json")))
        if method == "POST":
            return {"workflow_id": "serve:m-1", "instance_id": "m-1"}
        return [INSTANCE] if path == "/instances" else INSTANCE

    monkeypatch.setattr(cli, "call", call)
    monkeypatch.setattr(cli, "console", Console(width=200))
    return calls


def test_instances_say_which_strategy_and_why(api: list[tuple[str, str, Any]]) -> None:
    out = CliRunner().invoke(cli.app, ["instances"]).stdout
    assert "pipeline: layers weighted by free memory over 2 nodes" in out and "n1: 2-3, n2: 0-1" in out


def test_serve_asks_for_auto_unless_told_and_says_what_was_chosen(api: list[tuple[str, str, Any]]) -> None:
    waited = CliRunner().invoke(cli.app, ["serve", "o/m", "--wait"])
    assert waited.exit_code == 0, waited.stdout
    assert "strategy pipeline - pipeline: layers weighted by free memory over 2 nodes" in waited.stdout
    CliRunner().invoke(cli.app, ["serve", "o/m", "--strategy", "tensor"])
    assert [body["strategy"] for method, _, body in api if method == "POST"] == ["auto", "tensor"]


def test_serve_asks_for_speculative_decoding_when_told(api: list[tuple[str, str, Any]]) -> None:
    for args in (
        ["--draft-tokens", "6"],
        ["--draft-model", "o/small"],
        ["--draft-model", "o/small", "--draft-tokens", "2"],
    ):
        assert CliRunner().invoke(cli.app, ["serve", "o/m", *args]).exit_code == 0
    CliRunner().invoke(cli.app, ["serve", "o/m"])
    assert [body.get("speculative") for method, _, body in api if method == "POST"] == [
        {"num_draft_tokens": 6},
        {"method": "draft_model", "draft_model": "o/small", "num_draft_tokens": 4},
        {"method": "draft_model", "draft_model": "o/small", "num_draft_tokens": 2},
        None,
    ]


def test_dry_run_shows_the_preview_and_serves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    shards = [{**s, "bytes": 2**30 if s["rank"] == 0 else 2**29} for s in SHARDS]
    why = "pipeline: layers weighted by free memory over 2 nodes"
    preview = {"model": "o/m", "strategy": "pipeline", "reason": why, "total_bytes": 3 * 2**29, "shards": shards}

    def call(method: str, path: str, timeout: float = 60, **kwargs: Any) -> Any:
        calls.append((method, path))
        return preview

    monkeypatch.setattr(cli, "call", call)
    monkeypatch.setattr(cli, "console", Console(width=200))
    out = CliRunner().invoke(cli.app, ["serve", "o/m", "--nodes", "n1,n2", "--dry-run"]).stdout
    assert calls == [("POST", "/instances/preview")]
    assert "n1" in out and "2-3" in out and "1.0 GiB" in out and "512.0 MiB" in out, out
    assert "o/m (1.5 GiB) fits: strategy pipeline - pipeline: layers weighted by free memory over 2 nodes" in out


def test_nodes_list_partial_models_with_their_layers() -> None:
    assert cli.partial({"model": "o/m", "layers": [[0, 2], [5, 6]]}) == "o/m [0, 2) [5, 6)"
