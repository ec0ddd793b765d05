"""`convert`: merge an adapter at FP16, export to HF / GGUF / AWQ or a GGUF LoRA, then verify.

convert merge-export --base DIR [--adapter DIR] --out PATH --format {hf,gguf,awq} ...
convert adapter-export --base DIR --adapter DIR --out FILE.gguf --format gguf-lora
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.training.architectures import read_model_config, require_convert_architecture
from loraplex.training.errors import ConfigError, LoraplexError

GGUF_QUANTS = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K")
# Top-1 agreement over every position (prompt tokens too, where even the FP16 model is unsure):
# 4-bit formats flip near-ties there while exact match stays put, so their floor is lower.
DEFAULT_MIN_AGREEMENT = {
    "hf": 0.99,
    "F16": 0.99,
    "BF16": 0.97,
    "Q8_0": 0.97,
    "Q6_K": 0.95,
    "Q5_K_M": 0.92,
    "Q4_K_M": 0.85,
    "Q4_0": 0.85,
    "awq": 0.85,
    "gguf-lora": 0.99,
}


def _opt(help: str, choices=None):
    return {"help": help, **({"choices": choices} if choices else {})}


@dataclass(frozen=True)
class VerifyOptions:
    verify: bool = field(default=True, metadata=_opt("compare the export with the merged FP16 model (default on)"))
    eval_data: str | None = field(default=None, metadata=_opt("JSONL {prompt, completion}: exact match + eval loss"))
    verify_rows: int = field(default=100, metadata=_opt("eval rows used by verify"))
    min_agreement: float | None = field(
        default=None,
        metadata=_opt(
            "fail (exit 1) below this top-1 agreement; default by precision (DEFAULT_MIN_AGREEMENT), which for "
            "GGUF only warns: its verdict keys on the excess over the base's own quantization damage"
        ),
    )

    def agreement_floor(self) -> float:
        if self.min_agreement is not None:
            return self.min_agreement
        key = getattr(self, "quant", "F16") if getattr(self, "format", "") == "gguf" else getattr(self, "format", "")
        return DEFAULT_MIN_AGREEMENT.get(key, 0.99)


@dataclass(frozen=True)
class MergeExportConfig(VerifyOptions):
    base: str = field(default="", metadata=_opt("HF checkpoint of the base (required)"))
    out: str = field(default="", metadata=_opt("output: a folder (hf, awq) or a .gguf file (required)"))
    format: str = field(default="hf", metadata=_opt("artifact format", ["hf", "gguf", "awq"]))
    adapter: str | None = field(default=None, metadata=_opt("PEFT adapter folder; omit to export the base alone"))
    dtype: str = field(default="fp16", metadata=_opt("dense dtype of the merge", ["fp16", "bf16"]))
    merge_into: str = field(default="fp16", metadata=_opt("merge target", ["fp16", "nf4-dequant"]))
    quant: str = field(default="F16", metadata=_opt("GGUF tensor type", list(GGUF_QUANTS)))
    calib_data: str | None = field(
        default=None, metadata=_opt("AWQ calibration JSONL ({prompt, completion} or {messages} rows)")
    )
    calib_rows: int = field(default=128, metadata=_opt("AWQ calibration rows used"))
    bits: int = field(default=4, metadata=_opt("AWQ weight bits"))
    group_size: int = field(default=128, metadata=_opt("AWQ quantization group size"))
    force: bool = field(default=False, metadata=_opt("merge even if the adapter names another base"))
    work_dir: str | None = field(default=None, metadata=_opt("keep the merged HF folder here (gguf/awq)"))

    def __post_init__(self) -> None:
        if not self.base or not self.out:
            raise ConfigError("--base and --out are required")
        if self.format == "awq" and not self.calib_data:
            raise ConfigError("--format awq needs --calib-data FILE.jsonl (activation-aware: it calibrates)")
        if self.format == "awq" and self.bits != 4:
            raise ConfigError(f"--bits {self.bits}: AWQ export supports 4 bits")
        if self.group_size <= 0:
            raise ConfigError("--group-size must be positive")


@dataclass(frozen=True)
class AdapterExportConfig(VerifyOptions):
    base: str = field(default="", metadata=_opt("HF checkpoint of the base (required)"))
    adapter: str = field(default="", metadata=_opt("PEFT adapter folder (required)"))
    out: str = field(default="", metadata=_opt("output .gguf file (required)"))
    format: str = field(default="gguf-lora", metadata=_opt("adapter format", ["gguf-lora"]))
    force: bool = field(default=False, metadata=_opt("export even if the adapter names another base"))

    def __post_init__(self) -> None:
        if not (self.base and self.adapter and self.out):
            raise ConfigError("--base, --adapter and --out are required")


def _existing_dir(path: str, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{what} not found: {folder}")
    return folder


def _stage(name: str):
    started = time.monotonic()
    print(f"[convert] {name} ...", flush=True)
    return lambda: print(f"[convert] {name} done in {time.monotonic() - started:.1f}s", flush=True)


def merge_export(cfg: MergeExportConfig) -> int:
    from loraplex.convert import pipeline

    base = _existing_dir(cfg.base, "base model")
    adapter = _existing_dir(cfg.adapter, "adapter") if cfg.adapter else None
    if cfg.format == "gguf":  # refuse before the merge, not after it
        require_convert_architecture(read_model_config(base))
    out = Path(cfg.out)
    with tempfile.TemporaryDirectory(prefix="loraplex-merge-") as scratch:
        merged_dir = Path(cfg.work_dir) if cfg.work_dir else (out if cfg.format == "hf" else Path(scratch) / "merged")
        done = _stage("merge" if adapter else "load base")
        pipeline.merge_to_hf(base, adapter, merged_dir, cfg.dtype, cfg.merge_into, cfg.force)
        done()
        if cfg.format == "gguf":
            done = _stage(f"gguf {cfg.quant}")
            pipeline.export_gguf(merged_dir, out, cfg.quant)
            done()
        elif cfg.format == "awq":
            done = _stage(f"awq w{cfg.bits} g{cfg.group_size}")
            pipeline.export_awq(merged_dir, out, cfg.calib_data, cfg.calib_rows, cfg.bits, cfg.group_size)
            done()
        print(f"[convert] wrote {out}")
        if not cfg.verify:
            return 0
        done = _stage("verify")
        passed = pipeline.verify_export(cfg, base, adapter, merged_dir, out, Path(scratch))
        done()
    return 0 if passed else 1


def adapter_export(cfg: AdapterExportConfig) -> int:
    from loraplex.convert import pipeline

    base = _existing_dir(cfg.base, "base model")
    adapter = _existing_dir(cfg.adapter, "adapter")
    require_convert_architecture(read_model_config(base))
    out = Path(cfg.out)
    done = _stage("gguf-lora")
    pipeline.export_gguf_lora(base, adapter, out, cfg.force)
    done()
    print(f"[convert] wrote {out}")
    if not cfg.verify:
        return 0
    with tempfile.TemporaryDirectory(prefix="loraplex-lora-") as scratch:
        done = _stage("verify")
        passed = pipeline.verify_gguf_lora(cfg, base, adapter, out, Path(scratch))
        done()
    return 0 if passed else 1


COMMANDS = {
    "merge-export": (MergeExportConfig, merge_export, "merge an adapter at FP16 and export hf/gguf/awq"),
    "adapter-export": (AdapterExportConfig, adapter_export, "write an adapter alone as a GGUF LoRA"),
}


def main(argv: list[str] | None = None) -> int:
    from loraplex.dataclass_cli import parse_dataclass_args

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"usage: convert {{{names}}} [--help] ...\n{__doc__}", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    cls, run, description = COMMANDS[argv[0]]
    try:
        cfg = parse_dataclass_args(cls, argv[1:], f"convert {argv[0]}", description)
        return run(cfg)
    except LoraplexError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
