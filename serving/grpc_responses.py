"""GenerateResponse messages from the replica's result and chunk dicts (the gRPC surface's shapes)."""

from __future__ import annotations

from loraplex.v1 import loraplex_pb2 as pb

_IDS = ("request_id", "adapter_id", "replica_id")


def token_logprobs(entries: list[dict] | None) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=e["token_id"],
            token=e["token"],
            logprob=e["logprob"],
            top=[pb.TopLogprob(token_id=t["token_id"], token=t["token"], logprob=t["logprob"]) for t in e["top"]],
        )
        for e in entries or []
    ]


def _choice(choice: dict, ids: dict) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        **ids,
        index=choice["index"],
        text=choice["text"],
        finish_reason=choice["finish_reason"],
        completion_tokens=choice["completion_tokens"],
        logprobs=token_logprobs(choice["logprobs"]),
        prompt_logprobs=token_logprobs(choice["prompt_logprobs"]),
    )


def unary(result: dict) -> pb.GenerateResponse:
    """Choice 0 at the top level (as before n existed), with the totals; every choice in `choices` when n > 1."""
    ids = {k: result[k] for k in _IDS}
    first = result["choices"][0]
    response = _choice(first, ids)
    response.prompt_tokens, response.completion_tokens = result["prompt_tokens"], result["completion_tokens"]
    response.adapter_version = result["adapter_version"]
    if len(result["choices"]) > 1:
        response.choices.extend(_choice(c, ids) for c in result["choices"])
    return response


async def stream(chunks, choice_count: int):
    """Messages for a stream; with one choice its end and the totals are one message (as before n existed)."""
    finish = ""
    async for chunk in chunks:
        ids = {k: chunk[k] for k in _IDS}
        if chunk["final"]:
            yield pb.GenerateResponse(
                **ids,
                finish_reason=finish,
                prompt_tokens=chunk["prompt_tokens"],
                completion_tokens=chunk["completion_tokens"],
                adapter_version=chunk["adapter_version"],
            )
            return
        if chunk["done"] and choice_count == 1:
            finish = chunk["finish_reason"]
            if not (chunk["text"] or chunk["logprobs"]):
                continue
            chunk = {**chunk, "finish_reason": "", "done": False}
        yield pb.GenerateResponse(
            **ids,
            index=chunk["index"],
            text=chunk["text"],
            finish_reason=chunk["finish_reason"] if chunk["done"] else "",
            completion_tokens=chunk.get("completion_tokens", 0) if chunk["done"] else 0,
            logprobs=token_logprobs(chunk["logprobs"]),
            prompt_logprobs=token_logprobs(chunk["prompt_logprobs"]),
        )
