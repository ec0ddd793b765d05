"""Engines behind one surface (api.py): the torch engine (engine.py) and the vLLM engine (vllm_engine.py).

`create_engine` is the one place that picks between them, so neither engine imports the other.
"""

from __future__ import annotations

from loraplex.serving.engine.api import Engine, EngineConfig, RequestStream, StreamEvent
from loraplex.serving.errors import InvalidRequest

__all__ = ["Engine", "EngineConfig", "RequestStream", "StreamEvent", "create_engine"]


def create_engine(config: EngineConfig, metrics=None) -> Engine:
    """The engine the config names; both have the same surface (submit, store, stats, shutdown)."""
    if config.engine == "vllm":
        from loraplex.serving.engine.vllm_engine import VLLMEngine

        return VLLMEngine(config, metrics=metrics)
    if config.engine != "torch":
        raise InvalidRequest(f"unknown engine {config.engine!r}: use torch or vllm")
    from loraplex.serving.engine.engine import TorchEngine

    return TorchEngine(config, metrics=metrics)
