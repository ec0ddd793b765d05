"""The model shapes the serving benchmarks run on: random-init checkpoints of the families in
training/random_checkpoint.py at their real depth (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

# benchmark shape -> (family, config overrides)
SHAPES = {
    "smollm2-135m": ("smollm2-135m", {"num_hidden_layers": 30}),  # hidden 576, MLP 1536, GQA 9/3, tied 49k vocab
    "llama-1b": ("llama-3.2-1b", {"num_hidden_layers": 16}),  # hidden 2048, MLP 8192, GQA 32/8
}


def build_shape(name: str, out: Path) -> Path:
    """Write the checkpoint once; later calls reuse the folder."""
    from loraplex.training.random_checkpoint import build_family

    out = Path(out)
    if not (out / "config.json").is_file():
        family, overrides = SHAPES[name]
        build_family(family, out, **overrides)
    return out
