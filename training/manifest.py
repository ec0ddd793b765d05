"""The adapter manifest (`loraplex.json`) and the base fingerprint it is checked against.

Training writes the manifest next to the PEFT files; serving and convert refuse an adapter
whose base fingerprint differs from the base they hold.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from loraplex.training.errors import BaseMismatch, DataError

MANIFEST_NAME = "loraplex.json"
MANIFEST_VERSION = 1
# Versions that decide what training computes; recorded so two runs that differ can be told apart.
RECORDED_PACKAGES = ("torch", "bitsandbytes", "transformers", "peft", "accelerate")
# CPU features that change which kernels run (bf16 matmuls, AMX tiles), hence the numerics.
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
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


def _cpuinfo(text: str | None = None) -> tuple[str | None, str | None, list[str]]:
    """CPU model name, "family F model M" (a VM often shows only "AMD EPYC") and the recorded
    feature flags, from /proc/cpuinfo (Linux); Nones and [] where it is not readable."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None, None, []
    fields: dict[str, str] = {}
    for line in text.splitlines():  # every CPU repeats the same keys: the first block is enough
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    family = (
        f"family {fields['cpu family']} model {fields['model']}"
        if "cpu family" in fields and "model" in fields
        else None
    )
    flags = set(fields.get("flags", "").split())
    return fields.get("model name") or None, family, [f for f in _CPU_FLAGS if f in flags]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """Where a run happened: CPU model and features, GPU, thread count and the library versions.

    Training on another CPU (AVX512-BF16 vs AMX), GPU or library version changes the numerics;
    the same recipe and seed can then end elsewhere. The manifest carries this so a user can see why.
    """
    cpu_model, cpu_family, cpu_flags = _cpuinfo()
    info = {
        "cpu": cpu_model or platform.processor() or platform.machine() or None,
        "cpu_family": cpu_family,
        "cpu_flags": cpu_flags,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    torch = sys.modules.get("torch")  # only if the run already imported it: never pull torch in here
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        cuda = torch.cuda.is_available()
        info["gpu"] = torch.cuda.get_device_name(0) if cuda else None
        info["cuda"] = torch.version.cuda if cuda else None
    info["versions"] = {name: _version(name) for name in RECORDED_PACKAGES}
    return info


def write_manifest(adapter_dir: str | Path, manifest: dict) -> Path:
    """Write loraplex.json. Adapters made here get a "machine" record (machine_info); imported
    ones do not, since the machine that trained them is unknown."""
    if manifest.get("provenance") != "imported" and "machine" not in manifest:
        manifest = {**manifest, "machine": machine_info()}
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
        raise BaseMismatch(f"{what} was made against base {found[:19]}..., but the base here is {expected[:19]}...")
