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
    return JSONResponse(
        status_code=status,
        headers=headers,
        content={"error": {"message": str(exc), "type": kind, "code": status, "param": None}},
    )


@http_app.exception_handler(RequestValidationError)
async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    return openai_error(InvalidRequest(body_errors(exc.errors()) or "invalid request body"))


def body_errors(errors) -> str:
    """Pydantic's errors as one line; a field the server does not implement is named as such."""
    reasons = []
    for error in errors:
        where = ".".join(str(p) for p in error["loc"][1:])
        if error["type"] == "extra_forbidden":
            reasons.append(f"{where}: this server does not implement the field '{error['loc'][-1]}'")
        else:
            reasons.append(f"{where}: {error['msg']}")
    return "; ".join(dict.fromkeys(reasons))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _head(result: dict, chat: bool, chunk: bool) -> dict:
    """`model` is the adapter that answered, `system_fingerprint` the replica (from the replica itself)."""
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {
        "id": result["request_id"],
        "object": kind,
        "created": int(time.time()),
        "model": result["adapter_id"] or BASE_MODEL_ID,
        "system_fingerprint": result["replica_id"],
    }


def chat_logprobs(entries: list[dict] | None) -> dict | None:
    """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}."""
    if entries is None:
        return None

    def one(e: dict) -> dict:
        return {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}

    return {"content": [{**one(e), "top_logprobs": [one(t) for t in e["top"]]} for e in entries], "refusal": None}


def completion_logprobs(entries: list[dict], offset: int = 0) -> dict:
    """OpenAI's completions shape: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"]) if not e.get("special") else 0
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [
            None if e["logprob"] is None else {e["token"]: e["logprob"], **{t["token"]: t["logprob"] for t in e["top"]}}
            for e in entries
        ],
        "text_offset": offsets,
    }


def _completion_entries(choice: dict) -> list[dict] | None:
    if choice.get("prompt_logprobs") is None and choice.get("logprobs") is None:
        return None
    return (choice.get("prompt_logprobs") or []) + (choice.get("logprobs") or [])


def openai_response(result: dict, chat: bool, logprobs: bool) -> dict:
    choices = []
    for choice in result["choices"]:
        finish = choice["finish_reason"]
        if chat:
            choices.append(
                {
                    "index": choice["index"],
                    "message": {"role": "assistant", "content": choice["text"]},
                    "logprobs": chat_logprobs(choice["logprobs"]) if logprobs else None,
                    "finish_reason": finish,
                }
            )
        else:
            entries = _completion_entries(choice) if logprobs else None
            choices.append(
                {
                    "index": choice["index"],
                    "text": choice["text"],
                    "finish_reason": finish,
                    "logprobs": None if entries is None else completion_logprobs(entries),
                }
            )
    return {
        **_head(result, chat, chunk=False),
        "choices": choices,
        "usage": usage(result["prompt_tokens"], result["completion_tokens"]),
    }


async def sse(first: dict, chunks, chat: bool, logprobs: bool, include_usage: bool):
    """OpenAI's server-sent events; a failure after the headers is an in-band error event."""
    offsets: dict[int, int] = {}  # completions: text_offset so far, per choice
    started: set[int] = set()  # chat: choices whose first delta (with the role) went out

    def event(chunk: dict) -> str:
        if chunk["final"]:
            payload = {
                **_head(chunk, chat, chunk=True),
                "choices": [],
                "usage": usage(chunk["prompt_tokens"], chunk["completion_tokens"]),
            }
            return f"data: {json.dumps(payload)}\n\n"
        index, finish = chunk["index"], chunk["finish_reason"] or None
        if chat:
            delta: dict[str, Any] = {"content": chunk["text"]} if chunk["text"] or not finish else {}
            if index not in started:
                started.add(index)
                delta["role"] = "assistant"
            choice: dict[str, Any] = {
                "index": index,
                "delta": delta,
                "finish_reason": finish,
                "logprobs": chat_logprobs(chunk["logprobs"] or []) if logprobs else None,
            }
        else:
            entries = _completion_entries(chunk) if logprobs else None
            lp = None
            if entries is not None:
                lp = completion_logprobs(entries, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + sum(len(e["token"]) for e in entries if not e.get("special"))
            choice = {"index": index, "text": chunk["text"], "finish_reason": finish, "logprobs": lp}
        payload = {**_head(chunk, chat, chunk=True), "choices": [choice]}
        if include_usage:
            payload["usage"] = None
        return f"data: {json.dumps(payload)}\n\n"

    try:
        async for chunk in _chain(first, chunks):
            if not chunk["final"] or include_usage:
                yield event(chunk)
    except Exception as exc:  # headers are sent: report in band, as OpenAI does
        _, status, kind = classify(replica_cause(exc))
        yield f"data: {json.dumps({'error': {'message': str(replica_cause(exc)), 'type': kind, 'code': status}})}\n\n"
    yield "data: [DONE]\n\n"


async def _chain(first: dict, rest):
    yield first
    if not first["final"]:
        async for chunk in rest:
            yield chunk


async def held(gate: contextlib.ExitStack, events):
    """Keep the tenant's place until the stream ends, however it ends (a closed connection too)."""
    with gate:
        async for event in events:
            yield event
