"""The QLoRA recipe's settings: one frozen dataclass filled from flags and/or a YAML recipe."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from loraplex.training.errors import ConfigError

OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch")


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class TrainConfig:
    data: str = field(metadata={"help": "training JSONL: {prompt, completion} or {messages} rows"})
    output: str = field(metadata={"help": "adapter folder to write (PEFT files + loraplex.json)"})
    eval_data: str | None = _opt(None, "held-out JSONL for eval loss and exact match")
    base_model: str | None = _opt(None, "local HF checkpoint; default: the embedded base")
    adapter_id: str | None = _opt(None, "tenant adapter ID recorded in the manifest; default: output folder name")
    lora_r: int = _opt(32, "LoRA rank (32: at 16 acme-fiscal seed 42 stuck at 75%, see README seed sweep)")
    lora_alpha: float = _opt(64.0, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA input")
    target_modules: list[str] = _opt(("all-linear",), "module names to adapt; 'all-linear' = every linear but the head")
    optimizer: str = _opt("paged_adamw_32bit", "bitsandbytes paged AdamW (8- or 32-bit state)", choices=OPTIMIZERS)
    learning_rate: float = _opt(2e-3, "peak learning rate")
    max_steps: int = _opt(600, "optimizer steps")
    batch_size: int = _opt(16, "examples per device step (per worker)")
    workers: int = _opt(1, "data-parallel workers on Ray Train (gloo on CPU, NCCL on GPU); 1 = this process")
    grad_accum: int = _opt(1, "gradient accumulation steps")
    warmup_ratio: float = _opt(0.05, "fraction of steps spent warming up")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    gradient_checkpointing: bool = _opt(True, "recompute activations in backward to save memory")
    eval_steps: int = _opt(150, "run the eval loss every N steps")
    max_seq_len: int = _opt(256, "truncate examples to this many tokens")
    seed: int = _opt(42, "seed for LoRA init, shuffling and dropout")
    resume: str | None = _opt(None, "'latest' or a checkpoint folder to resume from")
    keep_checkpoints: bool = _opt(False, "keep <output>/checkpoints (pickled optimizer state) after success")
    eval_limit: int | None = _opt(None, "score exact match on at most N eval rows")
    packing: bool = _opt(
        False,
        "pack several examples into each row of up to max_seq_len tokens; "
        "attention stays within each example (position IDs restart)",
    )
    early_stopping_patience: int = _opt(
        0,
        "stop after N evaluations (every eval_steps) without a lower "
        "eval loss, keeping the best adapter; 0 = off; needs eval data",
    )
    keep_best: bool = _opt(
        False,
        "write the adapter from the evaluation with the lowest eval loss, "
        "not the last step; needs eval data (on with early stopping)",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", list(self.target_modules))
        checks = [
            (self.lora_r > 0, "lora_r must be positive"),
            (self.lora_alpha > 0, "lora_alpha must be positive"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.learning_rate > 0, "learning_rate must be positive"),
            (self.max_steps > 0, "max_steps must be positive"),
            (self.batch_size > 0 and self.grad_accum > 0, "batch_size and grad_accum must be positive"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.eval_steps > 0, "eval_steps must be positive"),
            (self.max_seq_len > 8, "max_seq_len must be above 8"),
            (bool(self.target_modules), "target_modules must not be empty"),
            (self.early_stopping_patience >= 0, "early_stopping_patience must be 0 (off) or positive"),
            (
                self.eval_data is not None or not (self.early_stopping_patience or self.keep_best),
                "--early-stopping-patience and --keep-best need --eval-data (they pick by eval loss)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def picks_best(self) -> bool:
        """Whether the adapter written is the best evaluated one rather than the last."""
        return self.keep_best or self.early_stopping_patience > 0

    def as_dict(self) -> dict:
        return asdict(self)
