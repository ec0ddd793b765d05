"""The surface every engine shares: its config, the caller's stream, the request checks and the
submit/finish bookkeeping. The torch engine and the vLLM engine both build on this module, and
nothing here imports either of them (so neither imports the other).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from loraplex.serving.engine.sampling import SamplingParams
from loraplex.serving.errors import EngineStopped, InvalidRequest, QueueFull
from loraplex.training.adapter_id import validate_adapter_id
from loraplex.training.errors import ConfigError


@dataclass(frozen=True)
class EngineConfig:
    base_model: str | None = field(
        default=None,
        metadata={"help": "HF checkpoint folder to serve (required; `loraplex base` prints the embedded demo base)"},
    )
    adapters: str | None = field(default=None, metadata={"help": "adapter store root: <dir>/<adapter_id>/"})
    quantization: str = field(
        default="nf4",
        metadata={"help": "nf4 (bitsandbytes, as in training), bf16, or awq (vllm engine: a convert AWQ export)"},
    )
    max_batch: int = field(default=16, metadata={"help": "requests decoded together (KV-cache rows)"})
    max_loras: int = field(default=8, metadata={"help": "adapters resident at once (LRU beyond that)"})
    max_lora_rank: int = field(default=64, metadata={"help": "largest adapter rank accepted"})
    host_adapter_bytes: int = field(
        default=2 << 30,
        metadata={"help": "host-memory tier: bytes of validated adapters kept in RAM (LRU), so a slot miss is a copy"},
    )
    adapter_dtype: str = field(
        default="float32",
        metadata={"help": "torch engine: adapter weights stored as float32 (PEFT's) or bfloat16 (half the bytes read)"},
    )
    max_rows_per_adapter: int = field(
        default=0,
        metadata={"help": "rows one adapter may hold while others wait (fairness); 0 = half of max_batch"},
    )
    threads: int = field(
        default=0,
        metadata={
            "help": "torch engine: threads for each forward; 0 = the CPUs this process may use "
            "(`loraplex serve` divides them among the replicas)"
        },
    )
    max_seq: int = field(default=256, metadata={"help": "context length: prompt + new tokens"})
    max_queue: int = field(default=256, metadata={"help": "waiting requests before RESOURCE_EXHAUSTED"})
    max_new_tokens: int = field(default=256, metadata={"help": "cap on max_tokens per request"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda; default: cuda when present"})
    engine: str = field(
        default="torch", metadata={"help": "torch (this engine, CPU or GPU) or vllm", "choices": ["torch", "vllm"]}
    )
    # vLLM engine only (see serving/engine/vllm_engine.py)
    max_cpu_loras: int | None = field(default=None, metadata={"help": "vllm: adapters kept in CPU memory"})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vllm: share of GPU memory"})
    enforce_eager: bool = field(default=False, metadata={"help": "vllm: skip CUDA graphs"})
    seed: int = field(default=0, metadata={"help": "vllm: engine seed"})
    adapter_base: str | None = field(
        default=None,
        metadata={"help": "checkpoint the adapters were trained on, when the served base differs (an AWQ export)"},
    )


def require_base_dir(config: EngineConfig) -> Path:
    """The base folder an engine serves; engines never build or pick a default base themselves."""
    if not config.base_model:
        raise ConfigError(
            "EngineConfig.base_model is required: pass the folder of an HF checkpoint "
            "(`loraplex base` prints the embedded demo base's path)"
        )
    base_dir = Path(config.base_model)
    if not (base_dir / "config.json").is_file():
        raise ConfigError(f"base model {base_dir} is not an HF checkpoint folder (no config.json)")
    return base_dir


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
    """The caller's side of a request: iterate (sync or async) over StreamEvents, or cancel.

    Events land in a thread-safe queue, so `result()` and plain iteration work from any thread,
    inside a running event loop too; async iteration is woken through the loop the stream was
    made on (or the one iterating it).
    """

    def __init__(self, engine: Engine, request_id: str, adapter_id: str) -> None:
        self.engine, self.request_id, self.adapter_id = engine, request_id, adapter_id
        self._events: queue.Queue[StreamEvent] = queue.Queue()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._lock = threading.Lock()

    def push(self, event: StreamEvent) -> None:  # called from the engine's thread
        self._events.put(event)
        with self._lock:
            waiter = self._waiter
        if waiter is not None:
            loop, wake = waiter
            loop.call_soon_threadsafe(wake.set)

    def cancel(self) -> None:
        self.engine.cancel(self.request_id)

    def __iter__(self):
        while True:
            event = self._events.get()
            yield event
            if event.final:
                return

    async def __aiter__(self):
        wake = asyncio.Event()
        with self._lock:
            self._waiter = (asyncio.get_running_loop(), wake)
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                await wake.wait()
                wake.clear()
                continue
            yield event
            if event.final:
                return

    def result(self, timeout: float | None = None) -> tuple[str, StreamEvent]:
        """Block for the whole text; raises the request's error, if any (TimeoutError past timeout)."""
        text, deadline = [], None if timeout is None else time.monotonic() + timeout
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                event = self._events.get(timeout=wait)
            except queue.Empty:
                raise TimeoutError(f"request {self.request_id} gave no result within {timeout} s") from None
            text.append(event.text)
            if event.final:
                if event.error is not None:
                    raise event.error
                return "".join(text), event


def encode_prompt_text(tokenizer, prompt: str) -> list[int]:
    """The prompt contract (text verbatim, the tokenizer's BOS in front), with bad text as InvalidRequest."""
    from loraplex.training.data import encode_prompt

    if not prompt:
        raise InvalidRequest("prompt is empty")
    try:
        return encode_prompt(tokenizer, prompt)
    except Exception as exc:  # e.g. lone surrogates from JSON "\ud800"
        raise InvalidRequest(f"prompt cannot be tokenized: {type(exc).__name__}: {exc}"[:300]) from None


class Engine(Protocol):
    """What the server, the demo and the benchmarks use of an engine (torch or vLLM)."""

    config: EngineConfig
    base_dir: Path
    max_seq: int
    tokenizer: Any
    store: Any  # an AdapterStore

    def submit(
        self,
        prompt: str | list[int],
        adapter_id: str = "",
        params: SamplingParams | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> RequestStream: ...

    def encode(self, prompt: str) -> list[int]: ...

    def cancel(self, request_id: str) -> None: ...

    def submitting_together(self) -> contextlib.AbstractContextManager:
        """Hold admission while the caller submits several requests (the choices of n > 1)."""
        ...

    def stats(self) -> dict: ...

    def shutdown(self, drain: bool = True, timeout: float = 60.0) -> None: ...


@dataclass(eq=False)
class TrackedRequest:
    """One request between submit() and its final event: what both engines keep about it."""

    request_id: str
    adapter_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    deadline: float | None  # time.monotonic() seconds
    submitted: float = field(default_factory=time.monotonic)
    lease: Any = None  # the store's SlotLease while the adapter is held
    first_token_at: float | None = None
    cancelled: bool = False


class RequestBook:
    """The submit/finish bookkeeping both engines share: checks, IDs, the queue cap, the final event.

    An engine calls `track()` in submit() and `final()` once per request; `in_flight` and `cond`
    are its view of what is running.
    """

    def __init__(self, engine: Engine, metrics=None) -> None:
        self.engine, self.metrics = engine, metrics
        self.cond = threading.Condition()
        self.in_flight: dict[str, TrackedRequest] = {}
        self.stopping = False

    def checked(
        self, prompt: str | list[int], adapter_id: str, params: SamplingParams | None
    ) -> tuple[list[int], SamplingParams]:
        """The checks every engine runs before queueing: adapter ID, prompt, sampling, context."""
        engine = self.engine
        params = params or SamplingParams()
        if adapter_id:
            validate_adapter_id(adapter_id)
        prompt_ids = prompt if isinstance(prompt, list) else engine.encode(prompt)
        if not prompt_ids:
            raise InvalidRequest("prompt is empty")
        if params.max_tokens is None:
            room = min(engine.config.max_new_tokens, engine.max_seq - len(prompt_ids))
            params = dataclasses.replace(params, max_tokens=max(room, 1))
        params.validate(engine.config.max_new_tokens)
        if len(prompt_ids) + params.max_tokens > engine.max_seq:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the context of {engine.max_seq} tokens"
            )
        return prompt_ids, params

    def track(
        self,
        prompt: str | list[int],
        adapter_id: str,
        params: SamplingParams | None,
        request_id: str | None,
        timeout: float | None,
        capacity: int,
        make=TrackedRequest,
        **extra,
    ) -> TrackedRequest:
        """Check a request and register it; `capacity` is how many may be in flight at once."""
        prompt_ids, params = self.checked(prompt, adapter_id, params)
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(self.engine, request_id, adapter_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        request = make(request_id, adapter_id, prompt_ids, params, stream, deadline, **extra)
        with self.cond:
            if self.stopping:
                raise EngineStopped("the server is shutting down")
            if len(self.in_flight) >= capacity:
                raise QueueFull(f"request queue is full ({self.engine.config.max_queue} waiting)")
            if request_id in self.in_flight:
                raise InvalidRequest(f"request ID {request_id!r} is already running")
            self.in_flight[request_id] = request
            self.cond.notify_all()
        return request

    def final(self, request: TrackedRequest, reason: str, error: BaseException | None, completion_tokens: int) -> bool:
        """Send the request's final event and count it; False when it had already finished."""
        with self.cond:
            if self.in_flight.pop(request.request_id, None) is None:
                return False
            self.cond.notify_all()
        request.stream.push(
            StreamEvent(
                final=True,
                finish_reason=reason,
                prompt_tokens=len(request.prompt_ids),
                completion_tokens=completion_tokens,
                error=error,
                adapter_version=request.lease.version_id if request.lease else "",
            )
        )
        if self.metrics:
            self.metrics.request_finished(
                request.adapter_id,
                reason,
                error,
                len(request.prompt_ids),
                completion_tokens,
                time.monotonic() - request.submitted,
                None if request.first_token_at is None else request.first_token_at - request.submitted,
            )
        return True
