"""The in-process engine: one NF4 base, many adapters, continuous (iteration-level) batching.

A background thread repeats one iteration: admit waiting requests into free cache rows
(prefilled together), then decode one token for every running request in a single batch,
whatever their adapters. Finished and cancelled requests leave at once. Usable without Ray.

Admission never stalls the batch: an adapter that is not in host memory is read and validated
on a loader thread (store.prepare) while decoding goes on; a request waiting for it, or for a
free slot, does not hold up the requests behind it. Waiting requests are taken round-robin over
adapters, and one adapter holds at most max_rows_per_adapter rows while others wait.

Over 400 lines: one class whose methods share the engine thread's state (queue, batch, cache
rows, leases); its pure parts live in admission, prefill, sampling and detokenize.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from loraplex.serving.engine.admission import AdapterLoader, round_robin
from loraplex.serving.engine.api import (
    EngineConfig,
    RequestBook,
    RequestStream,
    TrackedRequest,
    encode_prompt_text,
    require_base_dir,
)
from loraplex.serving.engine.detokenize import StopDetokenizer
from loraplex.serving.engine.logits import LogitsProcessor
from loraplex.serving.engine.logprobs import TokenEvent, TokenLogprob, prompt_logprobs, token_logprob
from loraplex.serving.engine.lora_batch import LoraSlots
from loraplex.serving.engine.prefill import PrefillGroup, prefill_groups
from loraplex.serving.engine.runner import KVCacheRunner
from loraplex.serving.engine.sampling import SamplingParams, sample_next
from loraplex.serving.engine.store import AdapterStore
from loraplex.serving.errors import DeadlineExceeded, InvalidRequest, NoFreeSlot
from loraplex.training.errors import ConfigError, LoraplexError

ADAPTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

logger = logging.getLogger("loraplex.engine")


@dataclass(eq=False)
class _Request(TrackedRequest):
    generator: torch.Generator | None = None
    row: int = -1
    length: int = 0  # tokens in this request's cache row
    generated: list[int] = field(default_factory=list)
    cancel_step: int = 0  # the engine's decode step when cancel() arrived
    detok: StopDetokenizer | None = None
    processor: LogitsProcessor | None = None  # penalties, bias, min_tokens, grammar (when asked for)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet sent


class TorchEngine:
    """The in-process engine (module docstring); satisfies api.Engine."""

    def __init__(self, config: EngineConfig, metrics=None) -> None:
        from transformers import AutoTokenizer

        from loraplex.training.manifest import base_fingerprint
        from loraplex.training.quant import default_device

        self.config = config
        self.metrics = metrics
        base_dir = require_base_dir(config)
        device = config.device or default_device()
        self.base_dir, self.base_fingerprint = base_dir, base_fingerprint(base_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        if config.quantization not in ("nf4", "bf16"):
            raise InvalidRequest(f"unknown quantization {config.quantization!r}: use nf4 or bf16")
        if config.adapter_dtype not in ADAPTER_DTYPES:
            raise ConfigError(f"adapter_dtype {config.adapter_dtype!r}: use {' or '.join(ADAPTER_DTYPES)}")
        self.rows_per_adapter = config.max_rows_per_adapter or max(1, config.max_batch // 2)
        # GPU kernels (cuBLAS, bitsandbytes) pick their reduction order by matrix shape, so a
        # request's greedy output could change with the batch around it. On CUDA every forward
        # has a fixed shape: one prefill per request, and decode padded to max_batch rows over
        # the whole cache. CPU kernels here are row-invariant already, so CPU skips the padding.
        self.fixed_shapes = torch.device(device).type == "cuda"
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []  # a request's index here is its LoRA batch position
        self._free_rows = list(range(config.max_batch - 1, -1, -1))
        self.book = RequestBook(self, metrics)
        self._cond = self.book.cond  # guards the queue, the batch and the book together
        self.steps = 0  # decode iterations run: tests and metrics read it
        # (end time, requests admitted, seconds spent placing adapters into slots) per decode step
        self.step_log: deque[tuple[float, int, float]] = deque(maxlen=4096)
        self._wake = False  # something changed that may let a waiting request in
        self._last_adapter = None  # round-robin position: the adapter admitted last
        self._admitted_now, self._placing_s = 0, 0.0  # this iteration's, for step_log
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
        from loraplex.training.architectures import require_torch_engine_architecture
        from loraplex.training.quant import load_dense_base, load_nf4_base

        config, base_dir = self.config, self.base_dir
        require_torch_engine_architecture(base_dir)  # before loading: others would run, wrongly
        if config.quantization == "nf4":
            model = load_nf4_base(base_dir, device)
        else:
            model = load_dense_base(base_dir, torch.bfloat16, device)
        model.eval()
        self.model = model
        self.max_seq = min(config.max_seq, model.config.max_position_embeddings)
        # +1 slot: room for a hot swap while the old version finishes its requests
        self.slots = LoraSlots(
            model, config.max_loras + 1, config.max_lora_rank, config.max_batch, ADAPTER_DTYPES[config.adapter_dtype]
        )
        self.runner = KVCacheRunner(model, self.slots, config.max_batch, self.max_seq)
        self.store = AdapterStore(
            config.adapters or base_dir / "_no_adapters",
            self.slots,
            self.base_fingerprint,
            config.max_lora_rank,
            metrics=self.metrics,
            host_bytes=config.host_adapter_bytes,
        )
        self.loader = AdapterLoader(self.store, self._loaded)
        self.eos_ids = {self.tokenizer.eos_token_id, model.config.eos_token_id} - {None}
        self.vocab_size = model.config.vocab_size
        self._grammars = None  # GrammarCompiler, made on the first response_format request

    def _run(self, device: str) -> None:
        # OpenMP's thread count is per calling thread, and a Ray actor without num_cpus starts
        # with OMP_NUM_THREADS=1: set here, in the thread that runs every forward.
        torch.set_num_threads(self.config.threads or len(os.sched_getaffinity(0)))
        self.threads = torch.get_num_threads()
        try:
            self._load(device)
        except BaseException as exc:  # surfaces in __init__, in the caller's thread
            self._load_error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop()

    # -- the caller's side ---------------------------------------------------------------------

    def submit(
        self,
        prompt: str | list[int],
        adapter_id: str = "",
        params: SamplingParams | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> RequestStream:
        """Queue a request; errors in the request itself raise here, before anything runs."""
        capacity = self.config.max_queue + len(self._running)
        params = params or SamplingParams()
        if isinstance(prompt, list) and not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            raise InvalidRequest(f"prompt token IDs must be in [0, {self.vocab_size})")
        params.check_token_ids(self.vocab_size)
        grammar = self._grammar(params.response_format) if params.response_format else None
        request = self.book.track(prompt, adapter_id, params, request_id, timeout, capacity, make=_Request)
        params = request.params
        if params.seed is not None:
            request.generator = torch.Generator().manual_seed(params.seed)
        request.detok = StopDetokenizer(self.tokenizer, params)
        if params.needs_processing:
            request.processor = LogitsProcessor(params, request.prompt_ids, self.vocab_size, self.eos_ids, grammar)
        with self._cond:
            self._waiting.append(request)
            self._wake = True
            self._cond.notify()
        if self.metrics:
            self.metrics.queue_depth(len(self._waiting))
        return request.stream

    def submitting_together(self):
        """Hold admission while the caller submits several requests (the choices of n > 1): they are
        admitted in one step, and repeats of a prompt share its prefill (see prefill.py)."""
        return self._cond

    def encode(self, prompt: str) -> list[int]:
        return encode_prompt_text(self.tokenizer, prompt)

    def _grammar(self, response_format: str):
        from loraplex.serving.engine.grammar import GrammarCompiler

        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_ids)
        return self._grammars.matcher(response_format)

    def cancel(self, request_id: str) -> None:
        with self._cond:
            request = self.book.in_flight.get(request_id)
            if request is not None and not request.cancelled:
                request.cancelled, request.cancel_step = True, self.steps
                self._wake = True
                self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            return {
                "waiting": len(self._waiting),
                "running": len(self._running),
                "free_rows": len(self._free_rows),
                "steps": self.steps,
                "cancelled": self.cancelled,
                "max_cancel_lag_steps": self.max_cancel_lag_steps,
                "loading": len(self.loader),
                "threads": self.threads,  # what each forward runs on
                **self.store.counts,
            }

    def shutdown(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop taking requests; with drain, let the ones in flight finish first."""
        with self._cond:
            self.book.stopping = True
            if not drain:
                for request in list(self._waiting) + self._running:
                    request.cancelled = True
            self._wake = True
            self._cond.notify()
        self._thread.join(timeout)
        if hasattr(self, "loader"):
            self.loader.shutdown()

    # -- the engine thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                # sleep until a request, a cancel, a finished load or a deadline can change something
                while not (self._running or self.book.stopping or (self._waiting and self._wake)):
                    self._cond.wait(self._until_next_deadline())
                    if self._deadline_passed():
                        break
                if self.book.stopping and not (self._waiting or self._running):
                    return
                self._wake = False
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

    def _until_next_deadline(self) -> float | None:
        deadlines = [r.deadline for r in self._waiting if r.deadline is not None]
        return max(0.0, min(deadlines) - time.monotonic()) + 1e-3 if deadlines else None

    def _deadline_passed(self) -> bool:
        now = time.monotonic()
        return any(r.deadline is not None and now > r.deadline for r in self._waiting)

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        with self._cond:
            candidates = list(self._waiting) + self._running
        for request in candidates:
            if request.cancelled:
                self._finish(request, "cancelled")
            elif request.deadline is not None and now > request.deadline:
                self._finish(
                    request, "deadline", DeadlineExceeded(f"request {request.request_id} ran past its deadline")
                )

    def _admit(self) -> None:
        admitted, placing = [], 0.0
        with self._cond:
            candidates = round_robin(self._waiting, self._last_adapter)
            rows_held: dict[str, int] = {}
            for request in self._running:
                rows_held[request.adapter_id] = rows_held.get(request.adapter_id, 0) + 1
        blocked: set[str] = set()  # adapters whose head request cannot start now: FIFO within an adapter
        others_waiting = len({r.adapter_id for r in candidates}) > 1
        for request in candidates:
            adapter = request.adapter_id
            if adapter in blocked:
                continue
            if others_waiting and rows_held.get(adapter, 0) >= self.rows_per_adapter:
                blocked.add(adapter)  # fairness: this adapter has its share while others wait
                continue
            with self._cond:
                if not self._free_rows:
                    break
            started = time.perf_counter()
            try:
                lease = self.loader.lease(adapter) if adapter else None
            except NoFreeSlot as exc:
                if not self._running:  # nothing will release a slot: every one is pinned
                    self._finish(request, "error", exc)
                blocked.add(adapter)  # a running request must release an adapter first
                continue
            except Exception as exc:  # this request fails alone; an unexpected error must not retry forever
                if not isinstance(exc, LoraplexError):
                    logger.exception("loading adapter %r failed", adapter)
                self._finish(request, "error", exc)
                continue
            placing += time.perf_counter() - started
            if adapter and lease is None:
                blocked.add(adapter)  # being read on the loader thread; the others go on
                continue
            request.lease = lease
            with self._cond:
                self._waiting.remove(request)
                request.row = self._free_rows.pop()
                self._running.append(request)
            rows_held[adapter] = rows_held.get(adapter, 0) + 1
            self._last_adapter = adapter
            admitted.append(request)
        self._admitted_now, self._placing_s = len(admitted), placing
        # Every forward first, then sampling: a request that finishes at once (echo with
        # max_tokens=0) moves the last batch position, which a later group's forward reads.
        groups = prefill_groups(admitted, one_by_one=self.fixed_shapes)
        prefilled = [(group.requests, self._prefill(group)) for group in groups]
        for requests, logits in prefilled:
            self._accept_tokens(requests, logits)

    def _loaded(self) -> None:
        with self._cond:
            self._wake = True
            self._cond.notify()

    def _prefill(self, group: PrefillGroup) -> torch.Tensor:
        requests = group.requests[:1] if group.shared else group.requests
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.zeros(len(requests), width, dtype=torch.long)
        for i, request in enumerate(requests):
            ids[i, : len(request.prompt_ids)] = torch.tensor(request.prompt_ids)
        positions = torch.arange(width).repeat(len(requests), 1)
        scoring = requests[0].params.prompt_logprobs
        if scoring is not None:  # one request: logits at every position ([1, t] index into the runner's rows)
            logits = self._forward(requests, ids, positions, torch.arange(width).view(1, width))[0]
            request = requests[0]
            request.stream.push(TokenEvent(prompt_logprobs=prompt_logprobs(logits, request.prompt_ids, scoring)))
            logits = logits[-1:]
        else:
            logits = self._forward(requests, ids, positions, torch.tensor([len(r.prompt_ids) - 1 for r in requests]))
        for request in group.requests:
            request.length = len(request.prompt_ids)
        for other in group.requests[1:] if group.shared else ():  # its prompt's cache, computed once
            for cache in (self.runner.k_cache, self.runner.v_cache):
                cache[:, other.row, :width] = cache[:, requests[0].row, :width]
        return logits.repeat(len(group.requests), 1) if group.shared else logits

    def _decode_step(self) -> None:
        requests = list(self._running)
        ids = torch.tensor([[r.generated[-1]] for r in requests])
        positions = torch.tensor([[r.length] for r in requests])
        logits = self._forward(
            requests, ids, positions, torch.zeros(len(requests), dtype=torch.long), pad=self.fixed_shapes
        )
        for request in requests:
            request.length += 1
        self.steps += 1
        self.step_log.append((time.monotonic(), self._admitted_now, self._placing_s))
        self._admitted_now, self._placing_s = 0, 0.0
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
            params = request.params
            if params.max_tokens == 0:  # echo with max_tokens=0: the prompt's logprobs were all it asked
                self._finish(request, "length")
                continue
            try:
                processed = request.processor(row_logits) if request.processor else row_logits
                token = sample_next(processed, params, request.generator)
                if request.processor:
                    request.processor.accept(token)
            except Exception as exc:  # one request's sampling fails alone, never the batch
                logger.exception("sampling failed for request %s", request.request_id)
                self._finish(request, "error", exc)
                continue
            if request.first_token_at is None:
                request.first_token_at = now
            if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
                self._emit(request, request.detok.flush())
                self._finish(request, "stop")
                continue
            request.generated.append(token)
            if params.logprobs is not None:
                request.logprobs.append(token_logprob(row_logits, token, params.logprobs))
            text = request.detok.add(token)
            if request.detok.stopped:
                self._emit(request, text)
                self._finish(request, "stop")
            elif len(request.generated) >= params.max_tokens or request.length + 1 >= self.max_seq:
                self._emit(request, text + request.detok.flush())
                self._finish(request, "length")
            else:
                self._emit(request, text, final=False)

    def _emit(self, request: _Request, text: str, final: bool = True) -> None:
        """Send new text (the detokenizer holds back partial characters and stop strings) with its logprobs.

        Logprobs of tokens whose text is still held back wait for the next text, or the end.
        """
        if not text and not (final and request.logprobs):
            return
        logprobs, request.logprobs = (request.logprobs or None), []
        request.stream.push(TokenEvent(text=text, logprobs=logprobs))

    def _finish(self, request: _Request, reason: str, error: BaseException | None = None) -> None:
        with self._cond:
            if request.request_id not in self.book.in_flight:
                return  # already finished
            if request in self._running:
                # the last request takes the free batch position: only one position changes
                index = self._running.index(request)
                last = self._running.pop()
                if last is not request:
                    self._running[index] = last
                self._free_rows.append(request.row)
                self._wake = True  # a row, and maybe a slot, is free for the requests waiting
            elif request in self._waiting:
                self._waiting.remove(request)
            if reason == "cancelled":
                self.cancelled += 1
                self.max_cancel_lag_steps = max(self.max_cancel_lag_steps, self.steps - request.cancel_step)
        if request.lease is not None:
            self.store.release(request.lease)
        self.book.final(request, reason, error, len(request.generated))
