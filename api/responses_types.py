"""OpenAI Responses wire types (`POST /v1/responses`), translated to the runner's one request shape."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.openai_types import MAX_TOKENS, check_tool_choice, part_text


class FunctionTool(BaseModel):
    type: str
    name: str = ""
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # the model decides how many it makes
    max_output_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    store: bool | None = None  # nothing is stored either way: previous_response_id is refused
    metadata: dict[str, Any] | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _supported(self) -> "ResponsesRequest":
        for tool in self.tools or []:
            if tool.type != "function":
                raise ValueError(f"tools: type {tool.type!r} is not supported: only function tools are")
        check_tool_choice(
            self.tool_choice if not isinstance(self.tool_choice, dict) else {"type": "function", **self.tool_choice}
        )
        self.chat()
        return self

    def chat(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return [*out, {"role": "user", "content": self.input}]
        for i, item in enumerate(self.input):
            out.append(translate(item, f"input.{i}", out))
        return [m for m in out if m]

    def openai_tools(self) -> list[dict[str, Any]] | None:
        if not self.tools or self.tool_choice == "none":
            return None
        tools = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description or "", "parameters": t.parameters},
            }
            for t in self.tools
        ]
        if isinstance(self.tool_choice, dict):
            tools = [t for t in tools if t["function"]["name"] == self.tool_choice.get("name")]
        return tools

    def response_format(self) -> dict[str, Any] | None:
        fmt = (self.text or {}).get("format")
        if not fmt or fmt.get("type") == "text":
            return None
        if fmt.get("type") == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": fmt.get("name", ""), "schema": fmt.get("schema")}}
        return {"type": fmt.get("type")}

    def generate_body(self) -> dict[str, Any]:
        return {
            "messages": self.chat(),
            "max_tokens": self.max_output_tokens or 512,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "tools": self.openai_tools(),
            "response_format": self.response_format(),
        }


def translate(item: dict[str, Any], where: str, so_far: list[dict[str, Any]]) -> dict[str, Any]:
    """One input item as a chat message; a function call joins the assistant message before it (returns {})."""
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise ValueError(f"{where}: role {role!r} is not supported")
        content = item.get("content", "")
        text = content if isinstance(content, str) else "".join(part_text(p, where) for p in content)
        return {"role": "system" if role == "developer" else role, "content": text}
    if kind == "function_call":
        call = {
            "id": item.get("call_id", ""),
            "type": "function",
            "function": {"name": item["name"], "arguments": item.get("arguments", "{}")},
        }
        if so_far and so_far[-1].get("role") == "assistant":
            so_far[-1].setdefault("tool_calls", []).append(call)
            return {}
        return {"role": "assistant", "content": "", "tool_calls": [call]}
    if kind == "function_call_output":
        output = item.get("output", "")
        text = output if isinstance(output, str) else "".join(part_text(p, where) for p in output)
        return {"role": "tool", "tool_call_id": item.get("call_id", ""), "content": text}
    if kind == "reasoning":
        return {}  # earlier reasoning: chat templates drop it too
    raise ValueError(f"{where}: item type {kind!r} is not supported")
