"""The vLLM engine (issue #7): Engine's interface, with vLLM's AsyncLLM doing the batching and the LoRA math.

vLLM owns the KV cache, continuous batching and the Punica LoRA kernels. loraplex keeps what it
owns in the torch engine: the prompt contract, request checks, the error types, and the adapter
store (same validation, LRU, pins and hot swap). Store events become vLLM calls: a loaded adapter
version -> add_lora under a fresh integer ID; a retired or evicted version -> remove_lora once its
last request has left; pin -> pin_lora.

AsyncLLM is asyncio-bound (its output handler is a task on the loop that built it), so it lives on
a private event loop in one thread and submit() works from any thread or loop, like Engine.submit.
vLLM is imported inside functions: this module, and its pure helpers, import without vllm or a GPU.
See serving/engine/VLLM_API.md for every vLLM symbol used and its signature in vllm 0.33.0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import importlib.util
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from serving.engine.engine import Engine, EngineConfig, RequestStream, StreamEvent, checked_request
from serving.engine.sampling import SamplingParams
from serving.engine.store import AdapterStore, SlotLease
from serving.errors import (
    AdapterRejected, DeadlineExceeded, EngineStopped, InvalidRequest, NoFreeSlot, QueueFull,
)
from training.adapter_id import internal_name, validate_adapter_id
from training.errors import ConfigError

logger = logging.getLogger("loraplex.vllm")

INSTALL_HINT = "the vllm engine needs `pip install loraplex[vllm]` and a CUDA GPU"
# vllm/config/lora.py MaxLoRARanks: LoRAConfig refuses any other max_lora_rank
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vllm/sampling_params.py SamplingParams._verify_args: temperature must be in [0, 2]
VLLM_MAX_TEMPERATURE = 2.0
ADD_LORA_TIMEOUT_S = 300.0

# EngineConfig.quantization -> how vLLM loads the base.
QUANTIZATION_ARGS: dict[str, dict[str, Any]] = {
    # bitsandbytes left vLLM's tree before 0.33.0; the vllm-bnb-plugin package registers it again.
    # A 16-bit checkpoint is quantized in flight to NF4 + double quant (the training recipe's
    # scheme); a pre-quantized bnb checkpoint is read as is.
    "nf4": {"quantization": "bitsandbytes", "load_format": "bitsandbytes", "dtype": "bfloat16"},
    # An AWQ export: vLLM reads the scheme from its config.json (AutoAWQ "awq", or llm-compressor's
    # "compressed-tensors" as convert/ writes); naming one here would refuse the other.
    "awq": {"quantization": None, "dtype": "auto"},
    "bf16": {"quantization": None, "dtype": "bfloat16"},
}
# vLLM finish_reason (vllm/v1/engine/__init__.py FINISH_REASON_STRINGS) -> the torch engine's reasons
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled", "repetition": "stop"}


class VLLMUnavailable(ConfigError):
    """vLLM cannot run here: not installed, no bitsandbytes plugin for nf4, or no CUDA GPU."""


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def vllm_unavailable_reason(quantization: str) -> str | None:
    """Why the vllm engine cannot start on this machine, or None; checked before anything heavy loads."""
    if not _installed("vllm"):
        return "vllm is not installed"
    if quantization == "nf4" and not _installed("vllm_bnb_plugin"):
        return "vllm 0.33 serves bitsandbytes (nf4) only through the vllm-bnb-plugin package, which is missing"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


# -- pure translation: loraplex config and requests -> vLLM arguments ----------------------------

def vllm_lora_rank(max_rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that still fits `max_rank` (the store enforces ours)."""
    for rank in VLLM_LORA_RANKS:
        if rank >= max_rank:
            return rank
    raise ConfigError(f"max_lora_rank {max_rank} is above vLLM's largest, {VLLM_LORA_RANKS[-1]}")


def engine_args_kwargs(config: EngineConfig, base_dir: str | Path) -> dict[str, Any]:
    """AsyncEngineArgs(**kwargs) for this config; max_seq must already fit the model's positions."""
    if config.quantization not in QUANTIZATION_ARGS:
        raise InvalidRequest(f"unknown quantization {config.quantization!r}: use {', '.join(QUANTIZATION_ARGS)}")
    max_cpu_loras = config.max_cpu_loras or config.max_loras
    if max_cpu_loras < config.max_loras:
        raise ConfigError(f"max_cpu_loras ({max_cpu_loras}) must be >= max_loras ({config.max_loras})")
    return {
        "model": str(base_dir),
        "tokenizer": str(base_dir),
        **QUANTIZATION_ARGS[config.quantization],
        "enable_lora": True,
        "max_loras": config.max_loras,  # adapters in one batch (GPU slots)
        "max_cpu_loras": max_cpu_loras,
        "max_lora_rank": vllm_lora_rank(config.max_lora_rank),
        "max_model_len": config.max_seq,
        "max_num_seqs": config.max_batch,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "enforce_eager": config.enforce_eager,
        "seed": config.seed,
    }


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """vLLM SamplingParams kwargs for a validated request (output_kind is added where vllm is imported)."""
    if params.temperature > VLLM_MAX_TEMPERATURE:
        raise InvalidRequest(f"temperature must be <= {VLLM_MAX_TEMPERATURE} on the vllm engine, "
                             f"got {params.temperature}")
    return {
        "n": 1,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,  # 0: greedy, in vLLM as in the torch engine
        "top_p": params.top_p,
        "top_k": params.top_k,  # 0: no cut, in both
        "seed": params.seed,
        "stop": list(params.stop),
        "include_stop_str_in_output": False,  # the torch engine cuts the stop string too
        "ignore_eos": params.ignore_eos,
        "skip_special_tokens": True,  # as the torch engine decodes
    }


class LoraIdMap:
    """Adapter versions -> vLLM LoRA integer IDs: 1, 2, 3... in first-load order, stable for the process.

    vLLM caches a LoRA by its integer ID and compares LoRARequests by name, so every version of an
    adapter gets its own ID and name: after a hot swap, requests in flight finish on the old ID
    while new ones get the new weights. Names come from internal_name, never the raw tenant ID.
    """

    def __init__(self) -> None:
        self._ids: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def lora_id(self, adapter_id: str, version_id: str) -> int:
        key = (validate_adapter_id(adapter_id), version_id)
        with self._lock:
            return self._ids.setdefault(key, len(self._ids) + 1)

    def lora_name(self, adapter_id: str, version_id: str) -> str:
        return f"{internal_name(adapter_id)}-{self.lora_id(adapter_id, version_id)}"

    def lora_request_kwargs(self, adapter_id: str, version_id: str, path: str | Path) -> dict[str, Any]:
        """LoRARequest(**kwargs) for this version, read from `path`."""
        return {"lora_name": self.lora_name(adapter_id, version_id),
                "lora_int_id": self.lora_id(adapter_id, version_id), "lora_path": str(path)}


def base_module_shapes(base_dir: str | Path) -> dict[str, tuple[int, int]]:
    """{module path: (d_in, d_out)} of the decoder's linear layers, from config.json on the meta device.

    The store checks adapter tensors against these (the modules PEFT's all-linear targets), as the
    torch engine checks against its loaded model; the meta device allocates no memory.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: (module.in_features, module.out_features) for name, module in model.named_modules()
            if ".layers." in f".{name}" and isinstance(module, torch.nn.Linear)}


# -- the adapter lifecycle over vLLM ---------------------------------------------------------------

class EventLoopThread:
    """A private asyncio loop in a daemon thread: AsyncLLM lives here, whoever calls the engine."""

    def __init__(self, name: str = "loraplex-vllm") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine, timeout: float | None = None) -> Any:
        """Run on the loop and wait for the result; from the loop's own thread that would deadlock."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("EventLoopThread.run called from its own loop")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Coroutine) -> concurrent.futures.Future:
        """Start on the loop without waiting; a failure is logged."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        future.add_done_callback(_log_failure)
        return future

    def call_soon(self, callback: Callable, *args) -> None:
        self.loop.call_soon_threadsafe(callback, *args)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _log_failure(future: concurrent.futures.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("vLLM background call failed: %s", future.exception())


def _lora_request_class():
    from vllm.lora.request import LoRARequest

    return LoRARequest


class VLLMLoraSlots:
    """The adapter store's `slots`, backed by vLLM: a slot holds one registered LoRA version.

    vLLM reads an adapter from lora_path at add_lora, and again whenever a request brings back a
    LoRA its own CPU LRU dropped, so each registration points at a private copy of the exact bytes
    the store validated: replacing the store's folder (hot swap) never changes what an ID serves.
    """

    def __init__(self, llm, loop: EventLoopThread, n_slots: int, module_shapes: dict[str, tuple[int, int]],
                 max_loras: int, snapshot_root: str | Path, make_request: Callable[..., Any] | None = None) -> None:
        self.llm, self.loop = llm, loop
        self.n_slots, self.module_shapes = n_slots, module_shapes
        self.max_pins = max_loras - 1  # pin_lora also pins a GPU slot: keep one for everyone else
        self.ids = LoraIdMap()
        self.snapshot_root = Path(snapshot_root)
        self._make_request = make_request or _lora_request_class()
        self._held: dict[int, dict[str, Any]] = {}  # slot -> LoRARequest kwargs

    def register(self, slot: int, adapter_id: str, version_id: str, files: dict[str, bytes]) -> None:
        """Snapshot the validated files and add_lora them; vLLM's refusal becomes AdapterRejected."""
        name = self.ids.lora_name(adapter_id, version_id)
        folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.snapshot_root))
        for filename, data in files.items():
            (folder / filename).write_bytes(data)
        kwargs = self.ids.lora_request_kwargs(adapter_id, version_id, folder)
        try:
            added, reason = self.loop.run(self.llm.add_lora(self._make_request(**kwargs)), ADD_LORA_TIMEOUT_S), ""
        except Exception as exc:  # vLLM reports a refused adapter as a bare Exception(message)
            added, reason = False, f": {exc}"
        if not added:
            shutil.rmtree(folder, ignore_errors=True)
            raise AdapterRejected(f"adapter '{adapter_id}' was refused by vLLM{reason}")
        self._held[slot] = kwargs

    def request(self, slot: int):
        """The LoRARequest a request on this slot carries into generate()."""
        return self._make_request(**self._held[slot])

    def pin(self, slot: int, pinned: bool) -> None:
        """vLLM 0.33 has pin_lora but no unpin: unpinning re-registers the same ID."""
        self.loop.run(self._pin(self._held[slot], pinned), ADD_LORA_TIMEOUT_S)

    async def _pin(self, kwargs: dict[str, Any], pinned: bool) -> None:
        if pinned:
            await self.llm.add_lora(self._make_request(**kwargs))  # vLLM's own LRU may have dropped it
            await self.llm.pin_lora(kwargs["lora_int_id"])
        else:
            await self.llm.remove_lora(kwargs["lora_int_id"])
            await self.llm.add_lora(self._make_request(**kwargs))

    def clear_slot(self, slot: int) -> None:
        """The store is done with this version; never blocks, since it can run on the engine's loop."""
        kwargs = self._held.pop(slot, None)
        if kwargs is not None:
            shared = any(k["lora_int_id"] == kwargs["lora_int_id"] for k in self._held.values())
            self.loop.spawn(self._remove(kwargs, keep_registered=shared))

    async def _remove(self, kwargs: dict[str, Any], keep_registered: bool) -> None:
        try:
            if not keep_registered:
                await self.llm.remove_lora(kwargs["lora_int_id"])
        finally:
            shutil.rmtree(kwargs["lora_path"], ignore_errors=True)


class VLLMAdapterStore(AdapterStore):
    """The torch engine's store (same checks, LRU, pins, hot swap) with vLLM LoRA IDs for slots."""

    def _place(self, slot: int, adapter_id: str, version_id: str, config: dict, weights: dict,
               files: dict[str, bytes]) -> None:
        """The validated bytes go to vLLM (add_lora), not into tensors."""
        self.slots.register(slot, adapter_id, version_id, files)
        if adapter_id in self.pinned:  # a new version of a pinned adapter is pinned in vLLM too
            self.slots.pin(slot, True)

    def pin(self, adapter_id: str, pinned: bool = True) -> SlotLease | None:
        """As AdapterStore.pin; in vLLM a pinned adapter also holds a GPU slot, so one stays unpinned."""
        validate_adapter_id(adapter_id)
        with self._lock:
            was_pinned = adapter_id in self.pinned
            if pinned and not was_pinned and len(self.pinned) >= self.slots.max_pins:
                raise NoFreeSlot(f"at most {self.slots.max_pins} adapters can be pinned on the vllm engine "
                                 "(max_loras - 1: vLLM keeps each pinned adapter in a GPU slot)")
            lease = super().pin(adapter_id, pinned)
            if lease is not None and pinned != was_pinned:
                self.slots.pin(lease.slot, pinned)
            return lease


# -- the engine ------------------------------------------------------------------------------------

@dataclass
class _Flight:
    """One request between submit() and its final event."""

    request_id: str
    adapter_id: str
    prompt_ids: list[int]
    sampling: Any  # vllm.SamplingParams
    stream: RequestStream
    deadline: float | None
    submitted: float = field(default_factory=time.monotonic)
    task: asyncio.Task | None = None
    lease: SlotLease | None = None
    generating: bool = False  # inside AsyncLLM.generate: a cancel now cancels the task
    sent: bool = False  # handed to AsyncLLM.generate at some point
    cancelled: bool = False
    tokens: int = 0
    first_token_at: float | None = None


async def _start_async_llm(kwargs: dict[str, Any]):
    """Built on the engine's loop: AsyncLLM starts its output handler on the loop it is created in."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))


def as_loraplex_error(exc: BaseException) -> BaseException:
    """vLLM's request errors as the torch engine's types, so serving/errors.py stays the one table."""
    from vllm.exceptions import MaxQueuedTokensError, QueueOverflowError, VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, (QueueOverflowError, MaxQueuedTokensError)):
        return QueueFull(str(exc))
    if isinstance(exc, VLLMClientError):
        return InvalidRequest(str(exc))
    if isinstance(exc, EngineDeadError):
        return EngineStopped(f"the vLLM engine died: {exc}")
    return exc


class VLLMEngine:
    """Engine's public surface (submit, encode, check_fits, cancel, stats, shutdown, tokenizer, store)."""

    # the prompt contract and the context check are the torch engine's own (they use tokenizer, max_seq)
    encode = Engine.encode
    check_fits = Engine.check_fits

    def __init__(self, config: EngineConfig, metrics=None) -> None:
        reason = vllm_unavailable_reason(config.quantization)
        if reason:
            raise VLLMUnavailable(f"{INSTALL_HINT}: {reason}")
        from transformers import AutoTokenizer

        from training.base import ensure_base
        from training.manifest import base_fingerprint

        self.config, self.metrics = config, metrics
        base_dir = Path(config.base_model) if config.base_model else ensure_base()
        hf_config = json.loads((base_dir / "config.json").read_text())
        if config.quantization == "awq" and "quantization_config" not in hf_config:
            raise ConfigError(f"quantization awq needs an AWQ export; {base_dir} has no quantization_config")
        self.base_dir = base_dir
        self.base_fingerprint = base_fingerprint(config.adapter_base or base_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        self.max_seq = min(config.max_seq, hf_config.get("max_position_embeddings", config.max_seq))
        kwargs = engine_args_kwargs(dataclasses.replace(config, max_seq=self.max_seq), base_dir)

        self._loop = EventLoopThread()
        try:
            self.llm = self._loop.run(_start_async_llm(kwargs))
        except Exception:
            self._loop.stop()
            raise
        self._snapshots = Path(tempfile.mkdtemp(prefix="loraplex-vllm-loras-"))
        cpu_loras = kwargs["max_cpu_loras"]
        self.loras = VLLMLoraSlots(self.llm, self._loop, cpu_loras + 2, base_module_shapes(base_dir),
                                   config.max_loras, self._snapshots)  # +2: slot 0 unused, room for a hot swap
        self.store = VLLMAdapterStore(config.adapters or base_dir / "_no_adapters", self.loras,
                                      self.base_fingerprint, config.max_lora_rank, metrics=metrics)
        self._flights: dict[str, _Flight] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self.outputs_received = 0  # vLLM deltas read; stats() reports it as "steps"

    # -- the caller's side ---------------------------------------------------------------------

    def submit(self, prompt: str | list[int], adapter_id: str = "", params: SamplingParams | None = None,
               request_id: str | None = None, timeout: float | None = None) -> RequestStream:
        """Queue a request; errors in the request itself raise here, before anything runs."""
        prompt_ids, params = checked_request(self, prompt, adapter_id, params)
        sampling = self._vllm_sampling(params)
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(self, request_id, adapter_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        flight = _Flight(request_id, adapter_id, prompt_ids, sampling, stream, deadline)
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            # vLLM runs max_batch at once and queues the rest: max_queue is the torch engine's waiting room
            if len(self._flights) >= self.config.max_queue + self.config.max_batch:
                raise QueueFull(f"request queue is full ({self.config.max_queue} waiting)")
            if request_id in self._flights:
                raise InvalidRequest(f"request ID {request_id!r} is already running")
            self._flights[request_id] = flight
        self._loop.spawn(self._run(flight))
        if self.metrics:
            self.metrics.queue_depth(max(0, len(self._flights) - self.config.max_batch))
        return stream

    def _vllm_sampling(self, params: SamplingParams):
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind

        try:  # DELTA: each RequestOutput carries only the new text and tokens, as StreamEvents do
            return VLLMSamplingParams(**sampling_kwargs(params), output_kind=RequestOutputKind.DELTA)
        except VLLMValidationError as exc:
            raise InvalidRequest(str(exc)) from None

    def cancel(self, request_id: str) -> None:
        with self._cond:
            flight = self._flights.get(request_id)
        if flight is not None:
            self._loop.call_soon(self._cancel_on_loop, flight)

    def stats(self) -> dict:
        """The torch engine's keys: running = inside vLLM (it schedules max_batch of them at a time)."""
        with self._cond:
            running = sum(f.generating for f in self._flights.values())
            return {"waiting": len(self._flights) - running, "running": running,
                    "free_rows": max(0, self.config.max_batch - running), "steps": self.outputs_received}

    def shutdown(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop taking requests; with drain, let the ones in flight finish first."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            flights = list(self._flights.values())
        if not drain:
            for flight in flights:
                self.cancel(flight.request_id)
        with self._cond:
            self._cond.wait_for(lambda: not self._flights, timeout)
        self.llm.shutdown()
        self._loop.stop()
        shutil.rmtree(self._snapshots, ignore_errors=True)

    # -- the engine loop -------------------------------------------------------------------------

    def _cancel_on_loop(self, flight: _Flight) -> None:
        flight.cancelled = True
        if flight.generating and flight.task is not None:
            flight.task.cancel()  # AsyncLLM.generate catches it and aborts the request in vLLM

    async def _run(self, flight: _Flight) -> None:
        """One request: lease its adapter, stream vLLM's deltas, always end with one final event."""
        flight.task = asyncio.current_task()
        reason, error = "error", None
        try:
            flight.lease = await self._lease(flight)
            reason = "cancelled" if flight.cancelled else await self._generate(flight)
        except asyncio.CancelledError:
            reason = "cancelled"
        except TimeoutError:
            error = DeadlineExceeded(f"request {flight.request_id} ran past its deadline")
        except Exception as exc:
            error = as_loraplex_error(exc)
        finally:
            if flight.sent and (reason == "cancelled" or isinstance(error, DeadlineExceeded)):
                # generate() aborts by vLLM's internal ID; this also catches a request cancelled
                # while generate() was still handing it to the engine core
                await self._quietly(self.llm.abort(flight.request_id))
            if flight.lease is not None:
                await asyncio.to_thread(self.store.release, flight.lease)  # the store lock is never taken on this loop
            self._finish(flight, reason, error)

    async def _lease(self, flight: _Flight) -> SlotLease | None:
        """The adapter's lease (None for the base), waiting while every slot is pinned or busy."""
        while flight.adapter_id:
            try:
                return await asyncio.to_thread(self.store.acquire, flight.adapter_id)
            except NoFreeSlot:
                if flight.cancelled:
                    raise asyncio.CancelledError from None
                if flight.deadline is not None and time.monotonic() > flight.deadline:
                    raise TimeoutError from None
                await asyncio.sleep(0.05)
        return None

    async def _generate(self, flight: _Flight) -> str:
        from vllm.inputs import TokensPrompt

        lora = self.loras.request(flight.lease.slot) if flight.lease else None
        flight.generating = flight.sent = True  # same loop step as the cancel check: a cancel now cancels the task
        left = None if flight.deadline is None else max(0.0, flight.deadline - time.monotonic())
        reason = "stop"
        try:
            async with asyncio.timeout(left):
                async for output in self.llm.generate(TokensPrompt(prompt_token_ids=flight.prompt_ids),
                                                      flight.sampling, flight.request_id, lora_request=lora):
                    delta = output.outputs[0]
                    self.outputs_received += 1
                    flight.tokens += len(delta.token_ids)
                    if delta.text:
                        flight.first_token_at = flight.first_token_at or time.monotonic()
                        flight.stream.push(StreamEvent(text=delta.text))
                    if output.finished:
                        reason = FINISH_REASONS.get(delta.finish_reason, "error")
        finally:
            flight.generating = False  # a late cancel must not interrupt the release and the final event
        if reason == "error":
            raise RuntimeError(f"vLLM failed request {flight.request_id} (finish_reason=error)")
        return reason

    @staticmethod
    async def _quietly(coro: Coroutine) -> None:
        try:
            await coro
        except Exception:
            logger.exception("vLLM abort failed")

    def _finish(self, flight: _Flight, reason: str, error: BaseException | None) -> None:
        if isinstance(error, DeadlineExceeded):
            reason = "deadline"
        with self._cond:
            self._flights.pop(flight.request_id, None)
            self._cond.notify_all()
        flight.stream.push(StreamEvent(
            final=True, finish_reason=reason, prompt_tokens=len(flight.prompt_ids),
            completion_tokens=flight.tokens, error=error,
            adapter_version=flight.lease.version_id if flight.lease else "",
        ))
        if self.metrics:
            self.metrics.request_finished(
                flight.adapter_id, reason, error, len(flight.prompt_ids), flight.tokens,
                time.monotonic() - flight.submitted,
                None if flight.first_token_at is None else flight.first_token_at - flight.submitted,
            )
