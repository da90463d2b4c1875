"""OpenAI Responses: `POST /v1/responses`, streamed and not, for Codex and the Agents SDK. Stateless: nothing is
stored, so a request carries its whole conversation (previous_response_id is refused)."""

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import InferenceDep
from api.inference import Gathered, gather
from api.openai_types import new_id
from api.responses_types import ResponsesRequest, ResponseStream, call_item, message_item, reasoning_item, response
from api.schemas import INFERENCE_STATUSES, ErrorOut, error_responses, streamed
from api.streaming import sse_response

router = APIRouter(prefix="/v1", tags=["responses"], responses=error_responses(ErrorOut, INFERENCE_STATUSES))


@router.post("/responses", response_model=None, responses=streamed("text/event-stream"))
async def responses(body: ResponsesRequest, inference: InferenceDep) -> StreamingResponse | JSONResponse:
    lines = await inference.start(body.model, body.generate_body(), body.conversation())
    if body.stream:
        return sse_response(lines, ResponseStream(body))
    done = await gather(lines)
    return JSONResponse(response(new_id("resp_"), body, output_of(done, body), done.final))


def output_of(done: Gathered, body: ResponsesRequest) -> list[dict[str, Any]]:
    out = [reasoning_item(done.reasoning)] if done.reasoning else []
    if done.text or not done.tool_calls:
        out.append(message_item(done.text))
    tools = body.tool_views()
    return out + [call_item(c, tools) for c in done.tool_calls]
