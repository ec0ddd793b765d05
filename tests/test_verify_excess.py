"""Verify on a hidden-576 model (SmolLM2-shaped): Q4_K_M falls back on rows of 576, the export
record and the verify report say so, and the verdict keys on the excess over the base's own
quantization damage. Real merge, real llama.cpp quantizer, real llama.cpp logits."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is part of the dev setup (make test)")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from loraplex.convert.cli import MergeExportConfig, merge_export
    from loraplex.training.random_adapter import make_random_adapter
    from loraplex.training.random_checkpoint import build_family

    root = tmp_path_factory.mktemp("verify576")
    # std 0.05: peakier next-token distributions than HF's 0.02 init, closer to a trained model's
    base = build_family("smollm2-135m", root / "base", std=0.05)
    adapter = make_random_adapter(base, root / "adapter", seed=5, rank=8, std=0.1)
    cfg = MergeExportConfig(
        base=str(base),
        adapter=str(adapter),
        out=str(root / "smol.gguf"),
        format="gguf",
        quant="Q4_K_M",
        work_dir=str(root / "merged"),
    )
    return root, cfg, merge_export(cfg)


def test_export_record_names_the_tensors_that_fell_back(exported):
    root, _, _ = exported
    record = json.loads((root / "smol.export.json").read_text())
    tensors = record["tensors"]
    fell_back = {f["tensor"]: f for f in tensors["fallbacks"]}
    assert fell_back["blk.0.attn_q.weight"]["type"] == "Q5_0"  # llama.cpp's fallback for Q4_K
    assert fell_back["blk.0.attn_q.weight"]["reason"] == "row of 576 not a multiple of 256"
    assert "blk.0.ffn_down.weight" not in fell_back  # rows of 1536 = 6 x 256 stay k-quants
    assert tensors["tensor_types"].get("Q4_K", 0) + tensors["tensor_types"].get("Q6_K", 0) > 0
    assert len(fell_back) > tensors["weight_tensors"] // 2 and "fell back" in tensors["summary"]
    assert record["provenance"]["adapter"].endswith("adapter")


def test_verdict_keys_on_the_excess_over_the_base_alone(exported):
    root, cfg, exit_code = exported
    report = json.loads((root / "smol.verify.json").read_text())
    export, base = report["comparisons"][0], report["base_quantization"]
    excess = report["excess"]
    print(
        f"\nhidden 576, Q4_K_M: base alone KL {base['mean_kl']:.5f} agreement {base['top1_agreement']:.2%}; "
        f"export KL {export['mean_kl']:.5f} agreement {export['top1_agreement']:.2%}; "
        f"KL ratio {excess['kl_ratio']:.2f}, agreement {100 * excess['agreement_diff']:+.1f} points"
    )
    assert report["quantization"]["fallbacks"]  # the verify report records the fallbacks too
    assert excess["kl_ratio"] == pytest.approx(export["mean_kl"] / base["mean_kl"])
    assert "the base's own Q4_K_M KL" in report["rule"]
    # this small model quantizes badly with or without the adapter: below the fixed Q4_K_M floor,
    # which only warns now, while the excess over the base is small and the export passes
    assert export["top1_agreement"] < cfg.agreement_floor()
    assert any("below the Q4_K_M floor" in w for w in report["warnings"])
    assert report["passed"] and exit_code == 0
    markdown = (root / "smol.verify.md").read_text()
    assert "Excess over the base's own quantization damage" in markdown and "fell back" in markdown
    assert report["rule"] in markdown


def test_an_export_that_lost_its_adapter_fails_on_the_excess(exported):
    """The base's own Q4_K_M GGUF, judged as if it were the merged export: the adapter is missing."""
    from loraplex.convert import pipeline
    from loraplex.convert.verify import excess_passes

    root, cfg, _ = exported
    lost = _base_only_gguf(root)
    assert (
        pipeline.verify_export(cfg, root / "base", root / "adapter", root / "merged", lost, root / "scratch") is False
    )
    report = json.loads((root / "lost.verify.json").read_text())
    export = report["comparisons"][0]
    assert report["excess"]["kl_ratio"] > 10, report["excess"]
    assert not report["passed"]
    assert not excess_passes(_as_comparison(export), _as_comparison(report["base_quantization"]))


def _base_only_gguf(root):
    from loraplex.convert import pipeline

    (root / "scratch").mkdir(exist_ok=True)
    dense = pipeline.merge_to_hf(root / "base", None, root / "base-dense", "fp16", "fp16")
    return pipeline.export_gguf(dense, root / "lost.gguf", "Q4_K_M")


def _as_comparison(data: dict):
    from loraplex.convert.verify import Comparison

    return Comparison(**data)
