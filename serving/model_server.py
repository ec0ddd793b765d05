"""The ModelServer deployment: one engine per replica (the base once, adapters in slots).

Ray routes a request to a replica that already holds its adapter when one exists
(`serve.multiplexed`), so a replica's adapter slots stay warm for the tenants it serves.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from ray import serve

from loraplex.serving.auth import TenantLimits
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
        """Tells Ray this replica holds the adapter (routing affinity); the store keeps the weights."""
        lease = await asyncio.to_thread(self.engine.store.acquire, adapter_id)
        self.engine.store.release(lease)
        return adapter_id

    async def _submit(self, call: GenerateCall):
        from loraplex.serving.engine.sampling import SamplingParams

        adapter_id = serve.get_multiplexed_model_id()
        if adapter_id:
            await self.get_adapter(adapter_id)
        prompt = call["prompt"]
        if call["messages"]:
            try:
                prompt = self.engine.tokenizer.apply_chat_template(call["messages"], tokenize=False,
                                                                   add_generation_prompt=True)
            except Exception as exc:  # the model's own template refuses these messages
                raise InvalidRequest(f"messages do not fit the chat template: {exc}"[:300]) from None
        try:
            params = SamplingParams(**call["params"])
        except TypeError as exc:
            raise InvalidRequest(str(exc)) from None
        prompt_ids = self.engine.encode(prompt or "")
        limits = TenantLimits(**call["limits"]) if call.get("limits") else None
        if limits is not None:
            limits.check_prompt_tokens(len(prompt_ids))
            limits.check_new_tokens(params.max_tokens)
            if params.max_tokens is None and limits.max_new_tokens is not None:
                room = max(1, self.engine.max_seq - len(prompt_ids))
                params = replace(params, max_tokens=min(limits.max_new_tokens, room))
        return adapter_id, self.engine.submit(prompt_ids, adapter_id, params, request_id=call["request_id"],
                                              timeout=call.get("timeout"))

    def _final(self, adapter_id: str, request_id: str, text: str, event) -> dict:
        if event.error is not None:
            raise event.error
        return {"text": text, "finish_reason": event.finish_reason, "prompt_tokens": event.prompt_tokens,
                "completion_tokens": event.completion_tokens, "request_id": request_id,
                "adapter_id": adapter_id, "replica_id": self.replica_id, "final": True,
                "adapter_version": event.adapter_version}

    async def generate(self, call: GenerateCall) -> dict:
        adapter_id, stream = await self._submit(call)
        parts = []
        try:
            async for event in stream:
                parts.append(event.text)
        except asyncio.CancelledError:
            stream.cancel()
            raise
        return self._final(adapter_id, call["request_id"], "".join(parts), event)

    async def generate_stream(self, call: GenerateCall):
        adapter_id, stream = await self._submit(call)
        try:
            async for event in stream:
                if event.final:
                    yield self._final(adapter_id, call["request_id"], "", event)
                elif event.text:
                    yield {"text": event.text, "final": False, "request_id": call["request_id"],
                           "adapter_id": adapter_id, "replica_id": self.replica_id}
        except (asyncio.CancelledError, GeneratorExit):
            stream.cancel()
            raise

    async def list_adapters(self) -> dict:
        store = self.engine.store
        resident = store.resident()
        ids = sorted(set(store.available()) | set(resident))
        return {
            "adapters": [{"adapter_id": i, "resident": i in resident, "pinned": i in store.pinned,
                          "rank": resident[i].rank if i in resident else 0,
                          "provenance": store.provenance(i)} for i in ids],
            "base_model": str(self.engine.base_dir), "base_fingerprint": self.engine.base_fingerprint,
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
        return {"adapter_id": adapter_id, "resident": lease is not None,
                "pinned": adapter_id in self.engine.store.pinned, "rank": lease.rank if lease else 0,
                "provenance": self.engine.store.provenance(adapter_id)}

    def stats(self) -> dict:
        return {**self.engine.stats(), "replica_id": self.replica_id}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(drain=True, timeout=30)
