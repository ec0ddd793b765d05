"""The Ray patches (serving/ray_compat.py) hold only for the Ray they were read against: these
fail when a patched target changes, so an upgrade is re-checked instead of silently mis-patched."""

from __future__ import annotations

import pytest

from loraplex.serving import ray_compat


def test_installed_ray_is_a_tested_version():
    assert ray_compat.ray_minor() in ray_compat.TESTED_RAY


@pytest.mark.parametrize("name", sorted(ray_compat.TARGET_SOURCE_SHA256))
def test_patched_target_source_is_unchanged(name):
    assert ray_compat.source_sha256(ray_compat.targets()[name]) == ray_compat.TARGET_SOURCE_SHA256[name], (
        f"Ray's {name} changed: re-read it, re-check the patch in serving/ray_compat.py, then update its hash"
    )


def test_install_is_idempotent_and_keeps_the_original_reachable():
    ray_compat.install()
    first = ray_compat.targets()
    ray_compat.install()
    assert ray_compat.targets() == first
    for function in first.values():
        assert hasattr(function, "loraplex_original")
    ray_compat.check_ray()  # signatures are read through the original, so a second check passes


def test_an_untested_ray_stops_startup_with_the_fix(monkeypatch):
    monkeypatch.setattr(ray_compat, "TESTED_RAY", ("1.0",))
    with pytest.raises(ray_compat.RayCompatError, match=r"install ray\[serve\]==1\.0\.\*"):
        ray_compat.install()


def test_a_changed_signature_stops_startup(monkeypatch):
    monkeypatch.setitem(ray_compat.SIGNATURES, "RayServegRPCContext.__init__", ["self", "context", "extra"])
    with pytest.raises(ray_compat.RayCompatError, match="changed signature"):
        ray_compat.check_ray()
