"""Trainer callbacks of the recipe: the CSV log of loss and learning rate."""

from __future__ import annotations

import csv
import time
from pathlib import Path

from transformers import TrainerCallback

LOG_NAME = "train_log.csv"
COLUMNS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "eval_loss", "elapsed_s")


class CsvLogCallback(TrainerCallback):
    """Appends one row per Trainer log event to <output>/train_log.csv (rank 0 only).

    A plain file anyone can plot or diff; appending keeps a resumed run's earlier rows."""

    def __init__(self, output: Path) -> None:
        self.path = Path(output) / LOG_NAME
        self.started = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if not state.is_world_process_zero or not logs:
            return
        row = {
            "step": state.global_step,
            "epoch": round(state.epoch or 0.0, 4),
            "elapsed_s": round(time.monotonic() - self.started, 2),
        }
        row.update({key: logs[key] for key in ("loss", "learning_rate", "grad_norm", "eval_loss") if key in logs})
        if len(row) == 3:  # the end-of-training summary (train_runtime, ...): nothing per-step in it
            return
        new = not self.path.is_file()
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)
