"""API keys without a server: the key file, hashing, lookup, and when the server demands keys."""

from __future__ import annotations

import os
import stat

import pytest

from loraplex.serving.auth import (
    KeyFileError,
    KeysRequired,
    KeyTable,
    TenantLimits,
    add_key,
    auth_from_args,
    authorize,
    hash_key,
    require_admin,
)
from loraplex.serving.errors import PermissionDenied, TenantLimitExceeded, Unauthenticated
from tests.conftest import run_cli


def test_keys_are_stored_hashed_and_looked_up_by_hash(tmp_path):
    path = tmp_path / "keys.yaml"
    acme = add_key(path, "acme", ["acme-*"], max_concurrent=2)
    ops = add_key(path, "ops", [], admin=True)
    text = path.read_text()
    assert acme not in text and ops not in text and hash_key(acme) in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    table = KeyTable.load(path, TenantLimits(max_new_tokens=64))
    key = table.authenticate(f"Bearer {acme}")
    assert key.name == "acme" and key.limits == TenantLimits(max_concurrent=2, max_new_tokens=64)
    assert key.may_use("acme-fiscal") and not key.may_use("globex") and not key.may_use("")
    authorize(key, "acme-x")
    with pytest.raises(PermissionDenied, match="may not use adapter 'globex'"):
        authorize(key, "globex")
    with pytest.raises(PermissionDenied, match="admin"):
        require_admin(key, "load_adapter")
    require_admin(table.authenticate(f"bearer  {ops} "), "load_adapter")
    assert KeyTable.from_config(table.to_config()).by_hash == table.by_hash  # what travels to the Router
    with pytest.raises(KeyFileError, match="exists"):
        add_key(path, "acme", ["x"])


@pytest.mark.parametrize(
    "header, reason",
    [
        (None, "missing"),
        ("", "missing"),
        ("Bearer", "malformed"),
        ("Token abc", "malformed"),
        ("Bearer lpx_wrong", "unknown"),
    ],
)
def test_bad_authorization_is_unauthenticated(tmp_path, header, reason):
    add_key(tmp_path / "k.yaml", "acme", ["acme"])
    with pytest.raises(Unauthenticated, match=reason):
        KeyTable.load(tmp_path / "k.yaml").authenticate(header)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("keys: []", "non-empty"),
        ("[1, 2", "not valid"),
        ("keys: [{name: a}]", "64 hex"),
        ("keys: [{name: a, sha256: " + "a" * 64 + ", adapters: x}]", "list"),
        ("keys: [{name: a, sha256: " + "a" * 64 + ", key: secret}]", "unknown fields"),
        ("keys: [{name: a, sha256: " + "a" * 64 + ", max_concurrent: 0}]", "positive"),
        ("keys: [{name: a, sha256: " + "a" * 64 + "}, {name: a, sha256: " + "b" * 64 + "}]", "twice"),
    ],
)
def test_malformed_key_files_are_refused_with_the_place(text, reason):
    with pytest.raises(KeyFileError, match=reason):
        KeyTable.parse(text, "keys.yaml")


def test_limits_name_the_limit():
    limits = TenantLimits(max_prompt_tokens=10, max_new_tokens=5)
    limits.check_new_tokens(5)
    with pytest.raises(TenantLimitExceeded, match="max_tokens 6 .* limit of 5"):
        limits.check_new_tokens(6)
    with pytest.raises(TenantLimitExceeded, match="11 tokens .* limit of 10"):
        limits.check_prompt_tokens(11)


def test_own_adapters_need_keys_the_demo_store_does_not(tmp_path, monkeypatch):
    monkeypatch.delenv("LORAPLEX_API_KEYS_FILE", raising=False)
    monkeypatch.delenv("LORAPLEX_API_KEYS", raising=False)
    with pytest.raises(KeysRequired):
        auth_from_args({"adapters": "/srv/adapters"})
    assert auth_from_args({})[0] is None  # the demo store
    assert auth_from_args({"adapters": "/srv/adapters", "allow_unauthenticated": True})[0] is None
    add_key(tmp_path / "k.yaml", "acme", ["acme"])
    monkeypatch.setenv("LORAPLEX_API_KEYS", (tmp_path / "k.yaml").read_text())  # a Secret as an env var
    table, _ = auth_from_args({"adapters": "/srv/adapters"})
    assert [k.name for k in table.by_hash.values()] == ["acme"]


def test_cli_adds_keys_and_serve_refuses_own_adapters_without_keys(tmp_path):
    added = run_cli(
        "-m",
        "loraplex.cli",
        "keys",
        "add",
        "--file",
        str(tmp_path / "k.yaml"),
        "--name",
        "acme",
        "--adapters",
        "acme-*",
        "--max-new-tokens",
        "32",
    )
    assert added.returncode == 0 and added.stdout.strip().startswith("lpx_") and "shown once" in added.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_API_KEYS")}
    refused = run_cli("-m", "loraplex.cli", "serve", "--adapters", str(tmp_path), env=env)
    assert refused.returncode == 2 and "no API keys" in refused.stderr and "Traceback" not in refused.stderr
