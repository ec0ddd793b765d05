"""Helpers for the OpenAI-surface tests: calls whose responses are validated against the SDK's types."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from openai._models import construct_type
from openai.types import Completion
from openai.types.chat import ChatCompletion

PROMPT = "Write a sentence about the red cat:\n"
ADAPTERS = [f"rand-{i}" for i in range(8)]
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age", "ok"],
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


def chat(client, **fields) -> ChatCompletion:
    """A chat completion, validated against the SDK's type from the raw JSON."""
    fields = {
        "model": "rand-0",
        "max_tokens": 8,
        "temperature": 0,
        "messages": [{"role": "user", "content": PROMPT}],
        **fields,
    }
    raw = client.chat.completions.with_raw_response.create(**fields)
    return ChatCompletion.model_validate(raw.http_response.json())


def complete(client, **fields) -> Completion:
    fields = {"model": "rand-0", "max_tokens": 8, "temperature": 0, "prompt": PROMPT, **fields}
    if "response_format" in fields:  # a chat field in the SDK; the server takes it on completions too (vLLM)
        fields["extra_body"] = {**fields.get("extra_body", {}), "response_format": fields.pop("response_format")}
    raw = client.completions.with_raw_response.create(**fields)
    return as_completion(raw.http_response.json())


def as_completion(payload: dict) -> Completion:
    """Validated as the SDK's Completion, past two places where that type is stricter than the API itself.

    The SDK declares token_logprobs as floats and top_logprobs as dicts, but an echoed prompt's
    first token has null for both (OpenAI's legacy API and vLLM alike): checked here, then
    validated without that entry. A streamed chunk's finish_reason is null until the end (the SDK
    parses stream chunks as Completion too): validated as if set.
    """
    original, payload = payload, json.loads(json.dumps(payload))
    for choice in payload["choices"]:
        logprobs = choice.get("logprobs")
        if logprobs and logprobs["token_logprobs"] and logprobs["token_logprobs"][0] is None:
            assert logprobs["top_logprobs"][0] is None
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                logprobs[key] = logprobs[key][1:]
        if choice.get("finish_reason") is None:
            choice["finish_reason"] = "length"
    Completion.model_validate(payload)
    return construct_type(type_=Completion, value=original)  # as the SDK parses it (nulls kept)


def stream(server, path: str, body: dict, chunk_type) -> list:
    """Server-sent events, each validated against the SDK's chunk type."""
    events = []
    with httpx.stream(
        "POST", f"http://127.0.0.1:{server[0].http_port}/v1/{path}", json={**body, "stream": True}, timeout=120
    ) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                payload = json.loads(line[6:])
                assert "error" not in payload, payload
                if chunk_type is Completion:
                    events.append(as_completion(payload))
                else:
                    events.append(chunk_type.model_validate(payload))
    return events


def tokenizer_ids_of(server, text: str) -> int:
    from transformers import AutoTokenizer

    (token,) = AutoTokenizer.from_pretrained(server[0].base_model).encode(text, add_special_tokens=False)
    return token


def start_server(embedded_base: Path, store: Path):
    """A live app on loopback (auth off) serving 8 random adapters written into `store`."""
    from loraplex.serving.launch import ServeOptions, start
    from loraplex.training.random_adapter import make_random_adapter
    from tests.conftest import free_port

    for i, name in enumerate(ADAPTERS):
        make_random_adapter(embedded_base, store / name, seed=i, rank=8, std=0.05)
    options = ServeOptions(
        base_model=str(embedded_base),
        adapters=str(store),
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        num_cpus=2,
        max_batch=16,
        max_loras=8,
        allow_unauthenticated=True,
    )
    start(options)
    return options


def reference_logprobs(base: Path, adapter: Path, prompt: str) -> tuple[list[int], list[float]]:
    """The prompt's token IDs (BOS first) and each later token's logprob from a plain transformers
    forward on the NF4 base with the adapter through PEFT: what echo scoring must equal."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from loraplex.training.quant import load_nf4_base

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = PeftModel.from_pretrained(load_nf4_base(base, "cpu"), str(adapter)).eval()
    ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return ids, [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
