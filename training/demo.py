"""The demo tenants: their datasets (training/data/<tenant>/) and adapters (training/adapters/<tenant>/).

python -m loraplex.training.demo            # rewrite the datasets (deterministic)
python -m loraplex.training.demo --train    # retrain every demo adapter (about 3 minutes each on 2 cores)
"""

from __future__ import annotations

import json
from pathlib import Path

from loraplex.training.synthetic import TENANT_TASKS, tenant_splits

DATA_DIR = Path(__file__).resolve().parent / "data"
ADAPTERS_DIR = Path(__file__).resolve().parent / "adapters"
N_TRAIN, N_EVAL, SEED = 2000, 100, 7


def demo_tenants() -> list[str]:
    return sorted(TENANT_TASKS)


def tenant_data(tenant: str) -> tuple[Path, Path]:
    return DATA_DIR / tenant / "train.jsonl", DATA_DIR / tenant / "eval.jsonl"


def demo_adapter_dir(tenant: str) -> Path:
    return ADAPTERS_DIR / tenant


def ensure_demo_adapters(retrain: bool = False) -> dict[str, Path]:
    """Every demo tenant's adapter folder, training the missing ones with the default recipe."""
    from loraplex.training.config import TrainConfig
    from loraplex.training.run import train

    folders = {}
    for tenant in demo_tenants():
        folder = demo_adapter_dir(tenant)
        if retrain or not (folder / "adapter_model.safetensors").is_file():
            train_path, eval_path = tenant_data(tenant)
            train(TrainConfig(data=str(train_path), eval_data=str(eval_path), output=str(folder)))
        folders[tenant] = folder
    return folders


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_datasets() -> None:
    for tenant in demo_tenants():
        train_rows, eval_rows = tenant_splits(tenant, N_TRAIN, N_EVAL, SEED)
        train_path, eval_path = tenant_data(tenant)
        write_jsonl(train_path, train_rows)
        write_jsonl(eval_path, eval_rows)
        print(f"{tenant}: {len(train_rows)} train, {len(eval_rows)} eval -> {train_path.parent}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m loraplex.training.demo", description=__doc__)
    parser.add_argument("--train", action="store_true", help="retrain every demo adapter")
    args = parser.parse_args(argv)
    if args.train:
        for tenant, folder in ensure_demo_adapters(retrain=True).items():
            print(f"{tenant}: {folder}")
    else:
        write_datasets()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
