"""What real agents send, captured from the real binaries (tests/unit/captured/, strings cut short): every field,
role and block they use is taken; hints are ignored; what would change the output is still a 400 naming it.
The binaries run end to end against a live cluster in tests/integration/test_agent_clis.py."""

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from api.anthropic_types import MessagesRequest
from api.openai_types import ChatRequest
from api.responses_types import ResponsesRequest
from shardline.engine.server import hoist_system, template_messages
from tests.support.offline_app import offline_app

CAPTURED = Path(__file__).parent / "captured"


def captured(name: str) -> list[dict[str, Any]]:
    requests: list[dict[str, Any]] = json.loads((CAPTURED / f"{name}.json").read_text())["requests"]
    return requests


def test_claude_code_s_first_request_is_taken_whole() -> None:
    (request,) = captured("claude-code-2.1.197-default")
    assert request["path"] == "/v1/messages" and request["query"] == "beta=true"
    assert "context-management" in request["headers"]["anthropic-beta"]
    body = MessagesRequest.model_validate(request["body"])
    runner = body.generate_body()
    roles = [m["role"] for m in runner["messages"]]
    assert roles[0] == "system" and "system" in roles[1:]  # its mid-conversation system message stays in place
    assert runner["messages"][0]["content"].startswith("x-anthropic-billing-header")  # the system blocks, joined
    assert len(runner["tools"]) == len(request["body"]["tools"]) == 24
    assert runner["chat_template_kwargs"] == {}  # thinking "adaptive": the template's default
    assert runner["response_format"] is None  # output_config.effort is a hint


def test_claude_code_s_tool_round_trip_translates() -> None:
    first, second = (MessagesRequest.model_validate(r["body"]) for r in captured("claude-code-2.1.197-tool-turns"))
    assert [t["function"]["name"] for t in first.generate_body()["tools"]] == ["Bash"]
    *_, call, result = second.generate_body()["messages"]
    assert call["role"] == "assistant" and call["tool_calls"][0]["function"]["name"] == "Bash"
    assert result == {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"],
                      "content": "(Bash completed with no output)"}  # fmt: skip


def test_codex_s_first_request_is_taken_whole() -> None:
    (request,) = captured("codex-0.171.0-default")
    body = ResponsesRequest.model_validate(request["body"])
    assert body.store is False and body.include == ["reasoning.encrypted_content"] and body.prompt_cache_key
    runner = body.generate_body()
    assert [m["role"] for m in runner["messages"]] == ["system", "system", "user", "user"]  # developer messages
    names = [t["function"]["name"] for t in runner["tools"]]
    assert "web_search" not in names  # a server tool: left out, not refused
    assert {"exec_command", "spawn_agent", "close_agent"} <= set(names)  # a namespace's tools, each on its own
    tools = body.tool_views()
    assert tools["close_agent"].namespace == "multi_agent_v1" and tools["exec_command"].namespace is None


def test_codex_s_tool_round_trip_translates() -> None:
    first, second = (ResponsesRequest.model_validate(r["body"]) for r in captured("codex-0.171.0-tool-turns"))
    *_, call, result = second.generate_body()["messages"]
    assert call["tool_calls"][0]["function"]["name"] == "exec_command"
    assert result["role"] == "tool" and result["tool_call_id"] == call["tool_calls"][0]["id"]
    assert first.generate_body()["messages"][-1] == {"role": "user", "content": "Write the proof file"}


def test_a_namespaced_call_and_a_custom_tool_go_back_as_the_client_named_them() -> None:
    from api.responses_types import call_item

    body = ResponsesRequest.model_validate({"model": "o/m", "input": "hi", "tools": [
        {"type": "namespace", "name": "agents", "tools": [{"type": "function", "name": "spawn", "parameters": {}}]},
        {"type": "custom", "name": "apply_patch", "format": {"type": "grammar", "syntax": "lark", "definition": "x"}},
        {"type": "web_search"}]})  # fmt: skip
    tools = body.tool_views()
    assert call_item({"name": "spawn", "arguments": "{}"}, tools)["namespace"] == "agents"
    custom = call_item({"name": "apply_patch", "arguments": '{"input": "*** Begin Patch"}'}, tools)
    assert custom["type"] == "custom_tool_call" and custom["input"] == "*** Begin Patch"
    history = ResponsesRequest.model_validate({"model": "o/m", "input": [
        {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": "*** Begin Patch"},
        {"type": "custom_tool_call_output", "call_id": "c1", "output": "Done"}]})  # fmt: skip
    history = history.generate_body()["messages"]
    assert json.loads(history[0]["tool_calls"][0]["function"]["arguments"]) == {"input": "*** Begin Patch"}
    assert history[1] == {"role": "tool", "tool_call_id": "c1", "content": "Done"}


def test_hints_are_accepted_on_chat_completions() -> None:
    body = ChatRequest.model_validate({"model": "o/m", "messages": [{"role": "user", "content": "hi"},
        {"role": "developer", "content": "be brief"}], "store": False, "prompt_cache_key": "k", "metadata": {"a": "b"},
        "service_tier": "auto", "reasoning_effort": "none", "verbosity": "low", "safety_identifier": "u",
        "modalities": ["text"], "web_search_options": {}, "parallel_tool_calls": True})  # fmt: skip
    runner = body.generate_body()
    assert runner["chat_template_kwargs"] == {"enable_thinking": False}
    assert runner["messages"][1] == {"role": "system", "content": "be brief"}


def test_system_messages_move_to_the_front_only_for_a_template_that_refuses_them() -> None:
    chat = [{"role": "system", "content": "a"}, {"role": "user", "content": "u"}, {"role": "system", "content": "b"}]
    assert hoist_system(chat) == [{"role": "system", "content": "a\n\nb"}, {"role": "user", "content": "u"}]
    assert hoist_system(chat[:2]) == chat[:2]


ANTHROPIC = {"model": "o/m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
RESPONSES = {"model": "o/m", "input": "hi"}


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("/v1/messages", {**ANTHROPIC, "mcp_servers": [{"type": "url", "url": "http://x"}]}, "mcp_servers"),
        ("/v1/messages", {**ANTHROPIC, "tools": [{"type": "computer_20250124", "name": "computer"}]}, "computer"),
        ("/v1/messages", {**ANTHROPIC, "output_config": {"format": {"type": "regex"}}}, "output_config.format"),
        (
            "/v1/messages",
            {**ANTHROPIC, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "image",
        ),
        ("/v1/responses", {**RESPONSES, "previous_response_id": "resp_1"}, "previous_response_id"),
        ("/v1/responses", {**RESPONSES, "background": True}, "background"),
        ("/v1/responses", {**RESPONSES, "tools": [{"type": "local_shell"}]}, "local_shell"),
        (
            "/v1/responses",
            {**RESPONSES, "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input_image",
        ),
        ("/v1/chat/completions", {"model": "o/m", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ],
)
def test_what_would_change_the_output_is_still_a_400_naming_it(path: str, body: dict[str, Any], named: str) -> None:
    response = offline_app(None).post(path, json=body)
    assert response.status_code == 400, response.text
    assert named in response.text


def test_a_server_tool_alone_leaves_the_model_no_tools() -> None:
    body = MessagesRequest.model_validate({**ANTHROPIC, "tools": [{"type": "web_search_20250305", "name": "web"}]})
    assert body.generate_body()["tools"] is None
    with pytest.raises(ValidationError, match="tool_choice"):
        ResponsesRequest.model_validate({**RESPONSES, "tool_choice": {"type": "function", "name": "nope"}})


def test_the_root_answers_head_as_claude_code_checks_it() -> None:
    assert offline_app(None).head("/").status_code == 200


def test_a_call_written_wrong_earlier_stays_its_text_for_the_template() -> None:
    """A history may hold a call whose arguments are not JSON (a model wrote it so): the template gets the text
    (schemathesis found the whole request refused, 'cannot tokenize')."""
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}},
             {"id": "d", "type": "function", "function": {"name": "g", "arguments": '{"a": 1}'}}]  # fmt: skip
    (message,) = template_messages([{"role": "assistant", "content": "", "tool_calls": calls}])
    assert [c["function"]["arguments"] for c in message["tool_calls"]] == ["{not json", {"a": 1}]
