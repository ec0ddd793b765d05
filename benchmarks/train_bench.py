"""Training benchmark: QLoRA vs bf16 LoRA vs full bf16 fine-tuning on the same model and data.

Each method runs in its own subprocess so peak memory is its own. Prints a table and writes JSON.

    python benchmarks/train_bench.py [--base-model DIR] [--steps 20] [--out benchmarks/results/train.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METHODS = ("qlora", "lora_bf16", "full_bf16")


def _weight_bytes(model) -> int:
    """Bytes the weights occupy, including NF4 packing and quantization statistics."""
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total


def _peak_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(method: str, base_dir: Path, device: str):
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from loraplex.training.quant import load_dense_base, load_nf4_base

    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    if method == "qlora":
        model = prepare_model_for_kbit_training(load_nf4_base(base_dir, device))
        model = get_peft_model(model, lora)
        optimizer_cls = bnb.optim.PagedAdamW32bit
    else:
        model = load_dense_base(base_dir, torch.bfloat16, device)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method == "lora_bf16":
            model.enable_input_require_grads()
            model = get_peft_model(model, lora)
        optimizer_cls = torch.optim.AdamW
    params = [p for p in model.parameters() if p.requires_grad]
    return model, optimizer_cls(params, lr=1e-4), sum(p.numel() for p in params)


def run_one(method: str, base_dir: Path, steps: int, batch_size: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    from loraplex.training.data import CompletionCollator, encode_example, load_jsonl
    from loraplex.training.demo import tenant_data

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rss_before = _peak_bytes(device)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    rows = load_jsonl(tenant_data("globex-routing")[0])
    examples = [encode_example(tokenizer, r, 256) for r in rows[: batch_size * (steps + 3)]]
    collate = CompletionCollator(tokenizer.pad_token_id)
    model, optimizer, trainable = build(method, base_dir, device)
    model.train()
    tokens, started = 0, None
    for step in range(steps + 3):
        if step == 3:  # warm-up steps are not timed
            torch.cuda.synchronize() if device == "cuda" else None
            started, tokens = time.perf_counter(), 0
        batch = {k: v.to(device) for k, v in collate(examples[step * batch_size : (step + 1) * batch_size]).items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    torch.cuda.synchronize() if device == "cuda" else None
    elapsed = time.perf_counter() - started
    return {
        "method": method,
        "device": device,
        "trainable_params": trainable,
        "weight_bytes": _weight_bytes(model),
        "peak_bytes": _peak_bytes(device),
        "peak_bytes_over_start": _peak_bytes(device) - (0 if device == "cuda" else rss_before),
        "tokens_per_s": tokens / elapsed,
        "final_loss": float(loss),
        "steps": steps,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", type=Path, default=None, help="default: the embedded base")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train.json"))
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()

    from loraplex.training.base import ensure_base

    base_dir = args.base_model or ensure_base()
    if args.method:
        print(json.dumps(run_one(args.method, base_dir, args.steps, args.batch_size)))
        return 0
    results = []
    for method in METHODS:
        print(f"running {method} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--method",
                method,
                "--base-model",
                str(base_dir),
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    mib = 1 << 20
    print(f"\nbase {base_dir}, device {results[0]['device']}, batch {args.batch_size}, {args.steps} timed steps")
    print(f"{'method':<11}{'trainable':>12}{'weights MiB':>13}{'peak MiB':>10}{'peak-start MiB':>16}{'tokens/s':>10}")
    for r in results:
        print(
            f"{r['method']:<11}{r['trainable_params']:>12,}{r['weight_bytes'] / mib:>13.1f}"
            f"{r['peak_bytes'] / mib:>10.0f}{r['peak_bytes_over_start'] / mib:>16.0f}{r['tokens_per_s']:>10.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"base_model": str(base_dir), "batch_size": args.batch_size, "steps": args.steps, "results": results},
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
