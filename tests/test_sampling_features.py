"""The torch engine's request fields beyond plain sampling, on the real embedded NF4 base.

Penalties, logit_bias, min_tokens, stop_token_ids, logprobs, prompt logprobs (echo) against a
direct transformers forward, JSON-schema decoding in a mixed-adapter batch, and the incremental
detokenizer (multi-byte characters, stop strings across tokens).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import torch

from loraplex.serving.engine import EngineConfig
from loraplex.serving.engine.detokenize import StopDetokenizer
from loraplex.serving.engine.engine import TorchEngine
from loraplex.serving.engine.sampling import SamplingParams
from loraplex.serving.errors import InvalidRequest
from loraplex.training.random_adapter import make_random_adapter

ADAPTERS = [f"rand-{i}" for i in range(8)]
PROMPT = "Write a sentence about the red cat:\n"
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age", "tags"],
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
}
JSON_SCHEMA = json.dumps({"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})


@pytest.fixture(scope="module")
def store(embedded_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    for i, name in enumerate(ADAPTERS):
        make_random_adapter(embedded_base, root / name, seed=i, rank=8, std=0.05)
    return root


@pytest.fixture(scope="module")
def engine(embedded_base, store):
    eng = TorchEngine(
        EngineConfig(base_model=str(embedded_base), adapters=str(store), max_batch=16, max_loras=8, device="cpu")
    )
    yield eng
    eng.shutdown()


def run(engine, prompt=PROMPT, adapter="", **fields):
    return engine.submit(prompt, adapter, SamplingParams(**{"max_tokens": 12, "temperature": 0, **fields})).result(120)


def test_logit_bias_forces_a_token_and_min_tokens_holds_eos(engine):
    forced = engine.tokenizer.encode(" cat", add_special_tokens=False)[0]
    text, final = run(engine, max_tokens=5, logit_bias=((forced, 100.0),))
    assert text == " cat" * 5 and final.finish_reason == "length"
    eos = engine.tokenizer.eos_token_id
    _, short = run(engine, max_tokens=12, logit_bias=((eos, 100.0),))
    assert short.completion_tokens == 0 and short.finish_reason == "stop"
    _, held = run(engine, max_tokens=12, min_tokens=4, logit_bias=((eos, 100.0),))
    assert held.completion_tokens == 4 and held.finish_reason == "stop"


def test_stop_token_ids_end_the_output(engine):
    text, _ = run(engine, max_tokens=12)
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    cut, final = run(engine, max_tokens=12, stop_token_ids=(ids[2],))
    assert final.finish_reason == "stop" and final.completion_tokens == 2


def test_penalties_change_a_repetitive_greedy_output(engine):
    prompt = "Repeat after me: alice paris\n"
    plain = run(engine, prompt, max_tokens=24, ignore_eos=True)[0]
    for fields in ({"repetition_penalty": 1.8}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        assert run(engine, prompt, max_tokens=24, ignore_eos=True, **fields)[0] != plain, fields


def test_logprobs_are_the_log_softmax_of_the_engine_logits(engine):
    events = list(engine.submit(PROMPT, "rand-1", SamplingParams(max_tokens=8, temperature=0, logprobs=3)))
    entries = [e for ev in events for e in (getattr(ev, "logprobs", None) or [])]
    assert len(entries) == events[-1].completion_tokens
    for entry in entries:  # greedy: the chosen token is the best one, and the top list is sorted
        assert entry.top[0][0] == entry.token_id and entry.logprob == pytest.approx(entry.top[0][1])
        assert [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True) and len(entry.top) == 3


def test_prompt_logprobs_equal_a_transformers_forward(engine, embedded_base, store):
    """The loglikelihood path (echo, max_tokens=0): NF4 base + adapter through PEFT, within 1e-3
    plus twice PEFT's own spread. PEFT's fp32 LoRA matmuls round differently with the number of
    rows (its logprobs for one prompt alone and in a padded batch of two differed by 0.012 on an
    AMD EPYC here, and the engine's by 0.015 from the lone one), so the bar is calibrated on PEFT
    itself, measured in the same run: a wrong position or adapter moves logprobs by far more."""
    from peft import PeftModel

    from loraplex.training.quant import load_nf4_base

    prompts = ["Repeat after me: alice paris\n", "Ticket: my invoice is wrong\nQueue: billing"]
    model = PeftModel.from_pretrained(load_nf4_base(embedded_base, "cpu"), str(store / "rand-3")).eval()
    other = engine.encode("Write a sentence about the old ship and the red cat and the dog:\n")
    worst = spread = 0.0
    for prompt in prompts:
        events = list(engine.submit(prompt, "rand-3", SamplingParams(max_tokens=0, prompt_logprobs=1)))
        scored = next(e.prompt_logprobs for e in events if getattr(e, "prompt_logprobs", None))
        assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 0
        ids = engine.encode(prompt)
        width = max(len(ids), len(other))
        batch, mask = torch.zeros(2, width, dtype=torch.long), torch.zeros(2, width, dtype=torch.long)
        for row, tokens in enumerate((ids, other)):
            batch[row, : len(tokens)], mask[row, : len(tokens)] = torch.tensor(tokens), 1
        with torch.no_grad():
            alone = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            batched = torch.log_softmax(model(batch, attention_mask=mask).logits[0].float(), -1)
        reference = [alone[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
        in_batch = [batched[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
        assert scored[0].logprob is None and [e.token_id for e in scored] == ids
        worst = max(worst, max(abs(a.logprob - b) for a, b in zip(scored[1:], reference)))
        spread = max(spread, max(abs(a - b) for a, b in zip(reference, in_batch)))
    print(f"prompt logprobs vs transformers+peft (NF4): max abs diff {worst:.2e}; PEFT alone vs batched {spread:.2e}")
    assert worst < 1e-3 + 2 * spread


def test_json_schema_holds_for_every_row_of_a_mixed_adapter_batch(engine):
    """100 requests over 8 adapters, sampled at temperature 1, decoded together: all parse and validate."""

    def one(i):
        params = SamplingParams(max_tokens=80, temperature=1.0, seed=i, response_format=JSON_SCHEMA)
        return engine.submit(f"Person {i} as JSON:\n", ADAPTERS[i % 8], params).result(300)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(100)))
    valid = 0
    for text, final in results:
        jsonschema.validate(json.loads(text), SCHEMA)
        valid += final.finish_reason == "stop"
    print(f"json_schema: {valid}/100 valid over {len(ADAPTERS)} adapters")
    assert valid == 100


def test_json_schema_holds_against_logits_pushing_control_characters(engine):
    """Raw control characters are not JSON (a grammar library once let them into strings): bias the
    model hard towards them and the output must still parse and validate."""
    control = [i for i in range(len(engine.tokenizer)) if engine.tokenizer.decode([i]) in {chr(c) for c in range(32)}]
    assert control
    bias = tuple((i, 50.0) for i in control)
    for seed in range(4):
        params = SamplingParams(max_tokens=80, temperature=1.0, seed=seed, response_format=JSON_SCHEMA, logit_bias=bias)
        text, final = engine.submit("Person as JSON:\n", ADAPTERS[seed], params).result(120)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert final.finish_reason == "stop"


@pytest.mark.parametrize(
    "fields, reason",
    [
        (
            {"response_format": json.dumps({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}})},
            "response_format",
        ),
        ({"response_format": json.dumps({"type": "xml"})}, "response_format.type"),
        ({"logit_bias": ((10**9, 1.0),)}, "logit_bias"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
        ({"logprobs": 21}, "logprobs"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"min_tokens": 50}, "min_tokens"),
        ({"stop": ("a", "b", "c", "d", "e")}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_fields_are_refused_by_name(engine, fields, reason):
    with pytest.raises(InvalidRequest, match=reason):
        engine.submit(PROMPT, "", SamplingParams(**{"max_tokens": 12, **fields}))


def _feed(tokenizer, ids, params):
    detok = StopDetokenizer(tokenizer, params)
    pieces = [detok.add(t) for t in ids]
    return pieces + [detok.flush()], detok.stopped


def test_detokenizer_keeps_characters_whole_and_matches_a_full_decode(engine):
    tokenizer = engine.tokenizer
    text = "héllo wörld ✓ 日本語 and 🐈 done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, _ = _feed(tokenizer, ids, SamplingParams())
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p])  # multi-byte characters waited for their last byte


def test_stop_strings_spanning_tokens_still_stop(engine):
    tokenizer = engine.tokenizer
    ids = tokenizer.encode("the river in boston is cold", add_special_tokens=False)
    pieces, stopped = _feed(tokenizer, ids, SamplingParams(stop=("er in bo",)))
    assert stopped and "".join(pieces) == "the riv"
    pieces, stopped = _feed(tokenizer, ids, SamplingParams(stop=("日本",)))
    assert not stopped and "".join(pieces) == tokenizer.decode(ids)


def test_repeated_prompts_share_one_prefill_and_answer_as_alone(engine):
    """The choices of n > 1: one prefill forward, the others copy its cache rows; same outputs."""
    params = [SamplingParams(max_tokens=10, temperature=1.0, seed=s) for s in range(4)]
    alone = [engine.submit(PROMPT, "rand-2", p).result(120)[0] for p in params]
    forwards, forward = [], engine._forward
    engine._forward = lambda requests, ids, *a, **k: forwards.append(ids.shape) or forward(requests, ids, *a, **k)
    try:
        with engine.submitting_together():
            streams = [engine.submit(PROMPT, "rand-2", p) for p in params]
        together = [s.result(120)[0] for s in streams]
    finally:
        engine._forward = forward
    assert together == alone
    assert [shape[0] for shape in forwards if shape[1] > 1] == [1]  # one prefill row for the four


def test_prefill_groups_share_repeats_and_keep_scoring_alone():
    from types import SimpleNamespace

    from loraplex.serving.engine.prefill import prefill_groups

    def req(adapter, prompt, scoring=None):
        return SimpleNamespace(adapter_id=adapter, prompt_ids=prompt, params=SamplingParams(prompt_logprobs=scoring))

    a, a2, b, c, s = req("x", [1, 2]), req("x", [1, 2]), req("y", [1, 2]), req("x", [3]), req("x", [1, 2], 0)
    groups = prefill_groups([a, a2, b, c, s], one_by_one=False)
    assert [(len(g.requests), g.shared) for g in groups] == [(2, True), (2, False), (1, False)]
    assert [len(g.requests) for g in prefill_groups([a, b, c], one_by_one=True)] == [1, 1, 1]


def test_the_vllm_mapping_refuses_the_fields_it_does_not_map():
    from loraplex.serving.engine.vllm_args import sampling_kwargs

    for fields in (
        {"logprobs": 1},
        {"prompt_logprobs": 0},
        {"presence_penalty": 1.0},
        {"logit_bias": ((5, 1.0),)},
        {"response_format": JSON_SCHEMA},
        {"min_tokens": 2},
        {"stop_token_ids": (3,)},
    ):
        with pytest.raises(InvalidRequest, match=next(iter(fields))):
            sampling_kwargs(SamplingParams(**fields))
    assert sampling_kwargs(SamplingParams(max_tokens=4))["max_tokens"] == 4
