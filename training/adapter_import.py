"""`loraplex adapters import`: bring a plain PEFT adapter (Axolotl, Unsloth, TRL, peft) into a store.

Such a folder has no `loraplex.json`, so the store would refuse it. Import checks it against the
base the store serves (lora_format: target modules exist, shapes fit, rank within limits,
safetensors only, values finite), then writes it into the store with a manifest marked
`"provenance": "imported"`: its base fingerprint is the base it was checked against, not one it
was trained on, which is why `base_model_name_or_path` is compared and a difference is warned about.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from loraplex.training import lora_format
from loraplex.training.adapter_id import validate_adapter_id
from loraplex.training.errors import DataError
from loraplex.training.lora_format import CONFIG_NAME, WEIGHTS_NAME, LoraFormatError, LoraSpec
from loraplex.training.manifest import MANIFEST_NAME, base_fingerprint, file_sha256, write_manifest

DEFAULT_MAX_RANK = 64  # the engine's default --max-lora-rank


def import_adapter(
    src: str | Path,
    base_dir: str | Path,
    store: str | Path,
    adapter_id: str | None = None,
    max_rank: int = DEFAULT_MAX_RANK,
    warn: Callable[[str], None] = print,
) -> Path:
    """Check the PEFT folder `src` against `base_dir` and copy it into `store` as `adapter_id`
    (default: the folder's name). Returns the new folder; nothing is written if a check fails."""
    src, base_dir, store = Path(src), Path(base_dir), Path(store)
    if not src.is_dir():
        raise DataError(f"adapter folder not found: {src}")
    adapter_id = validate_adapter_id(adapter_id if adapter_id is not None else src.name)
    if (src / MANIFEST_NAME).exists():
        raise DataError(f"{src} already has {MANIFEST_NAME} (made by loraplex): copy it into the store as it is")
    dest = store / adapter_id
    if dest.exists():
        raise DataError(
            f"the store already has an adapter '{adapter_id}' ({dest}): pass --id NEW_ID, "
            "or remove the old folder first"
        )
    fingerprint = base_fingerprint(base_dir)  # also checks base_dir is a HF checkpoint
    skipped = lora_format.check_files(src, other_pickles_ok=True)
    spec, modules = lora_format.read_adapter(src, other_pickles_ok=True)
    try:
        lora_format.check_fits(modules, lora_format.base_linear_shapes(base_dir), max_rank)
    except LoraFormatError as exc:
        raise LoraFormatError(f"{src} does not fit base {base_dir}: {exc}") from None
    _warn_if_other_base(spec, base_dir, warn)
    if skipped:
        warn(f"note: not copied: {', '.join(skipped)} (pickle files are never loaded; the store refuses them)")

    store.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".import-{adapter_id}-", dir=store))  # hidden: the store skips it
    try:
        for name in (CONFIG_NAME, WEIGHTS_NAME):  # only these two: no pickles, no tokenizer to drift from the base
            shutil.copyfile(src / name, staging / name)
        write_manifest(
            staging,
            {
                "adapter_id": adapter_id,
                "provenance": "imported",
                "base_model": str(base_dir),
                "base_fingerprint": fingerprint,
                "imported_from": {
                    "path": str(src.resolve()),
                    "base_model_name_or_path": spec.base_model_name_or_path,
                    "weights_sha256": file_sha256(staging / WEIGHTS_NAME),
                },
                "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "lora": _describe(spec, modules),
            },
        )
        staging.rename(dest)  # whole folder at once: the store never sees a half-written adapter
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _warn_if_other_base(spec: LoraSpec, base_dir: Path, warn: Callable[[str], None]) -> None:
    """PEFT records the base's hub name or local path; shapes fitting does not prove it is the same base."""
    named = spec.base_model_name_or_path
    if not named:
        warn(
            f"warning: {CONFIG_NAME} does not say which base the adapter was trained on; "
            f"checked only that its shapes fit {base_dir}"
        )
        return
    ours = {str(base_dir), str(base_dir.resolve()), base_dir.name, _config_name(base_dir)}
    if named not in ours and Path(named).name != base_dir.name:
        warn(
            f"warning: the adapter was trained on base {named!r}, not {base_dir}; its shapes fit, "
            "but its outputs are only right if the weights are the same model"
        )


def _config_name(base_dir: Path) -> str:
    try:
        return str(json.loads((base_dir / "config.json").read_text()).get("_name_or_path", ""))
    except (OSError, ValueError):
        return ""


def _describe(spec: LoraSpec, modules: dict) -> dict:
    return {
        "r": spec.rank,
        "alpha": spec.alpha,
        "use_rslora": spec.use_rslora,
        "rank_pattern": spec.rank_pattern,
        "alpha_pattern": spec.alpha_pattern,
        "target_modules": sorted({name.rpartition(".")[2] for name in modules}),
        "modules": len(modules),
        "max_rank": max(m.rank for m in modules.values()),
    }
