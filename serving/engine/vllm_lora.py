"""The vLLM engine's adapter lifecycle: store events become AsyncLLM LoRA calls.

A loaded adapter version -> add_lora under a fresh integer ID; a retired or evicted version ->
remove_lora once its last request has left; pin -> pin_lora (no unpin in vLLM: remove + add).
The store itself (checks, LRU, pins, hot swap) is the torch engine's AdapterStore.

AsyncLLM is asyncio-bound, so it lives on a private loop (EventLoopThread) that every call goes
through. Nothing here imports vllm at module level: these parts are tested with a stand-in.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from loraplex.serving.engine.store import AdapterStore, PreparedAdapter, SlotLease
from loraplex.serving.errors import AdapterRejected, NoFreeSlot
from loraplex.training.adapter_id import internal_name, validate_adapter_id

logger = logging.getLogger("loraplex.vllm")

ADD_LORA_TIMEOUT_S = 300.0


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
        return {
            "lora_name": self.lora_name(adapter_id, version_id),
            "lora_int_id": self.lora_id(adapter_id, version_id),
            "lora_path": str(path),
        }


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
        """Cancel what still runs on the loop (AsyncLLM's output handler after its shutdown), then stop it."""
        try:
            self.run(_cancel_other_tasks(), timeout=10)
        except Exception:  # a stuck task must not block shutdown
            logger.warning("tasks on the vLLM loop did not end within 10 s")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def _cancel_other_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


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

    def __init__(
        self,
        llm,
        loop: EventLoopThread,
        n_slots: int,
        module_shapes: dict[str, tuple[int, int]],
        max_loras: int,
        snapshot_root: str | Path,
        make_request: Callable[..., Any] | None = None,
    ) -> None:
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
        """vLLM has pin_lora but no unpin: unpinning re-registers the same ID."""
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

    def _prepare_placement(self, weights: dict, files: dict[str, bytes]) -> dict:
        """vLLM reads the files itself: the host tier keeps the validated bytes."""
        return {"placed": files, "nbytes": sum(len(b) for b in files.values())}

    def _place(self, slot: int, prepared: PreparedAdapter) -> None:
        """The validated bytes (`placed`) go to vLLM (add_lora), not into tensors."""
        self.slots.register(slot, prepared.adapter_id, prepared.version_id, prepared.placed)
        if prepared.adapter_id in self.pinned:  # a new version of a pinned adapter is pinned in vLLM too
            self.slots.pin(slot, True)

    def pin(self, adapter_id: str, pinned: bool = True) -> SlotLease | None:
        """As AdapterStore.pin; in vLLM a pinned adapter also holds a GPU slot, so one stays unpinned."""
        validate_adapter_id(adapter_id)
        with self._lock:
            was_pinned = adapter_id in self.pinned
            if pinned and not was_pinned and len(self.pinned) >= self.slots.max_pins:
                raise NoFreeSlot(
                    f"at most {self.slots.max_pins} adapters can be pinned on the vllm engine "
                    "(max_loras - 1: vLLM keeps each pinned adapter in a GPU slot)"
                )
            lease = super().pin(adapter_id, pinned)
            if lease is not None and pinned != was_pinned:
                self.slots.pin(lease.slot, pinned)
            return lease
