"""OpenAI-compatible HTTP: the FastAPI app the Router serves, and the OpenAI response shapes.

The routes themselves are Router methods (Ray Serve's class-based ingress); what they send back
is built here.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from loraplex.serving.errors import InvalidRequest, classify, replica_cause
from loraplex.serving.requests import BASE_MODEL_ID

http_app = FastAPI(title="loraplex", description="OpenAI-compatible completions over tenant LoRA adapters")


def openai_error(exc: BaseException) -> JSONResponse:
    _, status, kind = classify(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(status_code=status, headers=headers, content={"error": {
        "message": str(exc), "type": kind, "code": status, "param": None}})


@http_app.exception_handler(RequestValidationError)
async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
    return openai_error(InvalidRequest(reasons or "invalid request body"))


def openai_response(result: dict, chat: bool) -> dict:
    """`model` is the adapter that answered (from the replica), so a client can check it."""
    usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
             "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result["text"]},
                  "finish_reason": openai_finish_reason(result["finish_reason"])}
    else:
        choice = {"index": 0, "text": result["text"], "logprobs": None, "finish_reason": openai_finish_reason(result["finish_reason"])}
    return {"id": result["request_id"], "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": result["adapter_id"] or BASE_MODEL_ID, "choices": [choice],
            "usage": usage,
            "system_fingerprint": result["replica_id"]}


def openai_finish_reason(reason: str) -> str | None:
    return {"stop": "stop", "length": "length"}.get(reason, reason or None)


async def sse(first: dict, chunks, chat: bool):
    def event(chunk: dict) -> str:
        finish = openai_finish_reason(chunk["finish_reason"]) if chunk["final"] else None
        if chat:
            delta = {} if chunk["final"] else {"role": "assistant", "content": chunk["text"]}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": chunk["text"], "logprobs": None, "finish_reason": finish}
        payload = {"id": chunk["request_id"], "object": "chat.completion.chunk" if chat else "text_completion",
                   "created": int(time.time()), "model": chunk["adapter_id"] or BASE_MODEL_ID, "choices": [choice],
                   "system_fingerprint": chunk["replica_id"]}
        return f"data: {json.dumps(payload)}\n\n"

    try:
        yield event(first)
        if not first["final"]:
            async for chunk in chunks:
                yield event(chunk)
    except Exception as exc:  # headers are sent: report in band, as OpenAI does
        _, status, kind = classify(replica_cause(exc))
        yield f"data: {json.dumps({'error': {'message': str(replica_cause(exc)), 'type': kind, 'code': status}})}\n\n"
    yield "data: [DONE]\n\n"


async def held(gate: contextlib.ExitStack, events):
    """Keep the tenant's place until the stream ends, however it ends (a closed connection too)."""
    with gate:
        async for event in events:
            yield event
