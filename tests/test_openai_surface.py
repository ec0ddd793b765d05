"""The OpenAI-compatible surface (#15) on a live Ray Serve app, through the real `openai` SDK.

Every response is checked against the SDK's own pydantic types (`model_validate`, not the SDK's
lenient construct), streamed and not. The same capabilities are checked over gRPC, plus
vLLM's adapter admin routes and LangChain's ChatOpenAI.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk

from tests.openai_checks import (
    ADAPTERS,
    PROMPT,
    RESPONSE_FORMAT,
    SCHEMA,
    chat,
    complete,
    reference_logprobs,
    start_server,
    stream,
    tokenizer_ids_of,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(embedded_base, tmp_path_factory):
    from loraplex.serving.launch import stop

    store = tmp_path_factory.mktemp("store")
    yield start_server(embedded_base, store), store
    stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server[0].http_port}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def stub(server):
    import grpc

    from loraplex.v1 import loraplex_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{server[0].grpc_port}")
    yield loraplex_pb2_grpc.LoraplexServiceStub(channel)
    channel.close()


def test_chat_content_parts_and_every_role(client, server):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer plainly."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Write a sentence"}, {"type": "text", "text": "about the red cat:"}],
        },
        {"role": "assistant", "content": "The cat"},
        {"role": "tool", "content": "ok", "tool_call_id": "t1"},
        {"role": "user", "content": "Again:"},
    ]
    response = chat(client, messages=messages)
    assert response.choices[0].finish_reason in ("stop", "length") and response.usage.prompt_tokens > 30
    assert response.model == "rand-0" and response.system_fingerprint and response.id and response.created
    chunks = stream(
        server,
        "chat/completions",
        {"model": "rand-0", "max_tokens": 8, "temperature": 0, "messages": messages},
        ChatCompletionChunk,
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == response.choices[0].message.content


@pytest.mark.parametrize(
    "body, named",
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"best_of": 2}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
            "image_url",
        ),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_unimplemented_or_bad_fields_get_400_naming_them(client, body, named):
    messages = body.pop("messages", [{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match=named):
        client.chat.completions.create(model="rand-0", max_tokens=4, messages=messages, extra_body=body)


def test_chat_logprobs_streamed_and_not(client, server):
    response = chat(client, logprobs=True, top_logprobs=3, max_tokens=6)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)  # greedy
    chunks = stream(
        server,
        "chat/completions",
        {
            "model": "rand-0",
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 3,
            "messages": [{"role": "user", "content": PROMPT}],
        },
        ChatCompletionChunk,
    )
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content])


def test_echo_scores_the_prompt_like_a_transformers_forward(client, server, embedded_base):
    """An evaluation harness's loglikelihood call: echo=True, max_tokens=0, logprobs=1."""
    prompt = "Ticket: my invoice is wrong\nQueue: billing"
    response = complete(client, model="rand-5", prompt=prompt, echo=True, max_tokens=0, logprobs=1)
    choice = response.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length" and response.usage.completion_tokens == 0
    scored = choice.logprobs.token_logprobs
    assert scored[0] is None and len(scored) == response.usage.prompt_tokens
    ids, reference = reference_logprobs(embedded_base, server[1] / "rand-5", prompt)
    worst = max(abs(a - b) for a, b in zip(scored[1:], reference))
    print(f"echo logprobs over HTTP vs transformers+peft (NF4): max abs diff {worst:.2e}")
    assert worst < 1e-3
    # echo with generation: prompt then completion, logprobs for both; token-ID prompts too
    both = complete(client, prompt=ids[1:], echo=True, max_tokens=4, logprobs=2)
    assert both.choices[0].text.startswith(prompt)
    assert len(both.choices[0].logprobs.tokens) == len(ids) - 1 + both.usage.completion_tokens


def test_completion_logprobs_n_and_prompt_lists(client, server):
    response = complete(
        client,
        prompt=[PROMPT, "Repeat after me: alice paris\n"],
        n=2,
        temperature=1.0,
        seed=3,
        logprobs=2,
        max_tokens=6,
    )
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert all(len(c.logprobs.tokens) == len(c.logprobs.text_offset) for c in response.choices)
    assert response.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in response.choices)
    chunks = stream(
        server,
        "completions",
        {"model": "rand-1", "prompt": PROMPT, "n": 3, "max_tokens": 6, "temperature": 1.0, "seed": 1},
        Completion,
    )
    finished = {c.choices[0].index for c in chunks if c.choices[0].finish_reason}
    assert finished == {0, 1, 2}


def test_streamed_echo_logprobs_and_logit_bias(server, tokenizer_ids):
    cat, _ = tokenizer_ids
    body = {
        "model": "rand-1",
        "prompt": PROMPT,
        "echo": True,
        "logprobs": 1,
        "max_tokens": 4,
        "temperature": 0,
        "logit_bias": {str(cat): 100},
    }
    chunks = stream(server, "completions", body, Completion)
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + " cat" * 4
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens[-4:] == [" cat"] * 4 and offsets == sorted(offsets)


def test_chat_n_penalties_and_vllm_extensions(client, server, tokenizer_ids):
    cat, _ = tokenizer_ids
    fields = {
        "n": 2,
        "temperature": 1.0,
        "seed": 4,
        "max_tokens": 6,
        "presence_penalty": 1.0,
        "frequency_penalty": 0.5,
        "logit_bias": {str(cat): -100},
        "stop": ["\n\n"],
        "extra_body": {"repetition_penalty": 1.3, "min_tokens": 2, "top_k": 50},
    }
    response = chat(client, **fields)
    assert [c.index for c in response.choices] == [0, 1] and response.usage.completion_tokens >= 4
    assert all(" cat" not in c.message.content for c in response.choices)
    greedy = chat(client, max_tokens=8).choices[0].message.content
    first = client.chat.completions.create(
        model="rand-0", max_tokens=1, temperature=0, messages=[{"role": "user", "content": PROMPT}], logprobs=True
    )
    stop_id = first.choices[0].logprobs.content[0]
    cut = chat(client, max_tokens=8, extra_body={"stop_token_ids": [tokenizer_ids_of(server, stop_id.token)]})
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens == 0 and greedy
    body = {"model": "rand-0", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5, "n": 2}
    body |= {"temperature": 1.0, "seed": 4, "logprobs": True, "stream_options": {"include_usage": True}}
    chunks = stream(server, "chat/completions", body, ChatCompletionChunk)
    assert {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason} == {0, 1}
    streamed = {0: 0, 1: 0}  # usage counts what both choices streamed (a choice may end on EOS at once)
    for c in (c for c in chunks if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content):
        streamed[c.choices[0].index] += len(c.choices[0].logprobs.content)
    assert all(n <= 5 for n in streamed.values()) and chunks[-1].usage.completion_tokens == sum(streamed.values())


def test_stream_options_include_usage(client, server):
    for path, body, kind in [
        ("completions", {"prompt": PROMPT}, Completion),
        ("chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}, ChatCompletionChunk),
    ]:
        chunks = stream(
            server,
            path,
            {"model": "rand-2", "max_tokens": 6, "temperature": 0, "stream_options": {"include_usage": True}, **body},
            kind,
        )
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
        assert all(c.usage is None for c in chunks[:-1])
    sdk = list(
        client.chat.completions.create(
            model="rand-2",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": PROMPT}],
        )
    )
    assert sdk[-1].usage.total_tokens == sdk[-1].usage.prompt_tokens + sdk[-1].usage.completion_tokens


def test_penalties_bias_min_tokens_and_stops(client, tokenizer_ids):
    cat, eos = tokenizer_ids
    biased = complete(client, max_tokens=4, logit_bias={str(cat): 100})
    assert biased.choices[0].text == " cat" * 4
    held = complete(client, max_tokens=12, logit_bias={str(eos): 100}, extra_body={"min_tokens": 3})
    assert held.usage.completion_tokens == 3 and held.choices[0].finish_reason == "stop"
    plain = complete(client, max_tokens=16, extra_body={"ignore_eos": True}).choices[0].text
    for fields in (
        {"presence_penalty": 2},
        {"frequency_penalty": 2},
        {"extra_body": {"repetition_penalty": 2.0, "ignore_eos": True}},
    ):
        fields.setdefault("extra_body", {"ignore_eos": True})
        assert complete(client, max_tokens=16, **fields).choices[0].text != plain, fields
    word = plain.split()[1]
    stopped = complete(client, max_tokens=16, stop=["zzz", word], extra_body={"ignore_eos": True})
    assert stopped.choices[0].text == plain[: plain.index(word)] and stopped.choices[0].finish_reason == "stop"


@pytest.fixture(scope="module")
def tokenizer_ids(embedded_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_base))
    return tokenizer.encode(" cat", add_special_tokens=False)[0], tokenizer.eos_token_id


def test_json_schema_over_a_mixed_batch_of_8_adapters(client, server):
    """The bar: 100 requests over 8 adapters, sampled, decoded in shared batches; all parse and validate."""

    def one(i):
        kind = chat if i % 2 else complete
        fields = (
            {"messages": [{"role": "user", "content": f"Person {i} as JSON"}]}
            if i % 2
            else {"prompt": f"Person {i} as JSON:\n"}
        )
        response = kind(
            client,
            model=ADAPTERS[i % 8],
            temperature=1.0,
            seed=i,
            max_tokens=60,
            response_format=RESPONSE_FORMAT,
            **fields,
        )
        choice = response.choices[0]
        return choice.message.content if i % 2 else choice.text, choice.finish_reason

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(100)))
    for text, finish in results:
        jsonschema.validate(json.loads(text), SCHEMA)
        assert finish == "stop"
    print("json_schema over HTTP: 100/100 valid over 8 adapters")
    # json_object bounds nothing (this 6M model writes numbers until max_tokens): a strong bias
    # towards "}" shows the grammar at work instead. Unbiased, "}" would come first and alone.
    close = tokenizer_ids_of(server, "}")
    obj = chat(client, response_format={"type": "json_object"}, max_tokens=40, logit_bias={str(close): 30})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    assert obj.choices[0].finish_reason == "stop"
    chunks = stream(
        server,
        "chat/completions",
        {
            "model": "rand-3",
            "max_tokens": 60,
            "temperature": 1.0,
            "response_format": RESPONSE_FORMAT,
            "messages": [{"role": "user", "content": "JSON"}],
        },
        ChatCompletionChunk,
    )
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), SCHEMA)


def test_grpc_logprobs_n_echo_response_format_and_usage(stub):
    from loraplex.v1 import loraplex_pb2 as pb

    metadata = (("multiplexed_model_id", "rand-4"),)
    reply = stub.Generate(
        pb.GenerateRequest(prompt=PROMPT, max_tokens=6, temperature=1.0, seed=2, n=3, logprobs=2),
        metadata=metadata,
        timeout=120,
    )
    assert [c.index for c in reply.choices] == [0, 1, 2] and reply.text == reply.choices[0].text
    assert reply.completion_tokens == sum(len(c.logprobs) for c in reply.choices)
    assert all(len(t.top) == 2 for c in reply.choices for t in c.logprobs)
    echo = stub.Generate(
        pb.GenerateRequest(prompt=PROMPT, max_tokens=0, echo=True, logprobs=1), metadata=metadata, timeout=120
    )
    assert echo.text == PROMPT and not echo.prompt_logprobs[0].HasField("logprob")
    assert len(echo.prompt_logprobs) == echo.prompt_tokens and echo.finish_reason == "length"
    shaped = stub.Generate(
        pb.GenerateRequest(
            prompt="JSON:\n", max_tokens=60, temperature=1.0, seed=5, response_format=json.dumps(RESPONSE_FORMAT)
        ),
        metadata=metadata,
        timeout=120,
    )
    jsonschema.validate(json.loads(shaped.text), SCHEMA)
    messages = list(
        stub.GenerateStream(
            pb.GenerateRequest(prompt=PROMPT, max_tokens=5, temperature=1.0, n=2), metadata=metadata, timeout=120
        )
    )
    assert {m.index for m in messages if m.finish_reason} == {0, 1}
    assert messages[-1].finish_reason == "" and messages[-1].completion_tokens > 0


def test_vllm_adapter_admin_routes(server):
    options, store = server
    base = f"http://127.0.0.1:{options.http_port}/v1"
    ok = httpx.post(f"{base}/load_lora_adapter", json={"lora_name": "rand-6", "lora_path": str(store / "rand-6")})
    assert ok.status_code == 200, ok.text
    outside = httpx.post(f"{base}/load_lora_adapter", json={"lora_name": "rand-6", "lora_path": "/tmp"})
    assert outside.status_code == 400 and "store" in outside.json()["error"]["message"]
    shutil.copytree(store / "rand-6", store / "copied")
    relative = httpx.post(f"{base}/load_lora_adapter", json={"lora_name": "copied", "lora_path": "copied"})
    assert relative.status_code == 200, relative.text
    unloaded = httpx.post(f"{base}/unload_lora_adapter", json={"lora_name": "copied"})
    assert unloaded.status_code == 200, unloaded.text
    missing = httpx.post(f"{base}/load_lora_adapter", json={"lora_name": "nope", "lora_path": "nope"})
    assert missing.status_code == 404


def test_langchain_chat_openai_plain_and_structured(server):
    from typing import Literal

    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Verdict(BaseModel):
        color: Literal["red", "blue"]
        ok: bool

    llm = ChatOpenAI(
        base_url=f"http://127.0.0.1:{server[0].http_port}/v1",
        api_key="unused",
        model="rand-7",
        max_tokens=16,
        temperature=0,
        max_retries=0,
    )
    assert isinstance(llm.invoke("Write a sentence about the red cat:").content, str)
    structured = llm.model_copy(update={"max_tokens": 64}).with_structured_output(Verdict)
    verdict = structured.invoke("Is the cat red?")
    assert isinstance(verdict, Verdict)
