"""The stages `convert` runs, each a plain function: merge, export, verify."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loraplex.convert.verify import (
    GGUFModel,
    HFModel,
    compare,
    eval_sequences,
    excess_over_base,
    excess_passes,
    excess_rule,
    mean_completion_loss,
    write_report,
)
from loraplex.training.errors import DataError


def merge_to_hf(
    base: Path, adapter: Path | None, out_dir: Path, dtype: str, merge_into: str, force: bool = False
) -> Path:
    """The merged (or plain) dense model as a HF folder: the input of every exporter."""
    from transformers import AutoTokenizer

    from loraplex.convert.merge import DTYPES, check_adapter_matches_base, load_merge_base, merge_adapter, save_hf
    from loraplex.training.manifest import base_fingerprint

    fingerprint = base_fingerprint(base)
    provenance = {
        "base": str(base),
        "base_fingerprint": fingerprint,
        "dtype": dtype,
        "merge_into": merge_into if adapter else None,
        "adapter": str(adapter) if adapter else None,
    }
    if adapter is not None:
        check_adapter_matches_base(base, adapter, force, fingerprint=fingerprint)
        model = merge_adapter(base, adapter, dtype, merge_into)
    else:
        model = load_merge_base(base, DTYPES[dtype], merge_into)
    return save_hf(model, AutoTokenizer.from_pretrained(str(base)), out_dir, provenance)


def export_gguf(merged_dir: Path, out: Path, quant: str) -> Path:
    """The GGUF, and beside it <out>.export.json: provenance and the tensor types it really holds."""
    from loraplex.convert.gguf_export import read_config, sliding_window_note, tensor_type_report, write_gguf

    write_gguf(merged_dir, out, quant)
    provenance_file = merged_dir / "loraplex_export.json"
    record = {
        "artifact": str(out),
        "format": "gguf",
        "quant": quant.upper(),
        "provenance": json.loads(provenance_file.read_text()) if provenance_file.is_file() else None,
        "tensors": tensor_type_report(out, quant),
        "warnings": [note] if (note := sliding_window_note(read_config(merged_dir))) else [],
    }
    export_record_path(out).write_text(json.dumps(record, indent=2) + "\n")
    return out


def export_record_path(out: Path) -> Path:
    return out.with_suffix(".export.json")


def export_gguf_lora(base: Path, adapter: Path, out: Path, force: bool = False) -> Path:
    from loraplex.convert.gguf_lora import write_gguf_lora
    from loraplex.convert.merge import check_adapter_matches_base

    check_adapter_matches_base(base, adapter, force)
    return write_gguf_lora(base, adapter, out)


def export_awq(merged_dir: Path, out: Path, calib_data: str, calib_rows: int, bits: int, group_size: int) -> Path:
    from transformers import AutoTokenizer

    from loraplex.convert.awq_export import export_awq as run_awq
    from loraplex.training.data import load_jsonl, prompt_and_completion

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    rows = load_jsonl(calib_data)[:calib_rows]
    texts = ["".join(prompt_and_completion(row, tokenizer)) for row in rows]  # whole examples, as trained
    return run_awq(merged_dir, out, texts, bits=bits, group_size=group_size)


def _hf_reference(name: str, folder: Path) -> HFModel:
    """fp32 on CPU: the exported weights as they are, computed without extra rounding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return HFModel(name, model, AutoTokenizer.from_pretrained(str(folder)))


def _candidate(fmt: str, out: Path):
    if fmt == "hf":
        return _hf_reference(f"hf {out.name}", out)
    if fmt == "gguf":
        return GGUFModel(out)
    if fmt == "awq":
        from transformers import AutoTokenizer

        from loraplex.convert.awq_export import load_awq_for_check

        return HFModel(f"awq {out.name}", load_awq_for_check(out), AutoTokenizer.from_pretrained(str(out)))
    raise DataError(f"unknown format {fmt!r}")


def _sequences(cfg, tokenizer):
    from loraplex.training.data import load_jsonl

    rows = load_jsonl(cfg.eval_data)[: cfg.verify_rows] if cfg.eval_data else None
    return eval_sequences(tokenizer, rows)


def verify_export(cfg, base: Path, adapter: Path | None, merged_dir: Path, out: Path, scratch: Path) -> bool:
    reference = _hf_reference("merged fp16", merged_dir)
    sequences = _sequences(cfg, reference.tokenizer)
    comparisons = [compare(reference, _candidate(cfg.format, out), sequences)]
    report = {
        "artifact": str(out),
        "format": cfg.format,
        "quant": getattr(cfg, "quant", None),
        "base": str(base),
        "adapter": str(adapter) if adapter else None,
        "comparisons": comparisons,
        "min_agreement": cfg.agreement_floor(),
    }
    if adapter is not None and cfg.eval_data:
        report["merge_targets"] = compare_merge_targets(base, adapter, reference, cfg, sequences, scratch)
        report["adapter_on_bf16_base_exact_match"] = adapter_exact_match(base, adapter, sequences)
    if cfg.format == "gguf":
        _judge_gguf_on_excess(report, cfg, base, adapter, comparisons[0], sequences, out, scratch)
    else:
        report["passed"] = all(c.top1_agreement >= cfg.agreement_floor() for c in comparisons)
    return _publish(report, out if out.suffix else out / "export")


def _judge_gguf_on_excess(
    report: dict, cfg, base: Path, adapter: Path | None, export, sequences, out: Path, scratch: Path
) -> None:
    """Pass/fail on the export's damage beyond the base's own under the same quantization.

    The absolute agreement floor becomes a warning, unless the user set --min-agreement."""
    record = export_record_path(out)
    if record.is_file():
        exported = json.loads(record.read_text())
        report["quantization"], report["warnings"] = exported["tensors"], list(exported["warnings"])
    if adapter is None:  # the export is the base quantized: it is its own baseline
        baseline = export
    else:
        base_dir = merge_to_hf(base, None, scratch / "base-dense", cfg.dtype, cfg.merge_into)
        base_gguf = export_gguf(base_dir, scratch / "base-only.gguf", cfg.quant)
        baseline = compare(_hf_reference("base fp16", base_dir), GGUFModel(base_gguf), sequences, exact_match=False)
        baseline.model = f"base alone, {cfg.quant}"
    report["base_quantization"] = baseline
    report["excess"] = excess_over_base(export, baseline)
    report["rule"] = excess_rule(cfg.quant)
    passed = excess_passes(export, baseline)
    floor = cfg.agreement_floor()
    if export.top1_agreement < floor:
        note = (
            f"top-1 agreement {export.top1_agreement:.2%} is below the {cfg.quant} floor {floor:.2%} "
            f"(the base alone under {cfg.quant}: {baseline.top1_agreement:.2%})"
        )
        if cfg.min_agreement is not None:  # asked for explicitly: binding
            passed = False
            report["rule"] += f"; and top-1 agreement >= --min-agreement {floor}"
        report.setdefault("warnings", []).append(note)
    report["passed"] = passed


def _publish(report: dict, out_base: Path) -> bool:
    json_path, md_path = write_report(report, out_base)
    print(md_path.read_text())
    print(f"[convert] report: {json_path}")
    return report["passed"]


def compare_merge_targets(base: Path, adapter: Path, merged: HFModel, cfg, sequences, scratch: Path) -> dict:
    """Eval loss of the merge just exported (`merged`) and of the other merge target."""
    other = "nf4-dequant" if cfg.merge_into == "fp16" else "fp16"
    other_dir = merge_to_hf(base, adapter, scratch / f"merged-{other}", cfg.dtype, other, force=True)
    losses = {
        cfg.merge_into: mean_completion_loss(merged, sequences),
        other: mean_completion_loss(_hf_reference(other, other_dir), sequences),
    }
    return {"eval_loss": losses, "better": min(losses, key=losses.get)}


def adapter_exact_match(base: Path, adapter: Path, sequences) -> float:
    """The bar's yardstick: the adapter as PEFT runs it on the bf16 base."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from loraplex.convert.verify import exact_match_rate
    from loraplex.training.quant import load_dense_base

    model = PeftModel.from_pretrained(load_dense_base(base, torch.bfloat16, "cpu"), str(adapter))
    runner = HFModel("adapter on bf16 base", model, AutoTokenizer.from_pretrained(str(base)))
    pairs = [(p, c) for p, c, _, _ in sequences if c]
    return exact_match_rate(runner, pairs, 24)


def verify_gguf_lora(cfg, base: Path, adapter: Path, lora_gguf: Path, scratch: Path) -> bool:
    """Base GGUF F16 + the GGUF LoRA in llama.cpp against the HF merge of the same adapter."""
    merged_dir = merge_to_hf(base, adapter, scratch / "merged", "fp16", "fp16", force=True)
    base_gguf = export_gguf(merge_to_hf(base, None, scratch / "base", "fp16", "fp16"), scratch / "base.gguf", "F16")
    reference = _hf_reference("merged fp16", merged_dir)
    sequences = _sequences(cfg, reference.tokenizer)
    with_lora = compare(reference, GGUFModel(base_gguf, lora_path=lora_gguf), sequences)
    merged_gguf = GGUFModel(export_gguf(merged_dir, scratch / "merged.gguf", "F16"))
    comparisons = [
        with_lora,
        compare(reference, merged_gguf, sequences, reference_exact_match=with_lora.reference_exact_match),
    ]
    report = {
        "artifact": str(lora_gguf),
        "format": "gguf-lora",
        "base": str(base),
        "adapter": str(adapter),
        "comparisons": comparisons,
        "min_agreement": cfg.agreement_floor(),
        "passed": comparisons[0].top1_agreement >= cfg.agreement_floor(),
    }
    if comparisons[0].exact_match is not None:  # the LoRA at runtime vs the same adapter merged
        report["lora_vs_merged_exact_match_points"] = 100 * (comparisons[0].exact_match - comparisons[1].exact_match)
    return _publish(report, lora_gguf)
