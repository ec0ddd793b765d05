"""Engine v2 on the real embedded NF4 base: batched LoRA read once per adapter, loads beside
decoding, no head-of-line blocking, fairness. Torch engine on CPU (the op these tests pin down)."""

from __future__ import annotations

import random
import shutil
import statistics
import threading
import time
from pathlib import Path

import pytest

from loraplex.serving.engine import EngineConfig, lora_op
from loraplex.serving.engine.engine import TorchEngine
from loraplex.serving.engine.sampling import SamplingParams
from loraplex.training.random_adapter import make_random_adapter

GREEDY = SamplingParams(max_tokens=8, temperature=0)
LONG = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
PROMPTS = [
    "Repeat after me: alice paris\n",
    "What number comes after 41?\n",
    "Ticket: my invoice is wrong\nQueue:\n",
    "Quote each word: tokyo\n",
    "Ship 12 lamps to lima\nWarehouse:\n",
]
ADAPTERS = [f"rand-{i}" for i in range(6)]


@pytest.fixture(scope="module")
def adapter_source(embedded_base, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("v2_adapters")
    for i, name in enumerate(ADAPTERS):
        make_random_adapter(embedded_base, root / name, seed=100 + i, rank=(8, 16, 4)[i % 3], std=0.05)
    make_random_adapter(embedded_base, root / "large", seed=7, rank=64, std=0.05)
    return root


def _engine(embedded_base, adapter_source, tmp_path, **overrides) -> TorchEngine:
    for name in (*ADAPTERS, "large"):
        shutil.copytree(adapter_source / name, tmp_path / name)
    config = dict(base_model=str(embedded_base), adapters=str(tmp_path), device="cpu", max_batch=16, max_loras=4)
    return TorchEngine(EngineConfig(**(config | overrides)))


def test_the_batched_lora_op_builds_here():
    """CI machines have g++ and ninja: the op must build, or every other test here runs the fallback."""
    assert lora_op.available(), lora_op.build_error()


@pytest.mark.parametrize("path", ["op", "bmm"])
@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_mixed_equals_solo_for_every_row_at_batch_sizes_1_to_16_across_slot_reassignment(
    embedded_base, adapter_source, tmp_path, path, adapter_dtype
):
    """6 adapters over 5 slots: slots are reassigned (LRU) between and within the batches."""
    engine = _engine(embedded_base, adapter_source, tmp_path, adapter_dtype=adapter_dtype)
    try:
        groups = [g for layer in engine.slots.groups for g in layer.values()]
        if path == "bmm":  # the per-position path CUDA runs
            for group in groups:
                group.use_op = False
        assert all(g.use_op == (path == "op") for g in groups)
        names = ["", *ADAPTERS]
        alone = {(p, a): engine.submit(p, a, GREEDY).result(120)[0] for p in PROMPTS for a in names}
        assert len(set(alone.values())) > len(PROMPTS)  # the adapters change the outputs
        chooser = random.Random(5)
        for size in (1, 2, 3, 4, 5, 7, 8, 12, 16):
            keys = [(chooser.choice(PROMPTS), chooser.choice(names)) for _ in range(size)]
            with engine.submitting_together():
                streams = [engine.submit(p, a, GREEDY) for p, a in keys]
            got = [s.result(120)[0] for s in streams]
            assert got == [alone[k] for k in keys], size
        assert engine.store.counts["host_hits"] > 0  # slots were reassigned from the host tier
    finally:
        engine.shutdown()


def test_a_base_request_behind_a_slot_starved_one_is_admitted_first(embedded_base, adapter_source, tmp_path):
    engine = _engine(embedded_base, adapter_source, tmp_path, max_batch=4, max_loras=1)  # 2 adapter slots
    try:
        holders = [engine.submit(PROMPTS[0], a, LONG) for a in ("rand-0", "rand-1")]
        while engine.stats()["running"] < 2:
            time.sleep(0.01)
        starved = engine.submit(PROMPTS[1], "rand-2", GREEDY)  # no slot until a holder leaves
        assert engine.submit(PROMPTS[2], "", GREEDY).result(60)[1].final  # queued behind it, done first
        assert engine.stats()["waiting"] == 1 and engine.stats()["running"] == 2
        for holder in holders:
            holder.cancel()
        assert starved.result(60)[1].finish_reason in ("stop", "length")
    finally:
        engine.shutdown()


def test_one_tenants_burst_cannot_starve_another(embedded_base, adapter_source, tmp_path):
    """Round-robin over adapters, and at most max_rows_per_adapter rows while others wait."""
    engine = _engine(embedded_base, adapter_source, tmp_path, max_batch=2)  # cap: 1 row while others wait
    try:
        finished, lock = [], threading.Lock()

        def wait(name, stream):
            stream.result(120)
            with lock:
                finished.append(name)

        same_length = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        for adapter in ("rand-0", "rand-1"):  # resident first: this is about admission, not loading
            engine.submit(PROMPTS[0], adapter, GREEDY).result(60)
        with engine.submitting_together():  # FIFO would run a1..a6 before b1
            streams = [(f"a{i}", engine.submit(PROMPTS[0], "rand-0", same_length)) for i in range(1, 7)]
            streams += [(f"b{i}", engine.submit(PROMPTS[1], "rand-1", same_length)) for i in range(1, 3)]
        threads = [threading.Thread(target=wait, args=pair) for pair in streams]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert sorted(finished) == sorted(name for name, _ in streams)
        assert finished.index("b2") < finished.index("a3"), finished  # b took every other row
    finally:
        engine.shutdown()


def test_a_cold_load_of_a_large_adapter_adds_no_decode_step_gap(embedded_base, adapter_source, tmp_path):
    """The rank-64 adapter is read on the loader thread while 8 rows decode; the step that admits
    it only copies it into a slot. Asserted on the engine's own step timestamps."""
    engine = _engine(embedded_base, adapter_source, tmp_path, max_lora_rank=64)
    try:
        assert engine.submit(PROMPTS[0], "rand-0", GREEDY).result(60)[1].final  # rand-0 resident, op warm
        rows = [engine.submit(PROMPTS[i % 5], ("", "rand-0")[i % 2], LONG) for i in range(8)]
        while engine.steps < 30:
            time.sleep(0.005)
        submitted = time.monotonic()
        assert engine.submit(PROMPTS[3], "large", GREEDY).result(60)[1].final
        done, steps = time.monotonic(), engine.steps
        while engine.steps < steps + 20:
            time.sleep(0.005)
        for row in rows:
            row.cancel()
        log = list(engine.step_log)  # (end time, admitted, seconds placing adapters) per step
        gaps = [(b[0] - a[0], b[1], b[2]) for a, b in zip(log, log[1:]) if b[0] > a[0]]
        median = statistics.median(gap for gap, _, _ in gaps)
        during = [
            (gap, admitted, place)
            for (gap, admitted, place), (end, _, _) in zip(gaps, log[1:])
            if submitted <= end <= done
        ]
        assert engine.store.counts["disk_loads"] >= 2 and "large" in engine.store.resident()
        reading = [gap for gap, admitted, _ in during if not admitted]
        assert reading and max(reading) <= 2 * median, (max(reading), median)
        placing = [place for _, admitted, place in during if admitted]
        assert placing and max(placing) <= median, (placing, median)  # the slot copy: under one step
    finally:
        engine.shutdown(drain=False)


def test_the_host_tier_turns_a_slot_miss_into_a_copy(embedded_base, adapter_source, tmp_path):
    engine = _engine(embedded_base, adapter_source, tmp_path, max_loras=1)  # 2 slots for 3 adapters
    try:
        for _ in range(3):
            for adapter in ADAPTERS[:3]:
                assert engine.submit(PROMPTS[0], adapter, GREEDY).result(60)[1].final
        counts = engine.store.counts
        assert counts["disk_loads"] == 3 and counts["host_hits"] >= 6, counts
        assert set(engine.store.host_resident()) == set(ADAPTERS[:3])
    finally:
        engine.shutdown()
    tiny = _engine(embedded_base, adapter_source, tmp_path / "tiny", max_loras=1, host_adapter_bytes=1)
    try:  # a host tier too small for two adapters keeps only the newest: misses read the disk again
        for adapter in ADAPTERS[:3] * 2:
            assert tiny.submit(PROMPTS[0], adapter, GREEDY).result(60)[1].final
        assert tiny.store.counts["disk_loads"] == 6 and len(tiny.store.host_resident()) == 1
    finally:
        tiny.shutdown()
