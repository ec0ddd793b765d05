"""The in-process engine: one NF4 base, many adapters, continuous (iteration-level) batching.

A background thread repeats one iteration: admit waiting requests into free cache rows
(prefilled together), then decode one token for every running request in a single batch,
whatever their adapters. Finished and cancelled requests leave at once. Usable without Ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from serving.engine.lora_batch import LoraSlots
from serving.engine.runner import KVCacheRunner
from serving.engine.sampling import SamplingParams, sample_next
from serving.engine.store import AdapterStore, SlotLease
from serving.errors import DeadlineExceeded, EngineStopped, InvalidRequest, NoFreeSlot, QueueFull
from training.adapter_id import validate_adapter_id
from training.errors import LoraplexError

logger = logging.getLogger("loraplex.engine")


@dataclass(frozen=True)
class EngineConfig:
    base_model: str | None = field(default=None, metadata={"help": "HF checkpoint; default: the embedded base"})
    adapters: str | None = field(default=None, metadata={"help": "adapter store root: <dir>/<adapter_id>/"})
    quantization: str = field(default="nf4", metadata={
        "help": "nf4 (bitsandbytes, as in training), bf16, or awq (vllm engine: a convert AWQ export)"})
    max_batch: int = field(default=16, metadata={"help": "requests decoded together (KV-cache rows)"})
    max_loras: int = field(default=8, metadata={"help": "adapters resident at once (LRU beyond that)"})
    max_lora_rank: int = field(default=64, metadata={"help": "largest adapter rank accepted"})
    max_seq: int = field(default=256, metadata={"help": "context length: prompt + new tokens"})
    max_queue: int = field(default=256, metadata={"help": "waiting requests before RESOURCE_EXHAUSTED"})
    max_new_tokens: int = field(default=256, metadata={"help": "cap on max_tokens per request"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda; default: cuda when present"})
    engine: str = field(default="torch", metadata={"help": "torch (this engine, CPU or GPU) or vllm (CUDA)",
                                                   "choices": ["torch", "vllm"]})
    # vLLM engine only (see serving/engine/vllm_engine.py)
    max_cpu_loras: int | None = field(default=None, metadata={"help": "vllm: adapters kept in CPU memory"})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vllm: share of GPU memory"})
    enforce_eager: bool = field(default=False, metadata={"help": "vllm: skip CUDA graphs"})
    seed: int = field(default=0, metadata={"help": "vllm: engine seed"})
    adapter_base: str | None = field(default=None, metadata={
        "help": "checkpoint the adapters were trained on, when the served base differs (an AWQ export)"})


@dataclass
class StreamEvent:
    """One chunk of output; the last event of a request has final=True."""

    text: str = ""
    final: bool = False
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: BaseException | None = None
    adapter_version: str = ""  # which on-disk version of the adapter answered


class RequestStream:
    """The caller's side of a request: iterate (sync or async) over StreamEvents, or cancel."""

    def __init__(self, engine: "Engine", request_id: str, adapter_id: str) -> None:
        self.engine, self.request_id, self.adapter_id = engine, request_id, adapter_id
        try:
            self._loop = asyncio.get_running_loop()
            self._events: asyncio.Queue | queue.Queue = asyncio.Queue()
        except RuntimeError:
            self._loop, self._events = None, queue.Queue()

    def push(self, event: StreamEvent) -> None:  # called from the engine thread
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        else:
            self._events.put(event)

    def cancel(self) -> None:
        self.engine.cancel(self.request_id)

    def __iter__(self):
        while True:
            event = self._events.get()
            yield event
            if event.final:
                return

    async def __aiter__(self):
        while True:
            event = await self._events.get()
            yield event
            if event.final:
                return

    def result(self, timeout: float | None = None) -> tuple[str, StreamEvent]:
        """Block for the whole text; raises the request's error, if any."""
        text, deadline = [], None if timeout is None else time.monotonic() + timeout
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            event = self._events.get(timeout=wait)
            text.append(event.text)
            if event.final:
                if event.error is not None:
                    raise event.error
                return "".join(text), event


@dataclass
class _Request:
    request_id: str
    adapter_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    deadline: float | None
    submitted: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None
    lease: SlotLease | None = None
    row: int = -1
    length: int = 0  # tokens in this request's cache row
    generated: list[int] = field(default_factory=list)
    sent: str = ""
    first_token_at: float | None = None
    cancelled: bool = False
    cancel_step: int = 0  # the engine's decode step when cancel() arrived


def checked_request(engine, prompt: str | list[int], adapter_id: str,
                    params: SamplingParams | None) -> tuple[list[int], SamplingParams]:
    """The checks every engine runs before queueing: adapter ID, prompt, sampling, context."""
    params = params or SamplingParams()
    if adapter_id:
        validate_adapter_id(adapter_id)
    prompt_ids = prompt if isinstance(prompt, list) else engine.encode(prompt)
    if params.max_tokens is None:
        room = min(engine.config.max_new_tokens, engine.max_seq - len(prompt_ids))
        params = dataclasses.replace(params, max_tokens=max(room, 1))
    params.validate(engine.config.max_new_tokens)
    engine.check_fits(len(prompt_ids), params.max_tokens)
    return prompt_ids, params


def create_engine(config: EngineConfig, metrics=None):
    """The engine the config names; both have the same surface (submit, store, stats, shutdown)."""
    if config.engine == "vllm":
        from serving.engine.vllm_engine import VLLMEngine

        return VLLMEngine(config, metrics=metrics)
    if config.engine != "torch":
        raise InvalidRequest(f"unknown engine {config.engine!r}: use torch or vllm")
    return Engine(config, metrics=metrics)


class Engine:
    def __init__(self, config: EngineConfig, metrics=None) -> None:
        from transformers import AutoTokenizer

        from training.base import ensure_base
        from training.manifest import base_fingerprint
        from training.quant import default_device

        self.config = config
        self.metrics = metrics
        base_dir = Path(config.base_model) if config.base_model else ensure_base()
        device = config.device or default_device()
        self.base_dir, self.base_fingerprint = base_dir, base_fingerprint(base_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        if config.quantization not in ("nf4", "bf16"):
            raise InvalidRequest(f"unknown quantization {config.quantization!r}: use nf4 or bf16")
        # GPU kernels (cuBLAS, bitsandbytes) pick their reduction order by matrix shape, so a
        # request's greedy output could change with the batch around it. On CUDA every forward
        # has a fixed shape: one prefill per request, and decode padded to max_batch rows over
        # the whole cache. CPU kernels here are row-invariant already, so CPU skips the padding.
        self.fixed_shapes = torch.device(device).type == "cuda"
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []  # a request's index here is its LoRA batch position
        self._free_rows = list(range(config.max_batch - 1, -1, -1))
        self._by_id: dict[str, _Request] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self.steps = 0  # decode iterations run: tests and metrics read it
        # how fast a cancel frees its batch row, in decode steps (the bar: at most one)
        self.cancelled, self.max_cancel_lag_steps = 0, 0
        # One thread loads the model and runs every forward. libgomp gives each thread that
        # runs parallel torch ops its own worker pool; two pools on a small machine throttle
        # each other (every op pays a futex wake-up: 4-14x slower small matmuls, measured here).
        self._ready, self._load_error = threading.Event(), None
        self._thread = threading.Thread(target=self._run, args=(device,), name="loraplex-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def _load(self, device: str) -> None:
        from training.quant import load_dense_base, load_nf4_base

        config, base_dir = self.config, self.base_dir
        if config.quantization == "nf4":
            model = load_nf4_base(base_dir, device)
        else:
            model = load_dense_base(base_dir, torch.bfloat16, device)
        model.eval()
        self.model = model
        self.max_seq = min(config.max_seq, model.config.max_position_embeddings)
        # +1 slot: room for a hot swap while the old version finishes its requests
        self.slots = LoraSlots(model, config.max_loras + 1, config.max_lora_rank, config.max_batch)
        self.runner = KVCacheRunner(model, self.slots, config.max_batch, self.max_seq)
        self.store = AdapterStore(config.adapters or base_dir / "_no_adapters", self.slots,
                                  self.base_fingerprint, config.max_lora_rank, metrics=self.metrics)
        self.eos_ids = {self.tokenizer.eos_token_id, model.config.eos_token_id} - {None}

    def _run(self, device: str) -> None:
        try:
            self._load(device)
        except BaseException as exc:  # surfaces in __init__, in the caller's thread
            self._load_error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop()

    # -- the caller's side ---------------------------------------------------------------------

    def submit(self, prompt: str | list[int], adapter_id: str = "", params: SamplingParams | None = None,
               request_id: str | None = None, timeout: float | None = None) -> RequestStream:
        """Queue a request; errors in the request itself raise here, before anything runs."""
        prompt_ids, params = checked_request(self, prompt, adapter_id, params)
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(self, request_id, adapter_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        request = _Request(request_id, adapter_id, prompt_ids, params, stream, deadline, generator=generator)
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFull(f"request queue is full ({self.config.max_queue} waiting)")
            if request_id in self._by_id:
                raise InvalidRequest(f"request ID {request_id!r} is already running")
            self._waiting.append(request)
            self._by_id[request_id] = request
            self._cond.notify()
        if self.metrics:
            self.metrics.queue_depth(len(self._waiting))
        return stream

    def encode(self, prompt: str) -> list[int]:
        """The prompt contract: prompt text verbatim, the tokenizer's BOS in front."""
        from training.data import encode_prompt

        if not prompt:
            raise InvalidRequest("prompt is empty")
        try:
            return encode_prompt(self.tokenizer, prompt)
        except Exception as exc:  # e.g. lone surrogates from JSON "\ud800"
            raise InvalidRequest(f"prompt cannot be tokenized: {type(exc).__name__}: {exc}"[:300]) from None

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens == 0:
            raise InvalidRequest("prompt is empty")
        if prompt_tokens + max_tokens > self.max_seq:
            raise InvalidRequest(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds "
                                 f"the context of {self.max_seq} tokens")

    def cancel(self, request_id: str) -> None:
        with self._cond:
            request = self._by_id.get(request_id)
            if request is not None and not request.cancelled:
                request.cancelled, request.cancel_step = True, self.steps
                self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            return {"waiting": len(self._waiting), "running": len(self._running),
                    "free_rows": len(self._free_rows), "steps": self.steps, "cancelled": self.cancelled,
                    "max_cancel_lag_steps": self.max_cancel_lag_steps}

    def shutdown(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop taking requests; with drain, let the ones in flight finish first."""
        with self._cond:
            self._stopping = True
            if not drain:
                for request in list(self._waiting) + self._running:
                    request.cancelled = True
            self._cond.notify()
        self._thread.join(timeout)

    # -- the engine thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._running or self._stopping):
                    self._cond.wait()
                if self._stopping and not (self._waiting or self._running):
                    return
            try:
                self._drop_cancelled()
                self._admit()
                if self._running:
                    self._decode_step()
            except Exception as exc:  # a bug must fail the requests in flight, never hang them
                logger.exception("engine step failed; failing the requests in flight")
                with self._cond:
                    in_flight = list(self._running)
                for request in in_flight:
                    try:
                        self._finish(request, "error", exc)
                    except Exception:  # keep failing the others; the loop must survive
                        logger.exception("could not fail request %s", request.request_id)

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        with self._cond:
            candidates = list(self._waiting) + self._running
        for request in candidates:
            if request.cancelled:
                self._finish(request, "cancelled")
            elif request.deadline is not None and now > request.deadline:
                self._finish(request, "deadline", DeadlineExceeded(f"request {request.request_id} ran past its deadline"))

    def _admit(self) -> None:
        admitted = []
        while True:
            with self._cond:
                if not self._waiting or not self._free_rows:
                    break
                request = self._waiting[0]
            try:
                request.lease = self.store.acquire(request.adapter_id) if request.adapter_id else None
            except NoFreeSlot:
                break  # wait for a running request to release its adapter
            except LoraplexError as exc:
                self._finish(request, "error", exc)
                continue
            with self._cond:
                self._waiting.popleft()
                request.row = self._free_rows.pop()
                self._running.append(request)
            admitted.append(request)
        if admitted and self.fixed_shapes:
            for request in admitted:
                self._prefill([request])
        elif admitted:
            self._prefill(admitted)

    def _prefill(self, requests: list[_Request]) -> None:
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.zeros(len(requests), width, dtype=torch.long)
        for i, request in enumerate(requests):
            ids[i, : len(request.prompt_ids)] = torch.tensor(request.prompt_ids)
        positions = torch.arange(width).repeat(len(requests), 1)
        last = torch.tensor([len(r.prompt_ids) - 1 for r in requests])
        logits = self._forward(requests, ids, positions, last)
        for request in requests:
            request.length = len(request.prompt_ids)
        self._accept_tokens(requests, logits)

    def _decode_step(self) -> None:
        requests = list(self._running)
        ids = torch.tensor([[r.generated[-1]] for r in requests])
        positions = torch.tensor([[r.length] for r in requests])
        logits = self._forward(requests, ids, positions, torch.zeros(len(requests), dtype=torch.long),
                               pad=self.fixed_shapes)
        for request in requests:
            request.length += 1
        self.steps += 1
        if self.metrics:
            self.metrics.batch_size(len(requests))
        self._accept_tokens(requests, logits)

    def _forward(self, requests: list[_Request], ids, positions, last, pad: bool = False) -> torch.Tensor:
        """requests: all running ones (decode) or a contiguous run of them (prefill).

        pad: fill the batch up to max_batch rows with dummies in free cache rows (fixed shapes).
        """
        device = self.runner.k_cache.device
        start = self._running.index(requests[0])
        slots = [r.lease.slot if r.lease else 0 for r in self._running]
        rows = [r.row for r in requests]
        n, span = len(requests), None
        if pad:
            extra = self.config.max_batch - n
            rows += self._free_rows[:extra]
            slots += [0] * extra
            ids, positions = F.pad(ids, (0, 0, 0, extra)), F.pad(positions, (0, 0, 0, extra))
            last, span = F.pad(last, (0, extra)), self.max_seq
        self.slots.use(slots)
        rows = torch.tensor(rows, device=device)
        logits = self.runner(ids.to(device), positions.to(device), rows, last.to(device), start, span)
        return logits[:n].cpu()

    def _accept_tokens(self, requests: list[_Request], logits: torch.Tensor) -> None:
        now = time.monotonic()
        for request, row_logits in zip(requests, logits):
            try:
                token = sample_next(row_logits, request.params, request.generator)
            except Exception as exc:  # one request's sampling fails alone, never the batch
                logger.exception("sampling failed for request %s", request.request_id)
                self._finish(request, "error", exc)
                continue
            if request.first_token_at is None:
                request.first_token_at = now
            if token in self.eos_ids and not request.params.ignore_eos:
                self._emit(request, self.tokenizer.decode(request.generated, skip_special_tokens=True))
                self._finish(request, "stop")
                continue
            request.generated.append(token)
            text = self.tokenizer.decode(request.generated, skip_special_tokens=True)
            stop_at = request.params.find_stop(text)
            if stop_at is not None:
                self._emit(request, text[:stop_at])
                self._finish(request, "stop")
            elif len(request.generated) >= request.params.max_tokens or request.length + 1 >= self.max_seq:
                self._emit(request, text)
                self._finish(request, "length")
            else:
                self._emit(request, text, hold=request.params.longest_stop - 1)

    def _emit(self, request: _Request, text: str, hold: int = 0) -> None:
        """Send the new part of the text, holding back a possible partial stop string or UTF-8 char."""
        ready = text[: len(text) - hold] if hold > 0 else text
        if ready.endswith("\ufffd"):
            return
        if len(ready) > len(request.sent):
            request.stream.push(StreamEvent(text=ready[len(request.sent):]))
            request.sent = ready

    def _finish(self, request: _Request, reason: str, error: BaseException | None = None) -> None:
        with self._cond:
            if self._by_id.pop(request.request_id, None) is None:
                return  # already finished
            if request in self._running:
                # the last request takes the free batch position: only one position changes
                index = self._running.index(request)
                last = self._running.pop()
                if last is not request:
                    self._running[index] = last
                self._free_rows.append(request.row)
            elif request in self._waiting:
                self._waiting.remove(request)
            if reason == "cancelled":
                self.cancelled += 1
                self.max_cancel_lag_steps = max(self.max_cancel_lag_steps, self.steps - request.cancel_step)
        if request.lease is not None:
            self.store.release(request.lease)
        request.stream.push(StreamEvent(
            final=True, finish_reason=reason, prompt_tokens=len(request.prompt_ids),
            completion_tokens=len(request.generated), error=error,
            adapter_version=request.lease.version_id if request.lease else "",
        ))
        if self.metrics:
            self.metrics.request_finished(
                request.adapter_id, reason, error, len(request.prompt_ids), len(request.generated),
                time.monotonic() - request.submitted,
                None if request.first_token_at is None else request.first_token_at - request.submitted,
            )
