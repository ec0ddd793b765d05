"""The one list of model architectures that the torch engine and convert's GGUF export support.

The torch engine's runner reuses HF's projections, norms and rotary embedding but runs its own
attention, so it is exact only for decoders laid out like Llama: separate q/k/v projections
(biases allowed), RMSNorm, SiLU gate/up MLP, rotate-half RoPE, optional sliding window. Gemma
(scaled embeddings, 1+w norms), Phi-3 (fused qkv) or Qwen3 (q/k norms) would load and then give
wrong output, so both the engine and convert refuse them up front with one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraplex.training.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class UnsupportedArchitecture(ConfigError):
    """A checkpoint whose architecture is not in SUPPORTED_ARCHITECTURES."""


def architecture_of(config: dict | object) -> str:
    """architectures[0] of a config.json dict or a transformers config, else its model_type."""
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    names = get("architectures") or []
    return names[0] if names else str(get("model_type") or "<unknown>")


def read_model_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir} has no config.json: not a Hugging Face checkpoint")
    return json.loads(path.read_text())


def require_torch_engine_architecture(model: str | Path | dict | object) -> str:
    """The architecture name, or UnsupportedArchitecture pointing at the vLLM engine.

    model: a checkpoint folder, its config.json as a dict, a transformers config, or a loaded
    model (then its class decides: that is what actually runs)."""
    if isinstance(model, (str, Path)):
        arch = architecture_of(read_model_config(model))
    elif hasattr(model, "config") and hasattr(model, "forward"):
        arch = type(model).__name__
    else:
        arch = architecture_of(model)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"architecture {arch} is not supported by the torch engine; use --engine vllm "
            f"(torch engine: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return arch


def require_convert_architecture(config: dict) -> str:
    """The architecture name, or UnsupportedArchitecture: GGUF export knows only these layouts."""
    arch = architecture_of(config)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"architecture {arch} is not supported by convert's GGUF export "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}); --format hf exports any architecture"
        )
    return arch
