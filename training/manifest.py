"""The adapter manifest (`loraplex.json`) and the base fingerprint it is checked against.

Training writes the manifest next to the PEFT files; serving and convert refuse an adapter
whose base fingerprint differs from the base they hold.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from loraplex.training.errors import BaseMismatch, DataError

MANIFEST_NAME = "loraplex.json"
MANIFEST_VERSION = 1
# Keys that change when a checkpoint is re-saved but not what the model computes.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache"}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def base_fingerprint(base_dir: str | Path) -> str:
    """sha256 over the canonical config and every safetensors weight file of a HF checkpoint."""
    base_dir = Path(base_dir)
    config_path = base_dir / "config.json"
    weight_files = sorted(base_dir.glob("*.safetensors"))
    if not config_path.is_file() or not weight_files:
        raise DataError(f"not a Hugging Face checkpoint (config.json + *.safetensors): {base_dir}")
    config = {k: v for k, v in json.loads(config_path.read_text()).items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for path in weight_files:
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return "sha256:" + digest.hexdigest()


def write_manifest(adapter_dir: str | Path, manifest: dict) -> Path:
    path = Path(adapter_dir) / MANIFEST_NAME
    path.write_text(json.dumps({"manifest_version": MANIFEST_VERSION, **manifest}, indent=2) + "\n")
    return path


def read_manifest(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"adapter has no {MANIFEST_NAME}: {adapter_dir}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON ({exc.msg})") from None
    if not isinstance(manifest, dict) or "base_fingerprint" not in manifest:
        raise DataError(f"{path}: missing base_fingerprint")
    return manifest


def check_same_base(expected: str, found: str, what: str) -> None:
    if expected != found:
        raise BaseMismatch(
            f"{what} was made against base {found[:19]}..., but the base here is {expected[:19]}..."
        )
