"""Claude Code and Codex, the real binaries from npm at pinned versions (tests/support/agent_clis.py), run
non-interactively against a live cluster: each finishes a task that needs a tool call and its result, streamed
as they stream, on a tool-calling test model (model_factory.make_tool_model) made to call that agent's shell tool.

Both run with a short system prompt and only their shell tools: this test model's 512-token vocabulary makes Claude
Code's default request (76 KB) 50,000 tokens and Codex's 27,000, which MLX prefills on a CPU in tens of minutes.
Their default requests, whole, are checked in tests/unit/test_client_requests.py. Telemetry, update checks and
other traffic are off (nothing leaves loopback anyway)."""

import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Cluster
from tests.support.agent_clis import NpmUnreachable, install
from tests.support.hub_mirror import HubMirror, publish_model
from tests.support.model_factory import make_tool_model, tool_call_text
from tests.support.serving import running_nodes, start_instance, wait_state

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow(13)]
CLAUDE_MODEL, CODEX_MODEL = "test-org/claude-agent", "test-org/codex-agent"
ANSWER = "The proof file is written."
COMMAND = "echo done > proof.txt"
CALLS = {
    CLAUDE_MODEL: tool_call_text("Bash", {"command": COMMAND, "description": "Write the proof file"}),
    CODEX_MODEL: tool_call_text("exec_command", {"cmd": COMMAND}),
}
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def binaries() -> dict[str, Path]:
    try:
        return {name: install(name) for name in ("claude", "codex")}
    except NpmUnreachable as reason:
        pytest.skip(f"!!! the agent CLIs cannot be installed, so Claude Code and Codex are NOT tested: {reason}")


@pytest.fixture(scope="module")
async def agent_models(cluster: Cluster, hub: HubMirror, tmp_path_factory: pytest.TempPathFactory,
                       binaries: dict[str, Path]) -> AsyncIterator[None]:  # fmt: skip
    """One tool model per agent, calling its shell tool, served on one node for the module."""
    root = tmp_path_factory.mktemp("agent-models")
    for repo, call in CALLS.items():
        source = make_tool_model(root / repo.split("/")[1], call=call, answer=ANSWER, context=32768)
        publish_model(source, hub.mirrors_root, repo)
    async with httpx.AsyncClient(base_url=cluster.api, timeout=60) as api, running_nodes(cluster, api, ["cli-n"]):
        ids = [await start_instance(api, repo, nodes=["cli-n"]) for repo in CALLS]
        for instance_id in ids:
            ready = await wait_state(api, instance_id, {"ready", "failed"})
            assert ready["state"] == "ready", ready["reason"]
        yield
        for instance_id in ids:
            await api.delete(f"/instances/{instance_id}")


def run(args: list[str], workdir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ["PATH"], "HOME": str(workdir.parent / "home"), "LANG": "C.UTF-8"}
    done = subprocess.run(args, cwd=workdir, env={**base, **env}, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, f"{args[0]} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def workdir(tmp_path: Path) -> Path:
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


async def test_claude_code_finishes_a_tool_round_trip(
    cluster: Cluster, agent_models: None, binaries: dict[str, Path], tmp_path: Path
) -> None:
    work = workdir(tmp_path)
    env = {
        "ANTHROPIC_BASE_URL": cluster.api,
        "ANTHROPIC_API_KEY": "unused",
        "CLAUDE_CONFIG_DIR": str(tmp_path / "home" / ".claude"),
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",  # no telemetry, error reports, update checks
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "ANTHROPIC_SMALL_FAST_MODEL": CLAUDE_MODEL,  # its side requests go to the cluster too
    }
    args = [str(binaries["claude"]), "-p", "Write the proof file", "--model", CLAUDE_MODEL, "--tools", "Bash",
            "--allowedTools", "Bash", "--system-prompt", "You are a test agent. Use tools."]  # fmt: skip
    done = run(args, work, env)
    assert (work / "proof.txt").read_text() == "done\n"  # the call ran
    assert done.stdout.strip() == ANSWER  # and the model answered after reading its result


async def test_codex_finishes_a_tool_round_trip(
    cluster: Cluster, agent_models: None, binaries: dict[str, Path], tmp_path: Path
) -> None:
    work = workdir(tmp_path)
    home = tmp_path / "home"
    (home / "instructions.md").write_text("You are a test agent. Use tools.\n")
    (home / "config.toml").write_text(f"""\
model = "{CODEX_MODEL}"
model_provider = "shardline"
model_instructions_file = "{home / "instructions.md"}"
web_search = "disabled"
check_for_update_on_startup = false

[model_providers.shardline]
name = "shardline"
base_url = "{cluster.api}/v1"
wire_api = "responses"
env_key = "SHARDLINE_API_KEY"
request_max_retries = 0
stream_max_retries = 0

[features]
multi_agent = false
goals = false

[analytics]
enabled = false

[feedback]
enabled = false
""")
    env = {"CODEX_HOME": str(home), "SHARDLINE_API_KEY": "unused"}
    args = [str(binaries["codex"]), "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox",
            "Write the proof file"]  # fmt: skip
    done = run(args, work, env)
    assert (work / "proof.txt").read_text() == "done\n"
    assert done.stdout.strip().splitlines()[-1] == ANSWER
