"""Data-parallel QLoRA on Ray Train: `python training/run.py ... --workers N`.

Ray Train's TorchTrainer starts N workers and their process group (gloo on CPU, NCCL on GPU);
inside each, the recipe in training/run.py runs unchanged: Hugging Face Trainer sees the
process group, wraps the model in DDP and shards the data. Rank 0 writes the adapter.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from loraplex.training.config import TrainConfig
from loraplex.training.errors import ConfigError
from loraplex.training.manifest import read_manifest

# What `pip install 'ray[train]'` adds over the ray that serving installs (import names).
RAY_TRAIN_DEPENDENCIES = ("ray", "pandas", "pyarrow", "fsspec", "tensorboardX", "requests", "pydantic")


def require_ray_train(workers: int) -> None:
    """One line naming the fix, instead of Ray's traceback about pandas from deep inside Ray Train."""
    missing = [name for name in RAY_TRAIN_DEPENDENCIES if importlib.util.find_spec(name) is None]
    if not missing:
        try:
            importlib.import_module("ray.train.torch")
        except ImportError as exc:  # a dependency of a dependency, or a broken install
            missing.append(exc.name or str(exc).splitlines()[0])
    if missing:
        raise ConfigError(
            f"--workers {workers} needs Ray Train, which is missing {', '.join(missing)}: "
            f"pip install 'loraplex[distributed]'"
        )


def train_data_parallel(cfg: TrainConfig, run_recipe: Callable[[TrainConfig], dict]) -> dict:
    """Run `run_recipe` (run.py's train, passed in so this module never imports run.py) in N workers."""
    require_ray_train(cfg.workers)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # workers run in their own directories: hand them absolute paths
    cfg = dataclasses.replace(
        cfg,
        **{
            key: str(Path(value).resolve())
            for key in ("data", "eval_data", "output", "base_model")
            if (value := getattr(cfg, key))
        },
    )

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
