"""The manifest records the machine a run happened on (CPU model, GPU, library versions)."""

from __future__ import annotations

import json

import torch  # noqa: F401  (machine_info reads torch's threads and GPU only when torch is loaded)

from loraplex.training.manifest import RECORDED_PACKAGES, _cpuinfo, machine_info, read_manifest, write_manifest

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni sse4_2

processor\t: 1
model name\t: AMD EPYC
"""


def test_cpuinfo_parses_model_family_and_flags():
    model, family, flags = _cpuinfo(CPUINFO)
    assert model == "AMD EPYC"
    assert family == "family 26 model 2"
    assert flags == ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"]  # no amx here: it is not in the flags


def test_cpuinfo_without_fields():
    assert _cpuinfo("") == (None, None, [])


def test_machine_info_names_cpu_gpu_and_versions():
    info = machine_info()
    assert info["cpu"]  # /proc/cpuinfo, else platform.processor() / machine()
    assert info["cpu_count"] >= 1 and info["torch_threads"] >= 1
    assert info["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    assert set(info["versions"]) == set(RECORDED_PACKAGES)
    assert torch.__version__.startswith(info["versions"]["torch"].split("+")[0])
    for name in ("bitsandbytes", "transformers", "peft"):
        assert info["versions"][name], name
    json.dumps(info)  # the manifest is JSON


def test_write_manifest_adds_machine(tmp_path):
    write_manifest(tmp_path, {"adapter_id": "a", "base_fingerprint": "sha256:x"})
    manifest = read_manifest(tmp_path)
    assert manifest["machine"]["cpu"] and manifest["machine"]["versions"]["torch"]


def test_imported_manifest_has_no_machine(tmp_path):
    """An imported adapter was trained somewhere unknown: the importing machine is not recorded."""
    write_manifest(tmp_path, {"adapter_id": "a", "base_fingerprint": "sha256:x", "provenance": "imported"})
    assert "machine" not in read_manifest(tmp_path)


def test_given_machine_kept(tmp_path):
    write_manifest(tmp_path, {"adapter_id": "a", "base_fingerprint": "sha256:x", "machine": {"cpu": "given"}})
    assert read_manifest(tmp_path)["machine"] == {"cpu": "given"}
