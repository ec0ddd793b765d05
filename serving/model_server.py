"""The ModelServer deployment: one engine per replica (the base once, adapters in slots).

Ray routes a request to a replica that already holds its adapter when one exists
(`serve.multiplexed`), so a replica's adapter slots stay warm for the tenants it serves.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from ray import serve

from loraplex.serving.auth import TenantLimits
from loraplex.serving.choices import Choice, gather, merged
from loraplex.serving.engine.api import EngineConfig
from loraplex.serving.errors import InvalidRequest
from loraplex.serving.requests import GenerateCall


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256, graceful_shutdown_timeout_s=60)
class ModelServer:
    """One engine per replica: the NF4 base once, adapters in slots."""

    def __init__(self, engine_config: dict) -> None:
        from loraplex.serving.engine import create_engine
        from loraplex.serving.metrics import ServingMetrics

        config = EngineConfig(**engine_config)
        self.engine = create_engine(config, metrics=ServingMetrics("ray"))
        self.replica_id = serve.get_replica_context().replica_id.unique_id

        # Ray routes by the adapters a replica reports (`serve.multiplexed`); its cap is the
        # engine's own slot count, so routing and the store agree (a class-level decorator would
        # fix the cap when the module is imported, before any config is read).
        # a plain function: Ray keeps its model cache as an attribute of the decorated callable,
        # which a bound method refuses ("'method' object has no attribute '__serve_multiplex_wrapper'")
        async def hold_adapter(adapter_id: str) -> str:
            return await self._hold_adapter(adapter_id)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=config.max_loras)(hold_adapter)

    async def _hold_adapter(self, adapter_id: str) -> str:
        """Tells Ray this replica holds the adapter (routing affinity). The adapter is read and
        validated into the store's host tier here; the engine copies it into a slot when it admits
        the request (a missing or bad adapter is refused now, before anything is queued)."""
        await asyncio.to_thread(self.engine.store.prepare, adapter_id)
        return adapter_id

    def routing_cap(self) -> int | None:
        """Ray's own cap on the adapters it routes to this replica, read from Ray's multiplex
        wrapper (made on the first adapter request; None before)."""
        wrapper = getattr(getattr(self.get_adapter, "__wrapped__", None), "__serve_multiplex_wrapper", None)
        return getattr(wrapper, "max_num_models_per_replica", None)

    def _prompt(self, call: GenerateCall) -> list[str | list[int]]:
        """The prompts of a call; messages are rendered with the model's chat template."""
        if call["messages"]:
            try:
                return [
                    self.engine.tokenizer.apply_chat_template(
                        call["messages"], tokenize=False, add_generation_prompt=True
                    )
                ]
            except Exception as exc:  # the model's own template refuses these messages
                raise InvalidRequest(f"messages do not fit the chat template: {exc}"[:300]) from None
        return call.get("prompts") or [call["prompt"] or ""]

    def _params(self, call: GenerateCall):
        from loraplex.serving.engine.sampling import SamplingParams

        try:
            params = SamplingParams(**call["params"])
        except TypeError as exc:
            raise InvalidRequest(str(exc)) from None
        return params

    async def _submit(self, call: GenerateCall) -> tuple[str, list[Choice]]:
        """Every (prompt, choice) as its own engine request; a refusal cancels those already queued."""
        adapter_id = serve.get_multiplexed_model_id()
        if adapter_id:
            await self.get_adapter(adapter_id)
        params, n = self._params(call), call.get("n") or 1
        limits = TenantLimits(**call["limits"]) if call.get("limits") else None
        prompts = []  # (token IDs, echo text) per prompt, checked before anything is queued
        for prompt in self._prompt(call):
            prompt_ids = prompt if isinstance(prompt, list) else self.engine.encode(prompt)
            echo = (
                ""
                if not call.get("echo")
                else prompt
                if isinstance(prompt, str)
                else (self.engine.tokenizer.decode(prompt, skip_special_tokens=True))
            )
            if limits is not None:
                limits.check_prompt_tokens(len(prompt_ids))
                limits.check_new_tokens(params.max_tokens)
                if params.max_tokens is None and limits.max_new_tokens is not None:
                    room = max(1, self.engine.max_seq - len(prompt_ids))
                    params = replace(params, max_tokens=min(limits.max_new_tokens, room))
            prompts.append((prompt_ids, echo))
        choices: list[Choice] = []
        try:
            with (
                self.engine.submitting_together()
            ):  # the torch engine admits them in one step and shares a prompt's prefill
                for index, (prompt_ids, echo) in enumerate(p for p in prompts for _ in range(n)):
                    one = params if params.seed is None or index == 0 else replace(params, seed=params.seed + index)
                    request_id = call["request_id"] if index == 0 else f"{call['request_id']}-{index}"
                    stream = self.engine.submit(
                        prompt_ids, adapter_id, one, request_id=request_id, timeout=call.get("timeout")
                    )
                    choices.append(Choice(index, len(prompt_ids), echo, stream))
        except BaseException:
            for choice in choices:
                choice.stream.cancel()
            raise
        return adapter_id, choices

    def _ids(self, adapter_id: str, call: GenerateCall) -> dict:
        return {"request_id": call["request_id"], "adapter_id": adapter_id, "replica_id": self.replica_id}

    @staticmethod
    def _prompt_tokens(choices: list[Choice], n: int) -> int:
        return sum(c.prompt_tokens for c in choices[::n])  # once per prompt, however many choices

    async def generate(self, call: GenerateCall) -> dict:
        adapter_id, choices = await self._submit(call)
        outputs = await gather(choices, self.engine.tokenizer)
        first = outputs[0]
        return {
            **self._ids(adapter_id, call),
            "text": first["text"],
            "finish_reason": first["finish_reason"],
            "prompt_tokens": self._prompt_tokens(choices, call.get("n") or 1),
            "completion_tokens": sum(o["completion_tokens"] for o in outputs),
            "final": True,
            "adapter_version": first["adapter_version"],
            "choices": outputs,
        }

    async def generate_stream(self, call: GenerateCall):
        """Chunks of every choice (see choices.merged), then one final chunk with the totals."""
        adapter_id, choices = await self._submit(call)
        ids, completion, version = self._ids(adapter_id, call), 0, ""
        async for chunk in merged(choices, self.engine.tokenizer):
            completion += chunk.get("completion_tokens", 0)
            version = chunk.get("adapter_version", version)
            yield {**ids, **chunk, "final": False}
        yield {
            **ids,
            "final": True,
            "text": "",
            "prompt_tokens": self._prompt_tokens(choices, call.get("n") or 1),
            "completion_tokens": completion,
            "adapter_version": version,
            "choice_count": len(choices),
        }

    async def load_lora_adapter(self, adapter_id: str, lora_path: str) -> dict:
        """vLLM's /v1/load_lora_adapter: the path must be the adapter's own folder in the store."""
        from pathlib import Path

        store = self.engine.store
        folder = store.folder(adapter_id)  # the store's own checks: ID, inside the root
        given = Path(lora_path)
        resolved = (given if given.is_absolute() else store.root / given).resolve()
        if resolved != folder.resolve():
            raise InvalidRequest(
                f"lora_path must be the adapter's folder in this server's store, {folder} "
                f"(got {lora_path}): copy the adapter into the store root {store.root} first"
            )
        return await self.load_adapter(adapter_id)

    async def list_adapters(self) -> dict:
        store = self.engine.store
        resident = store.resident()
        ids = sorted(set(store.available()) | set(resident))
        return {
            "adapters": [
                {
                    "adapter_id": i,
                    "resident": i in resident,
                    "pinned": i in store.pinned,
                    "rank": resident[i].rank if i in resident else 0,
                    "provenance": store.provenance(i),
                }
                for i in ids
            ],
            "base_model": str(self.engine.base_dir),
            "base_fingerprint": self.engine.base_fingerprint,
            "replica_id": self.replica_id,
            # what the base is served in: vLLM's CPU build serves an nf4 request in bf16, and says why
            "base_precision": getattr(self.engine, "base_precision", self.engine.config.quantization),
            "base_precision_note": getattr(self.engine, "precision_note", ""),
        }

    async def load_adapter(self, adapter_id: str) -> dict:
        await self.get_adapter(adapter_id)
        return self._info(adapter_id)

    async def unload_adapter(self, adapter_id: str) -> bool:
        return await asyncio.to_thread(self.engine.store.unload, adapter_id)

    async def pin_adapter(self, adapter_id: str, pinned: bool) -> dict:
        await asyncio.to_thread(self.engine.store.pin, adapter_id, pinned)
        return self._info(adapter_id)

    def _info(self, adapter_id: str) -> dict:
        lease = self.engine.store.resident().get(adapter_id)
        return {
            "adapter_id": adapter_id,
            "resident": lease is not None,
            "pinned": adapter_id in self.engine.store.pinned,
            "rank": lease.rank if lease else 0,
            "provenance": self.engine.store.provenance(adapter_id),
        }

    def stats(self) -> dict:
        return {**self.engine.stats(), "replica_id": self.replica_id, "routing_cap": self.routing_cap()}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(drain=True, timeout=30)
