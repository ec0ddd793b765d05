"""The engine contract, on the real embedded base in NF4 with real adapters: batching, store, errors.

Tests taking the `engine` fixture run on every engine available here: the torch engine on CPU
always, the torch engine on CUDA where a GPU is present, and the vLLM engine where vllm is
installed (`make test-vllm`: vLLM's CPU build, which serves the base in bf16). Where vLLM's
semantics differ, a test says so in an explicit branch. The others pin down torch-engine
internals (LRU slots, PEFT parity, decode steps).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from loraplex.serving.engine import EngineConfig, create_engine
from loraplex.serving.engine.engine import TorchEngine
from loraplex.serving.engine.sampling import SamplingParams
from loraplex.serving.errors import AdapterNotFound, AdapterRejected, InvalidRequest, QueueFull
from loraplex.training.random_adapter import make_random_adapter

GREEDY = SamplingParams(max_tokens=12, temperature=0)
PROMPTS = [
    "Repeat after me: alice paris\n",
    "What number comes after 41?\n",
    "Write a sentence about the red cat:\n",
    "Reformat for Europe: 2022-09-18\n",
    "Ticket: my invoice is wrong\nQueue:\n",
    "Quote each word: tokyo\n",
]


@pytest.fixture(scope="module")
def adapter_source(embedded_base, tmp_path_factory) -> Path:
    """Random adapters made once; tests copy them into their own stores."""
    root = tmp_path_factory.mktemp("adapter_source")
    for i in range(4):
        make_random_adapter(embedded_base, root / f"rand-{i}", seed=i, rank=8, std=0.05)
    make_random_adapter(embedded_base, root / "rand-v2", seed=99, rank=8, std=0.05)
    return root


def _vllm_missing() -> str | None:
    from loraplex.serving.engine.vllm_args import vllm_unavailable_reason

    return vllm_unavailable_reason("nf4")


NO_CUDA = not torch.cuda.is_available()
ENGINES = [
    pytest.param({"engine": "torch", "device": "cpu"}, id="torch-cpu"),
    pytest.param(
        {"engine": "torch", "device": "cuda"},
        id="torch-cuda",
        marks=pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU: torch engine on CUDA not run"),
    ),
    pytest.param(
        {"engine": "vllm"},
        id="vllm",
        marks=[
            pytest.mark.vllm,
            pytest.mark.slow,
            pytest.mark.skipif(_vllm_missing() is not None, reason=f"vllm engine: {_vllm_missing()}"),
        ],
    ),
]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request, embedded_base, adapter_source, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    for i in range(4):
        shutil.copytree(adapter_source / f"rand-{i}", store / f"rand-{i}")
    eng = create_engine(
        EngineConfig(base_model=str(embedded_base), adapters=str(store), max_batch=16, max_loras=4, **request.param)
    )
    yield eng
    eng.shutdown()


def is_torch(engine) -> bool:
    return isinstance(engine, TorchEngine)


def solo(engine, prompt, adapter, params=GREEDY) -> str:
    return engine.submit(prompt, adapter, params).result(120)[0]


def test_mixed_batch_gives_the_same_greedy_output_as_solo_runs(engine):
    adapters = ["", "rand-0", "rand-1", "rand-2", "rand-3"]
    alone = {(a, p): solo(engine, p, a) for a in adapters for p in PROMPTS}
    assert len(set(alone.values())) > len(PROMPTS)  # adapters really change the outputs
    streams = {(a, p): engine.submit(p, a, GREEDY) for p in PROMPTS for a in adapters}
    together = {key: s.result(120)[0] for key, s in streams.items()}
    assert together == alone


def test_engine_matches_plain_peft_generate(engine, embedded_base, adapter_source):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from loraplex.training.evaluate import greedy_completions
    from loraplex.training.quant import load_dense_base, load_nf4_base

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_base))
    if is_torch(engine):
        device, precision = engine.runner.k_cache.device.type, engine.config.quantization
    else:  # vLLM, with its own LoRA kernels, against PEFT on the base as vLLM serves it (bf16 on its CPU build)
        device, precision = engine.build.device, engine.base_precision
    base = load_nf4_base(embedded_base, device) if precision == "nf4" else load_dense_base(embedded_base, device=device)
    peft_model = PeftModel.from_pretrained(base, str(adapter_source / "rand-1"))
    reference = greedy_completions(peft_model, tokenizer, PROMPTS, 12, batch_size=1)
    ours = [solo(engine, p, "rand-1") for p in PROMPTS]
    agree = sum(a == b for a, b in zip(ours, reference))
    assert agree >= len(PROMPTS) - 1, list(zip(ours, reference))


def test_streaming_chunks_add_up_to_the_unary_text(engine):
    stream = engine.submit(PROMPTS[2], "rand-2", SamplingParams(max_tokens=20, temperature=0))
    events = list(stream)
    assert events[-1].final and events[-1].finish_reason in ("stop", "length")
    assert all(not e.final for e in events[:-1]) and len(events) > 2
    assert "".join(e.text for e in events) == solo(
        engine, PROMPTS[2], "rand-2", SamplingParams(max_tokens=20, temperature=0)
    )
    assert events[-1].completion_tokens > 0 and events[-1].prompt_tokens > 0


def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    assert solo(engine, PROMPTS[0], "rand-0", params) == solo(engine, PROMPTS[0], "rand-0", params)


def test_stop_strings_end_the_output(engine):
    full = solo(engine, PROMPTS[2], "", SamplingParams(max_tokens=20, temperature=0))
    stop = full.split()[1]
    text, final = engine.submit(PROMPTS[2], "", SamplingParams(max_tokens=20, temperature=0, stop=(stop,))).result(60)
    assert stop not in text and full.startswith(text) and final.finish_reason == "stop"


@pytest.mark.parametrize(
    "params, prompt, reason",
    [
        (SamplingParams(max_tokens=0), "hi", "max_tokens"),
        (SamplingParams(max_tokens=4, temperature=-1), "hi", "temperature"),
        (SamplingParams(max_tokens=4, top_p=0), "hi", "top_p"),
        (SamplingParams(max_tokens=4), "", "empty"),
        (SamplingParams(max_tokens=250), "word " * 40, "exceeds the context"),
    ],
)
def test_invalid_requests_are_refused_with_the_reason(engine, params, prompt, reason):
    with pytest.raises(InvalidRequest, match=reason):
        engine.submit(prompt, "", params)


def test_unknown_and_unsafe_adapter_ids(engine):
    with pytest.raises(AdapterNotFound):
        engine.submit(PROMPTS[0], "nobody", GREEDY).result(30)
    with pytest.raises(Exception, match="safe name|'..'"):
        engine.submit(PROMPTS[0], "../rand-0", GREEDY)


def test_cancel_frees_the_batch_row_within_one_decode_step(engine):
    stream = engine.submit(PROMPTS[2], "rand-0", SamplingParams(max_tokens=200, temperature=0))
    next(iter(stream))  # the request is running
    before = engine.stats()
    assert before["running"] == 1
    stream.cancel()
    final = list(stream)[-1]
    after = engine.stats()
    assert final.finish_reason == "cancelled"
    assert after["running"] == 0
    if is_torch(engine):
        assert after["free_rows"] == engine.config.max_batch
        assert after["steps"] - before["steps"] <= 1
    else:  # vLLM: the abort reaches its engine core, which drops the sequence
        wait_for(lambda: engine.stats()["vllm_unfinished"] == 0, "vLLM still tracks the cancelled request")


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_deadline_ends_a_request_with_deadline_exceeded(engine):
    from loraplex.serving.errors import DeadlineExceeded

    stream = engine.submit(
        PROMPTS[2], "rand-1", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), timeout=0.2
    )
    with pytest.raises(DeadlineExceeded):
        stream.result(60)
    _, final = engine.submit(PROMPTS[2], "rand-1", GREEDY).result(60)  # the engine keeps serving
    assert final.error is None
    wait_for(lambda: engine.stats()["running"] == 0, "the expired request still runs")
    if not is_torch(engine):
        wait_for(lambda: engine.stats()["vllm_unfinished"] == 0, "vLLM still tracks the expired request")


def test_pinned_adapter_survives_lru_eviction(engine, adapter_source):
    """More adapters than slots: the least recently used are evicted, the pinned one stays."""
    root = Path(engine.store.root)
    capacity = engine.store.slots.n_slots - 1  # slot 0 is the bare base
    names = [f"lru-{i}" for i in range(capacity + 1)]
    for name in names:
        shutil.copytree(adapter_source / "rand-v2", root / name, dirs_exist_ok=True)
    engine.store.pin("rand-0")
    try:
        expected = solo(engine, PROMPTS[0], names[0])
        for name in names:  # the same weights under every name: the same answer from every slot
            assert solo(engine, PROMPTS[0], name) == expected
        resident = engine.store.resident()
        assert "rand-0" in resident and len(resident) <= capacity
        assert names[0] not in resident  # the least recently used went first
        if not is_torch(engine):
            # vLLM's own CPU LoRA cache holds at most max_cpu_loras, the pinned adapter among them
            registered = engine._loop.run(engine.llm.list_loras(), 60)
            pinned_id = engine.loras.request(resident["rand-0"].slot).lora_int_id
            assert pinned_id in registered
            assert len(registered) <= (engine.config.max_cpu_loras or engine.config.max_loras)
    finally:
        # vLLM has no unpin_lora: the vllm engine unpins by removing and re-adding the same LoRA ID
        engine.store.pin("rand-0", pinned=False)
    assert "rand-0" not in engine.store.pinned
    if not is_torch(engine):  # the no-unpin difference, by name: the same ID is registered again, unpinned
        assert pinned_id in engine._loop.run(engine.llm.list_loras(), 60)
    _, final = engine.submit(PROMPTS[0], "rand-0", GREEDY).result(60)  # still serves after the unpin
    assert final.error is None
    for name in names:
        engine.store.unload(name)


def test_lru_eviction_and_pinning(embedded_base, adapter_source, tmp_path):
    from loraplex.serving.metrics import ServingMetrics

    for i in range(4):
        shutil.copytree(adapter_source / f"rand-{i}", tmp_path / f"rand-{i}")
    metrics = ServingMetrics()
    eng = TorchEngine(
        EngineConfig(base_model=str(embedded_base), adapters=str(tmp_path), max_batch=4, max_loras=2), metrics=metrics
    )
    try:
        eng.store.pin("rand-0")
        for adapter in ("rand-1", "rand-2", "rand-3", "rand-1"):
            solo(eng, PROMPTS[0], adapter)
        resident = eng.store.resident()
        assert "rand-0" in resident and len(resident) <= 3  # max_loras + 1 swap slot
        text = metrics.text().decode()
        assert 'loraplex_adapter_evictions_total{adapter="rand-1"}' in text
        assert 'loraplex_adapter_evictions_total{adapter="rand-0"}' not in text
        assert eng.store.unload("rand-0") and "rand-0" not in eng.store.resident()
    finally:
        eng.shutdown()


def test_bad_adapters_are_refused_and_others_keep_serving(engine, adapter_source, tmp_path_factory, embedded_base):
    root = Path(engine.store.root)
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(adapter_source / "rand-0", outside / "evil")
    cases = {}
    cases["pickle"] = shutil.copytree(adapter_source / "rand-0", root / "bad-pickle")
    (cases["pickle"] / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    cases["truncated"] = shutil.copytree(adapter_source / "rand-0", root / "bad-truncated")
    weights = cases["truncated"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    make_random_adapter(embedded_base, root / "bad-rank", seed=5, rank=128)
    cases["other-base"] = shutil.copytree(adapter_source / "rand-0", root / "bad-base")
    manifest = cases["other-base"] / "loraplex.json"
    manifest.write_text(manifest.read_text().replace("sha256:", "sha256:0000"))
    os.symlink(outside / "evil", root / "bad-symlink")
    for adapter in ("bad-pickle", "bad-truncated", "bad-rank", "bad-base", "bad-symlink"):
        with pytest.raises(AdapterRejected):
            engine.submit(PROMPTS[0], adapter, GREEDY).result(30)
    _, final = engine.submit(PROMPTS[0], "rand-3", GREEDY).result(60)  # the others are untouched
    assert final.error is None and final.finish_reason in ("stop", "length")


def test_adapter_copied_in_after_start_is_served(engine, adapter_source):
    root = Path(engine.store.root)
    staging = root / ".staging-late"
    shutil.copytree(adapter_source / "rand-v2", staging)
    staging.rename(root / "late-arrival")
    _, final = engine.submit(PROMPTS[1], "late-arrival", GREEDY).result(60)
    assert final.error is None and "late-arrival" in engine.store.resident()


def test_hot_swap_under_load_fails_nothing_and_switches_versions(engine, adapter_source):
    root = Path(engine.store.root)
    shutil.copytree(adapter_source / "rand-1", root / "swapme")
    shutil.copytree(adapter_source / "rand-v2", root / "swap-preview")
    prompt = next(p for p in PROMPTS if solo(engine, p, "swapme") != solo(engine, p, "swap-preview"))
    old_text, old = engine.submit(prompt, "swapme", GREEDY).result(60)
    shutil.copytree(adapter_source / "rand-v2", root / ".swap-stage")
    results, errors, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            submitted = time.monotonic()
            try:
                version = engine.submit(prompt, "swapme", GREEDY).result(60)[1].adapter_version
                results.append((submitted, time.monotonic(), version))
            except Exception as exc:  # any failure breaks the bar
                errors.append(exc)

    workers = [threading.Thread(target=client) for _ in range(4)]
    for w in workers:
        w.start()

    def wait_for_results(enough) -> None:  # poll on what the clients observed, never a fixed sleep
        deadline = time.monotonic() + 120
        while not enough() and not errors:
            assert time.monotonic() < deadline, "the clients made no progress"
            time.sleep(0.01)

    wait_for_results(lambda: len(results) >= 8)  # the old version is serving under load
    before_switch = time.monotonic()
    (root / "swapme").rename(root / ".swap-old")
    (root / ".swap-stage").rename(root / "swapme")
    switched = time.monotonic()
    wait_for_results(lambda: sum(submitted > switched for submitted, _, _ in list(results)) >= 8)
    stop.set()
    for w in workers:
        w.join(60)
    new_text, new = engine.submit(prompt, "swapme", GREEDY).result(60)
    assert not errors
    assert new.adapter_version != old.adapter_version
    assert new_text == solo(engine, prompt, "swap-preview") != old_text  # the new weights answer
    after = [version for submitted, _, version in results if submitted > switched]
    assert after and set(after) == {new.adapter_version}, (old.adapter_version, new.adapter_version, results)
    # The version is chosen when a request is admitted: one queued before the rename may get the
    # new one, but every request that finished before the rename ran on the old one.
    finished_before = {version for _, finished, version in results if finished < before_switch}
    assert finished_before == {old.adapter_version}


def test_full_queue_is_refused(embedded_base, tmp_path):
    eng = TorchEngine(EngineConfig(base_model=str(embedded_base), adapters=str(tmp_path), max_batch=1, max_queue=2))
    try:
        streams = []
        with pytest.raises(QueueFull):
            for _ in range(10):
                streams.append(eng.submit(PROMPTS[0], "", SamplingParams(max_tokens=50, temperature=0)))
        for s in streams:
            s.cancel()
    finally:
        eng.shutdown(drain=False)


def test_a_failing_metrics_exporter_never_breaks_requests(embedded_base, tmp_path):
    from loraplex.serving.metrics import ServingMetrics

    metrics = ServingMetrics()

    def exporter_down(*args, **kwargs):
        raise ValueError("value must be >0, got 0")  # what Ray's Counter.inc(0) raised

    metrics._backend._inner.record = exporter_down
    eng = TorchEngine(EngineConfig(base_model=str(embedded_base), adapters=str(tmp_path), max_batch=4), metrics=metrics)
    try:
        streams = [eng.submit(p, "", GREEDY) for p in PROMPTS]
        finals = [s.result(60)[1] for s in streams]
        assert all(f.error is None and f.finish_reason in ("stop", "length") for f in finals)
    finally:
        eng.shutdown()
