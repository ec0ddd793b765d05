"""Data-parallel QLoRA on Ray Train: `python training/run.py ... --workers N`.

Ray Train's TorchTrainer starts N workers and their process group (gloo on CPU, NCCL on GPU);
inside each, the recipe in training/run.py runs unchanged: Hugging Face Trainer sees the
process group, wraps the model in DDP and shards the data. Rank 0 writes the adapter.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from loraplex.training.config import TrainConfig
from loraplex.training.manifest import read_manifest


def train_data_parallel(cfg: TrainConfig, run_recipe: Callable[[TrainConfig], dict]) -> dict:
    """Run `run_recipe` (run.py's train, passed in so this module never imports run.py) in N workers."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # workers run in their own directories: hand them absolute paths
    cfg = dataclasses.replace(cfg, **{
        key: str(Path(value).resolve()) for key in ("data", "eval_data", "output", "base_model")
        if (value := getattr(cfg, key))})

    def worker_loop(_: dict) -> None:
        run_recipe(cfg)

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=True)
    trainer = TorchTrainer(
        worker_loop,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=torch.cuda.is_available()),
        run_config=RunConfig(name="loraplex-train", storage_path=tempfile.mkdtemp(prefix="loraplex-ray-train-")),
    )
    trainer.fit()
    return read_manifest(cfg.output)
