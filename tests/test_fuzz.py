"""Property and fuzz tests (hypothesis): adapter-ID parsing, request validation and the OpenAI
schema. Random and adversarial input gets a LoraplexError (a clear status), never anything else."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from loraplex.serving.engine.sampling import SamplingParams, sample_next
from loraplex.serving.errors import InvalidRequest
from loraplex.serving.requests import ChatCompletionBody, CompletionBody, call_from_proto
from loraplex.training.adapter_id import MAX_ID_LENGTH, internal_name, validate_adapter_id
from loraplex.training.errors import InvalidAdapterId, LoraplexError
from tests.strategies import finite_or_not, hostile_text, json_values, mutated_bodies, proto_requests

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(hostile_text)
def test_adapter_ids_are_valid_safe_names_or_refused(adapter_id):
    try:
        assert validate_adapter_id(adapter_id) == adapter_id
    except InvalidAdapterId as exc:
        assert str(exc)
        return
    assert 0 < len(adapter_id) <= MAX_ID_LENGTH and ".." not in adapter_id
    assert not set(adapter_id) & set("/\\:~%$ ") and adapter_id.isprintable() and adapter_id.isascii()
    assert adapter_id[0] not in ".-"
    root = Path("/srv/store")
    assert (root / adapter_id).parent == root and not Path(adapter_id).is_absolute()
    name = internal_name(adapter_id)
    assert name.isidentifier() and not hasattr(torch.nn.Module, name)


@FUZZ
@given(st.one_of(st.none(), st.integers(), st.binary(max_size=10), st.lists(st.text(max_size=5), max_size=2)))
def test_non_string_adapter_ids_are_refused(adapter_id):
    with pytest.raises(InvalidAdapterId):
        validate_adapter_id(adapter_id)


@FUZZ
@given(st.data())
def test_grpc_requests_validate_or_are_invalid_argument(data):
    request = data.draw(proto_requests())
    try:
        call = call_from_proto(request)
        SamplingParams(**call["params"]).validate(256)
    except InvalidRequest as exc:
        assert str(exc)
        return
    params = SamplingParams(**call["params"])
    assert params.max_tokens > 0 and 0 <= params.temperature <= 100 and 0 < params.top_p <= 1


@FUZZ
@given(st.one_of(json_values, mutated_bodies({"model": "acme", "prompt": "hi", "max_tokens": 4})))
def test_openai_completion_bodies_parse_or_are_refused(body):
    _openai_body_is_handled(CompletionBody, body)


@FUZZ
@given(
    st.one_of(
        json_values, mutated_bodies({"model": "acme", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    )
)
def test_openai_chat_bodies_parse_or_are_refused(body):
    _openai_body_is_handled(ChatCompletionBody, body)


def _openai_body_is_handled(schema, body) -> None:
    try:
        parsed = schema.model_validate(body)
    except ValidationError:
        return  # FastAPI answers 400 with the reasons (see serving/app.py)
    try:
        call = parsed.call(None)
        SamplingParams(**call["params"]).validate(256)
    except LoraplexError as exc:
        assert str(exc)


@FUZZ
@given(
    st.lists(st.floats(-1e30, 1e30), min_size=8, max_size=8),
    finite_or_not,
    st.floats(0.01, 1),
    st.integers(0, 20),
    st.integers(0, 2**63 - 1),
)
def test_sampling_never_fails_on_validated_params(logits, temperature, top_p, top_k, seed):
    params = SamplingParams(max_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    try:
        params.validate(16)
    except InvalidRequest:
        assert not 0 <= temperature <= 100
        return
    token = sample_next(torch.tensor(logits), params, torch.Generator().manual_seed(seed))
    assert 0 <= token < 8


@pytest.fixture(scope="module")
def engine(embedded_base, tmp_path_factory):
    from loraplex.serving.engine import EngineConfig
    from loraplex.serving.engine.engine import TorchEngine

    eng = TorchEngine(
        EngineConfig(
            base_model=str(embedded_base), adapters=str(tmp_path_factory.mktemp("empty")), max_batch=4, max_new_tokens=8
        )
    )
    yield eng
    eng.shutdown(drain=False)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=hostile_text,
    adapter=st.one_of(st.just(""), hostile_text),
    max_tokens=st.one_of(st.none(), st.integers(-5, 12), st.integers(2**31, 2**70)),
    temperature=finite_or_not,
    stop=st.lists(st.text(alphabet=string.printable, max_size=70), max_size=10),
)
def test_engine_submission_is_queued_or_refused_with_a_reason(engine, prompt, adapter, max_tokens, temperature, stop):
    """What a replica does with a request: submit, and the engine thread survives whatever comes."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=tuple(stop))
    try:
        stream = engine.submit(prompt, adapter, params)
    except LoraplexError as exc:
        assert str(exc)
        return
    try:
        stream.result(120)
    except LoraplexError as exc:  # e.g. the adapter is not in the (empty) store
        assert str(exc)
    assert engine._thread.is_alive()
