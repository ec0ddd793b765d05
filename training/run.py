"""The QLoRA recipe, top to bottom: NF4 base + LoRA on all linear layers -> a PEFT adapter folder.

python training/run.py --data train.jsonl --eval-data eval.jsonl --output adapters/acme
python training/run.py --config recipe.yaml --resume latest
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python training/run.py` from a checkout: make `training` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from loraplex.training.adapter_id import validate_adapter_id
from loraplex.training.config import TrainConfig
from loraplex.training.errors import ConfigError, LoraplexError
from loraplex.training.manifest import base_fingerprint, check_same_base, file_sha256, write_manifest
from loraplex.training.quant import nf4_settings

RUN_STATE = "loraplex_run.json"  # written at start, read by --resume to refuse another base


def resolve_base(base_model: str | None) -> Path:
    from loraplex.training.base import ensure_base

    if base_model is None:
        return ensure_base()
    path = Path(base_model)
    if not (path / "config.json").is_file():
        raise ConfigError(f"--base-model is not a Hugging Face checkpoint folder: {path}")
    return path


def check_resume(cfg: TrainConfig, output: Path, fingerprint: str) -> str | None:
    """The checkpoint to resume from, after checking it was trained on this base."""
    if cfg.resume is None:
        return None
    state_path = output / RUN_STATE
    if not state_path.is_file():
        raise ConfigError(f"--resume: no earlier run in {output} (missing {RUN_STATE})")
    check_same_base(fingerprint, json.loads(state_path.read_text())["base_fingerprint"], f"the run in {output}")
    if cfg.resume != "latest":
        if not Path(cfg.resume).is_dir():
            raise ConfigError(f"--resume: checkpoint folder not found: {cfg.resume}")
        return cfg.resume
    checkpoints = sorted((output / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not checkpoints:
        raise ConfigError(f"--resume latest: no checkpoints in {output / 'checkpoints'}")
    return str(checkpoints[-1])


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def checkpointing_args(enabled: bool) -> dict:
    """Transformers 5.x renamed gradient_checkpointing to activation_checkpointing; accept both."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: enabled, f"{key}_kwargs": {"use_reentrant": False}}


def describe_optimizer(trainer) -> dict:
    """What actually ran. bitsandbytes pages state only on CUDA, and only for tensors of 1e5+ elements."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    states = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    devices = {_state_device(t) for t in states}
    return {
        "class": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "paged": bool(getattr(optimizer, "is_paged", False)),
        "paged_state_tensors": sum(bool(getattr(t, "is_paged", False)) for t in states),
        "state_device": "cuda" if "cuda" in devices else next(iter(devices), None),
    }


def _state_device(tensor: torch.Tensor) -> str:
    # a paged tensor is a CPU view of CUDA managed memory; bitsandbytes records its GPU
    return "cuda" if getattr(tensor, "is_paged", False) else tensor.device.type


def build_qlora_model(base_dir: Path, cfg: TrainConfig):
    """NF4 base (double quant; bf16 compute where the hardware has it, see quant.compute_dtype), prepared
    for k-bit training, with LoRA attached."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from loraplex.training.quant import load_nf4_base

    model = load_nf4_base(base_dir)
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    targets = "all-linear" if cfg.target_modules == ["all-linear"] else cfg.target_modules
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:  # PEFT names the target modules it could not find
        raise ConfigError(f"LoRA target modules: {exc}") from None


def selection_record(cfg: TrainConfig, trainer, examples: int, rows: int) -> dict:
    """Which step the written adapter comes from, whether training stopped early, how data was packed."""
    state = trainer.state
    best = state.best_model_checkpoint
    record = {
        "adapter_from": "best eval loss" if cfg.picks_best and best else "last step",
        "stopped_early": bool(cfg.early_stopping_patience) and state.global_step < cfg.max_steps,
        "log": "train_log.csv",
    }
    if cfg.picks_best and best:
        record.update(best_step=int(Path(best).name.split("-")[-1]), best_eval_loss=state.best_metric)
    if cfg.packing:
        record["packing"] = {"examples": examples, "rows": rows}
    return record


def train(cfg: TrainConfig, in_worker: bool = False) -> dict:
    """The whole recipe. With workers > 1 it runs in each Ray Train worker; rank 0 writes."""
    if cfg.workers > 1 and not in_worker:
        from loraplex.training.distributed import train_data_parallel

        return train_data_parallel(cfg, functools.partial(train, in_worker=True))
    from transformers import AutoTokenizer, EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

    from loraplex.training.callbacks import CsvLogCallback
    from loraplex.training.data import CompletionCollator, PackedCollator, encode_example, load_jsonl, pack_examples
    from loraplex.training.evaluate import exact_match

    started = time.time()
    output = Path(cfg.output)
    adapter_id = validate_adapter_id(cfg.adapter_id or output.name)
    train_rows = load_jsonl(cfg.data)
    eval_rows = load_jsonl(cfg.eval_data) if cfg.eval_data else []
    base_dir = resolve_base(cfg.base_model)
    fingerprint = base_fingerprint(base_dir)
    resume_from = check_resume(cfg, output, fingerprint)

    rank_zero = int(os.environ.get("RANK", "0")) == 0  # set in Ray Train workers
    output.mkdir(parents=True, exist_ok=True)
    if rank_zero:
        (output / RUN_STATE).write_text(
            json.dumps({"base_fingerprint": fingerprint, "config": cfg.as_dict()}, indent=2)
        )
    set_seed(cfg.seed)

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if tokenizer.pad_token_id is None:  # Llama-style tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token
    train_set = [encode_example(tokenizer, row, cfg.max_seq_len) for row in train_rows]
    eval_set = [encode_example(tokenizer, row, cfg.max_seq_len) for row in eval_rows]
    examples = len(train_set)
    if cfg.packing:  # eval stays unpacked: its loss is comparable with unpacked runs
        train_set = pack_examples(train_set, cfg.max_seq_len)

    model = build_qlora_model(base_dir, cfg)
    model.config.use_cache = False  # a training forward needs no KV cache (and packing needs none)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"base {base_dir} ({fingerprint[:19]}...), adapter '{adapter_id}', "
        f"{trainable:,} trainable parameters, {examples} train / {len(eval_set)} eval rows"
        + (f", packed into {len(train_set)} rows of <= {cfg.max_seq_len} tokens" if cfg.packing else ""),
        flush=True,
    )

    args = TrainingArguments(
        output_dir=str(output / "checkpoints"),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size * 2,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=int(cfg.warmup_ratio * cfg.max_steps),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optimizer,
        **checkpointing_args(cfg.gradient_checkpointing),
        eval_strategy="steps" if eval_set else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.eval_steps,
        save_total_limit=2,
        load_best_model_at_end=cfg.picks_best,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=max(1, min(10, cfg.max_steps // 20)),
        seed=cfg.seed,
        report_to="none",
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        use_cpu=not torch.cuda.is_available(),
    )
    callbacks = [CsvLogCallback(output)]
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set or None,
        data_collator=(PackedCollator if cfg.packing else CompletionCollator)(tokenizer.pad_token_id),
        callbacks=callbacks,
    )
    eval_loss_before = trainer.evaluate()["eval_loss"] if eval_set and resume_from is None else None
    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = {"train_loss": result.training_loss}
    if eval_loss_before is not None:
        metrics["eval_loss_before"] = eval_loss_before
    if eval_set:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]  # every rank: evaluate is collective
    if not trainer.is_world_process_zero():
        return {}
    model.config.use_cache = True

    model.save_pretrained(str(output), safe_serialization=True)
    tokenizer.save_pretrained(str(output))
    if eval_set:
        scored = eval_rows[: cfg.eval_limit] if cfg.eval_limit else eval_rows
        metrics["eval_exact_match"], _ = exact_match(model, tokenizer, scored)
        metrics["eval_rows_scored"] = len(scored)
    manifest = {
        "adapter_id": adapter_id,
        "base_model": str(base_dir),
        "base_fingerprint": fingerprint,
        "lora": {
            "r": cfg.lora_r,
            "alpha": cfg.lora_alpha,
            "dropout": cfg.lora_dropout,
            "target_modules": sorted(model.peft_config["default"].target_modules),
        },
        "quantization": nf4_settings(),
        "optimizer": {
            "name": cfg.optimizer,
            "learning_rate": cfg.learning_rate,
            "schedule": "cosine",
            "warmup_ratio": cfg.warmup_ratio,
            "max_grad_norm": cfg.max_grad_norm,
            **describe_optimizer(trainer),
        },
        "data": {"train": {"path": cfg.data, "sha256": file_sha256(cfg.data), "rows": len(train_rows)}}
        | (
            {"eval": {"path": cfg.eval_data, "sha256": file_sha256(cfg.eval_data), "rows": len(eval_rows)}}
            if cfg.eval_data
            else {}
        ),
        "steps": trainer.state.global_step,
        "selection": selection_record(cfg, trainer, examples, len(train_set)),
        "trainable_parameters": trainable,
        "metrics": metrics,
        "wall_time_s": round(time.time() - started, 1),
        "peak_memory_bytes": peak_memory_bytes(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "world_size": args.world_size,
        "config": cfg.as_dict(),
    }
    write_manifest(output, manifest)
    if not cfg.keep_checkpoints:  # checkpoints hold pickled optimizer state: keep adapters pickle-free
        shutil.rmtree(output / "checkpoints", ignore_errors=True)
        (output / RUN_STATE).unlink(missing_ok=True)
    return manifest


def main(argv: list[str] | None = None) -> int:
    from loraplex.dataclass_cli import parse_dataclass_args

    try:
        cfg = parse_dataclass_args(TrainConfig, argv, "python training/run.py", __doc__.split("\n")[0])
        manifest = train(cfg)
    except LoraplexError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics = manifest["metrics"]
    summary = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    print(f"adapter written to {cfg.output} in {manifest['wall_time_s']}s: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
