"""The PEFT LoRA adapter format, parsed in one place: `adapter_config.json` + safetensors keys.

Training writes this format; the serving store, `convert merge` and the GGUF-LoRA exporter read
it here, so they agree on every module's rank and scaling (`rank_pattern`, `alpha_pattern`,
rsLoRA) and refuse the same features with the same message. Pattern lookups use PEFT's own
`get_pattern_key`, so a module gets the rank and alpha PEFT gave it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraplex.training.errors import DataError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Input/output layers: LoRA there changes the vocabulary side, which the engines share across adapters.
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")

# Config features that are not plain W + s*B@A on a decoder linear: (key, what to tell the user).
_REFUSED_FEATURES = (
    ("use_dora", "DoRA (use_dora): its magnitude vector is not plain LoRA; retrain with use_dora=False"),
    (
        "modules_to_save",
        "modules_to_save (full copies of layers such as lm_head or embed_tokens); "
        "retrain with LoRA on the decoder's linear layers only",
    ),
    ("trainable_token_indices", "trainable token embeddings (trainable_token_indices); retrain without them"),
    ("layer_replication", "layer_replication (it changes the base's layer stack)"),
    ("fan_in_fan_out", "fan_in_fan_out (Conv1D-style weights; Llama-family bases use nn.Linear)"),
    ("lora_bias", "LoRA bias terms (lora_bias); retrain with lora_bias=False"),
    ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
    ("use_qalora", "QA-LoRA (use_qalora)"),
)


class LoraFormatError(DataError):
    """An adapter folder is malformed or uses a feature loraplex cannot serve or export."""


@dataclass(frozen=True)
class LoraSpec:
    """adapter_config.json, as far as it decides what each module computes."""

    rank: int
    alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: tuple[str, ...] | str = ()
    base_model_name_or_path: str | None = None

    @property
    def has_patterns(self) -> bool:
        """True when modules differ in rank or alpha (engines with one scaling per adapter can't serve it)."""
        return bool(self.rank_pattern or self.alpha_pattern)

    def module_rank(self, module: str) -> int:
        """The rank PEFT gives `module` (an HF module path such as model.layers.0.self_attn.q_proj)."""
        return int(_pattern_lookup(self.rank_pattern, module, self.rank))

    def module_alpha(self, module: str) -> float:
        return float(_pattern_lookup(self.alpha_pattern, module, self.alpha))

    def scaling(self, module: str) -> float:
        """PEFT's LoraLayer scaling: alpha / r, or alpha / sqrt(r) under rsLoRA, per module."""
        rank = self.module_rank(module)
        return self.module_alpha(module) / (math.sqrt(rank) if self.use_rslora else rank)


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear: output += scaling * B @ A @ x."""

    a: torch.Tensor  # [rank, d_in]
    b: torch.Tensor  # [d_out, rank]
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def _pattern_lookup(pattern: dict, module: str, default):
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(pattern.keys(), module)
    return pattern.get(key, default)


def parse_config(config: dict) -> LoraSpec:
    """Check an adapter_config.json dict and return its spec; refuse what is not plain LoRA."""
    if not isinstance(config, dict):
        raise LoraFormatError(f"{CONFIG_NAME} is not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoraFormatError(f"peft_type {config.get('peft_type')} is not LORA: only LoRA adapters are supported")
    for key, what in _REFUSED_FEATURES:
        if config.get(key):
            raise LoraFormatError(f"the adapter uses {what}, which loraplex does not support")
    if config.get("bias", "none") != "none":
        raise LoraFormatError(
            f"the adapter trains bias terms (bias={config['bias']!r}), which loraplex does not "
            "support; retrain with bias='none'"
        )
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise LoraFormatError(f"{CONFIG_NAME} has no positive integer rank 'r' (found {rank!r})")
    if not _positive_number(alpha):
        raise LoraFormatError(f"{CONFIG_NAME}: lora_alpha must be a positive number (found {alpha!r})")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(isinstance(v, int) and v > 0 for v in rank_pattern.values()):
        raise LoraFormatError(f"{CONFIG_NAME}: rank_pattern must map module patterns to positive integer ranks")
    if not isinstance(alpha_pattern, dict) or not all(_positive_number(v) for v in alpha_pattern.values()):
        raise LoraFormatError(f"{CONFIG_NAME}: alpha_pattern must map module patterns to positive alphas")
    targets = config.get("target_modules") or ()
    named = [targets] if isinstance(targets, str) else list(targets)
    for target in named:
        if target in EMBEDDING_MODULES:
            raise LoraFormatError(
                f"the adapter puts LoRA on {target} (embedding/lm_head LoRA), which loraplex "
                "does not support; retrain targeting the decoder's linear layers only"
            )
    return LoraSpec(
        rank=rank,
        alpha=float(alpha),
        use_rslora=bool(config.get("use_rslora")),
        rank_pattern=dict(rank_pattern),
        alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
        target_modules=targets if isinstance(targets, str) else tuple(sorted(targets)),
        base_model_name_or_path=config.get("base_model_name_or_path"),
    )


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def load_weights(raw: bytes) -> dict[str, torch.Tensor]:
    """The tensors of adapter_model.safetensors from its bytes (never a pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(raw)
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraFormatError(f"{WEIGHTS_NAME} is unreadable: {exc}") from None


def parse_weights(spec: LoraSpec, tensors: dict[str, torch.Tensor]) -> dict[str, LoraModule]:
    """{HF module path: LoraModule} from PEFT keys `base_model.model.<module>.lora_{A,B}.weight`.

    Checks each pair's ranks against the config (rank_pattern included) and that values are finite.
    """
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise LoraFormatError(_unsupported_tensor(key))
        module = match[1]
        if module.rpartition(".")[2] in EMBEDDING_MODULES:
            raise LoraFormatError(
                f"the adapter puts LoRA on {module} (embedding/lm_head LoRA), which loraplex "
                "does not support; retrain targeting the decoder's linear layers only"
            )
        found.setdefault(module, {})[match[2]] = tensor
    if not found:
        raise LoraFormatError(f"{WEIGHTS_NAME} holds no LoRA weights")
    modules = {}
    for module, ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            raise LoraFormatError(f"{module} has lora_{'A' if 'A' not in ab else 'B'} missing")
        a, b, rank = ab["A"], ab["B"], spec.module_rank(module)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise LoraFormatError(
                f"{module} has wrong shapes: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)} "
                f"for rank {rank} (from r / rank_pattern in {CONFIG_NAME})"
            )
        if not (a.is_floating_point() and b.is_floating_point()):
            raise LoraFormatError(f"{module} has non-float LoRA weights ({a.dtype}, {b.dtype})")
        if not bool(a.isfinite().all() and b.isfinite().all()):
            raise LoraFormatError(f"{module} has non-finite (NaN or inf) LoRA weights")
        modules[module] = LoraModule(a, b, spec.scaling(module))
    return modules


def _unsupported_tensor(key: str) -> str:
    if "lora_magnitude_vector" in key:
        return f"the adapter uses DoRA (tensor {key}), which loraplex does not support; retrain with use_dora=False"
    if "lora_embedding_" in key or set(key.split(".")) & set(EMBEDDING_MODULES):
        return (
            f"the adapter changes an embedding or lm_head (tensor {key}), which loraplex does not support; "
            "retrain targeting the decoder's linear layers only"
        )
    if key.endswith(".bias"):
        return f"the adapter trains bias terms ({key}), which loraplex does not support"
    return f"unsupported adapter tensor {key} (only LoRA A/B on linear layers are supported)"


def check_fits(modules: dict[str, LoraModule], shapes: dict[str, tuple[int, int]], max_rank: int | None) -> None:
    """Every adapted module exists in the base with matching (d_in, d_out), within the rank limit."""
    for module, lora in modules.items():
        if module not in shapes:
            raise LoraFormatError(
                f"the adapter targets {module}, which the base does not have (trained on another architecture?)"
            )
        d_in, d_out = shapes[module]
        if lora.a.shape[1] != d_in or lora.b.shape[0] != d_out:
            raise LoraFormatError(
                f"{module}: LoRA shapes A {tuple(lora.a.shape)}, B {tuple(lora.b.shape)} do not "
                f"fit the base's {d_in} -> {d_out} linear (trained on another base size?)"
            )
        if max_rank is not None and lora.rank > max_rank:
            raise LoraFormatError(
                f"{module} has rank {lora.rank}, above the maximum of {max_rank} "
                "(raise --max-lora-rank, or retrain with a smaller r)"
            )


def check_files(folder: Path, other_pickles_ok: bool = False) -> list[str]:
    """The folder has the config and safetensors weights, and no pickle files (never loaded).

    other_pickles_ok: pickles beside the safetensors weights (a trainer's training_args.bin) are
    returned instead of refused, for callers that copy only the two adapter files."""
    folder = Path(folder)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    weights_pickled = [name for name in pickles if name.startswith("adapter_model")]
    if pickles and (weights_pickled or not other_pickles_ok):
        raise LoraFormatError(
            f"the adapter contains pickle files ({', '.join(weights_pickled or pickles)}); only "
            "safetensors are loaded: re-save it with save_pretrained(..., safe_serialization=True)"
            + ("" if other_pickles_ok else " and delete them")
        )
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise LoraFormatError(f"not a PEFT LoRA adapter folder: {folder} has no {name}")
    return pickles


def read_config(folder: Path) -> LoraSpec:
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise LoraFormatError(f"not a PEFT LoRA adapter folder: {folder} has no {CONFIG_NAME}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoraFormatError(f"{CONFIG_NAME} is not valid JSON ({exc})") from None
    return parse_config(config)


def read_adapter(folder: Path, other_pickles_ok: bool = False) -> tuple[LoraSpec, dict[str, LoraModule]]:
    """Files, config and weights of a PEFT adapter folder, all checked; the base is not consulted."""
    folder = Path(folder)
    check_files(folder, other_pickles_ok)
    spec = read_config(folder)
    return spec, parse_weights(spec, load_weights((folder / WEIGHTS_NAME).read_bytes()))


def base_linear_shapes(base_dir: str | Path) -> dict[str, tuple[int, int]]:
    """{module path: (d_in, d_out)} of a base's decoder linears, from config.json on the meta device.

    What an adapter may target: the linears of the decoder layers (PEFT's all-linear set).
    The meta device allocates nothing, so checking an adapter never loads the base's weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if ".layers." in f".{name}" and isinstance(module, torch.nn.Linear)
    }
