"""Admission helpers for the torch engine: the fair order of waiting requests, and adapter reads
on a loader thread so that a cold adapter never stalls the batch."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

# The loader yields the CPU to decoding (a read is not worth a slower step), but not all of it:
# at nice 10 it keeps about a tenth of a busy core, so a cold adapter still arrives under load.
LOADER_NICE = 10


def round_robin(waiting: Iterable, last_adapter: str | None) -> list:
    """Waiting requests round-robin over their adapters (FIFO within one), starting after the
    adapter admitted last: one tenant's burst cannot push the others' requests behind it."""
    queues: dict[str, list] = {}
    for request in waiting:
        queues.setdefault(request.adapter_id, []).append(request)
    adapters = list(queues)
    if last_adapter in queues:
        turn = adapters.index(last_adapter) + 1
        adapters = adapters[turn:] + adapters[:turn]
    order = []
    for depth in range(max((len(q) for q in queues.values()), default=0)):
        order += [queues[a][depth] for a in adapters if depth < len(queues[a])]
    return order


class AdapterLoader:
    """Reads adapters into the store's host tier on one background thread (store.prepare:
    file reads, sha256, parsing, checks), then hands out leases that cost only a slot copy."""

    def __init__(self, store, on_loaded: Callable[[], None]) -> None:
        self.store, self._on_loaded = store, on_loaded
        self._loading: dict[str, Future] = {}  # adapter ID -> its read in progress or done
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="loraplex-adapter-load", initializer=_yield_cpu)

    def lease(self, adapter_id: str):
        """The adapter's lease if it is in a slot or in host memory; None while it is being read
        (on_loaded is called when the read ends). A failed read raises here, once. Raises
        NoFreeSlot when every slot is pinned or in use."""
        loading = self._loading.get(adapter_id)
        if loading is not None and not loading.done():
            return None
        if loading is not None:
            del self._loading[adapter_id]
            return self.store.try_acquire(adapter_id, loading.result())  # raises the read's error
        lease = self.store.try_acquire(adapter_id)
        if lease is None:
            future = self._pool.submit(self.store.prepare, adapter_id)
            self._loading[adapter_id] = future
            future.add_done_callback(lambda _: self._on_loaded())
        return lease

    def __len__(self) -> int:
        return sum(not f.done() for f in self._loading.values())

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _yield_cpu() -> None:
    """Lowest CPU priority for the loader thread (Linux nice is per thread, and the threads it
    starts inherit it), so reading an adapter takes only what decoding leaves idle."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: reads just compete fairly
        pass
