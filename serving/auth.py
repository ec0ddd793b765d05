"""Tenant API keys: who may call, which adapters each key may use, and each tenant's limits.

Keys are never stored, only their SHA-256: a leaked key file or app config reveals no key.
API keys are long random strings (`loraplex keys add` makes 256-bit ones), so a plain hash is
enough; there is nothing to brute-force that a slow hash would protect.

A key file (YAML or JSON), from `api_keys: PATH`, `$LORAPLEX_API_KEYS_FILE`, or inline in
`$LORAPLEX_API_KEYS` (a Kubernetes secret as an env var):

    keys:
      - name: acme                       # the tenant: metrics and limits are per name
        sha256: 9f86d08...               # of the key; `loraplex keys add` writes this entry
        adapters: [acme-fiscal, acme-*]  # adapter IDs (fnmatch patterns) it may use; "" = the base
        max_concurrent: 8                # optional, per tenant; the app's default otherwise
        max_prompt_tokens: 1024          # optional
        max_new_tokens: 256              # optional
      - name: platform-ops
        sha256: 2c26b46...
        admin: true                      # LoadAdapter / UnloadAdapter / PinAdapter, all adapters
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import secrets
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from loraplex.serving.errors import PermissionDenied, TenantLimitExceeded, Unauthenticated
from loraplex.training.errors import LoraplexError

logger = logging.getLogger("loraplex.auth")

KEY_PREFIX = "lpx_"
ENV_FILE, ENV_INLINE = "LORAPLEX_API_KEYS_FILE", "LORAPLEX_API_KEYS"
AUTH_OFF_WARNING = (
    "AUTHENTICATION IS OFF: any client may use any adapter and call the admin RPCs. "
    "This is for the local demo only; serve real tenants with api_keys (see `loraplex keys add`)."
)


class KeyFileError(LoraplexError):
    """The key file is missing or malformed; the message says where."""


class KeysRequired(LoraplexError):
    """Own adapters and no keys: the server will not serve them to anyone who asks."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class TenantLimits:
    """Per-tenant request limits; None means only the engine's own limits apply."""

    max_concurrent: int | None = 64
    max_prompt_tokens: int | None = None
    max_new_tokens: int | None = None

    def check_new_tokens(self, max_tokens: int | None) -> None:
        if self.max_new_tokens is not None and max_tokens is not None and max_tokens > self.max_new_tokens:
            raise TenantLimitExceeded(f"max_tokens {max_tokens} is above this tenant's limit of {self.max_new_tokens}")

    def check_prompt_tokens(self, prompt_tokens: int) -> None:
        if self.max_prompt_tokens is not None and prompt_tokens > self.max_prompt_tokens:
            raise TenantLimitExceeded(
                f"prompt of {prompt_tokens} tokens is above this tenant's limit of {self.max_prompt_tokens}"
            )


@dataclass(frozen=True)
class TenantKey:
    name: str
    sha256: str
    adapters: tuple[str, ...] = ()
    admin: bool = False
    limits: TenantLimits = field(default_factory=TenantLimits)

    def may_use(self, adapter_id: str) -> bool:
        return self.admin or any(fnmatch.fnmatchcase(adapter_id, p) for p in self.adapters)


class KeyTable:
    """The hashed keys, looked up by the hash of the presented key."""

    def __init__(self, keys: list[TenantKey]) -> None:
        self.by_hash = {k.sha256: k for k in keys}

    @classmethod
    def parse(cls, text: str, source: str, defaults: TenantLimits = TenantLimits()) -> KeyTable:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise KeyFileError(f"{source}: not valid YAML/JSON ({exc})") from None
        entries = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not entries:
            raise KeyFileError(f"{source}: expected a non-empty 'keys' list")
        keys, names = [], set()
        limit_names = {f.name for f in fields(TenantLimits)}
        for i, entry in enumerate(entries):
            where = f"{source}: keys[{i}]"
            if not isinstance(entry, dict):
                raise KeyFileError(f"{where} is not a mapping")
            unknown = set(entry) - {"name", "sha256", "adapters", "admin"} - limit_names
            if unknown:
                raise KeyFileError(f"{where} has unknown fields {sorted(unknown)}")
            name, digest = entry.get("name"), str(entry.get("sha256", "")).lower()
            if not isinstance(name, str) or not name:
                raise KeyFileError(f"{where} needs a 'name'")
            if name in names:
                raise KeyFileError(f"{where}: the name {name!r} is used twice")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise KeyFileError(f"{where} ({name}): 'sha256' must be 64 hex digits (the key's hash, never the key)")
            adapters = entry.get("adapters") or []
            if isinstance(adapters, str) or not all(isinstance(a, str) for a in adapters):
                raise KeyFileError(f"{where} ({name}): 'adapters' must be a list of IDs or patterns")
            limits = {}
            for limit in limit_names & set(entry):
                value = entry[limit]
                if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                    raise KeyFileError(f"{where} ({name}): {limit} must be a positive integer")
                limits[limit] = value
            names.add(name)
            keys.append(
                TenantKey(
                    name,
                    digest,
                    tuple(adapters),
                    bool(entry.get("admin", False)),
                    TenantLimits(**{**asdict(defaults), **limits}),
                )
            )
        if len({k.sha256 for k in keys}) != len(keys):
            raise KeyFileError(f"{source}: two entries share one key hash")
        return cls(keys)

    @classmethod
    def load(cls, path: str | Path, defaults: TenantLimits = TenantLimits()) -> KeyTable:
        path = Path(path)
        if not path.is_file():
            raise KeyFileError(f"API key file {path} not found")
        return cls.parse(path.read_text(), str(path), defaults)

    def authenticate(self, authorization: str | None) -> TenantKey:
        """The key behind an `Authorization: Bearer <key>` value; UNAUTHENTICATED otherwise."""
        if not authorization:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("malformed authorization: expected 'Bearer <key>'")
        key = self.by_hash.get(hash_key(token.strip()))
        if key is None:
            raise Unauthenticated("unknown API key")
        return key

    def to_config(self) -> list[dict]:
        """Plain data for Ray Serve's app config (hashes only)."""
        return [{**asdict(k), "adapters": list(k.adapters)} for k in self.by_hash.values()]

    @classmethod
    def from_config(cls, entries: list[dict]) -> KeyTable:
        return cls(
            [
                TenantKey(e["name"], e["sha256"], tuple(e["adapters"]), e["admin"], TenantLimits(**e["limits"]))
                for e in entries
            ]
        )


def authorize(key: TenantKey | None, adapter_id: str) -> None:
    """PERMISSION_DENIED unless the key may use this adapter ('' is the base). None: auth is off."""
    if key is not None and not key.may_use(adapter_id):
        shown = f"adapter '{adapter_id}'" if adapter_id else "the base model"
        raise PermissionDenied(f"this API key ({key.name}) may not use {shown}")


def require_admin(key: TenantKey | None, action: str) -> None:
    if key is not None and not key.admin:
        raise PermissionDenied(f"{action} needs an admin API key ({key.name} is not one)")


def keys_configured(api_keys: str | None) -> bool:
    """Whether the app arg or the environment names keys (then auth is on)."""
    return bool(api_keys or os.environ.get(ENV_FILE) or os.environ.get(ENV_INLINE))


def resolve_key_table(api_keys: str | None, defaults: TenantLimits) -> KeyTable | None:
    """The keys from the app arg, else $LORAPLEX_API_KEYS_FILE, else $LORAPLEX_API_KEYS; None if none."""
    if not keys_configured(api_keys):
        return None
    path = api_keys or os.environ.get(ENV_FILE)
    if path:
        return KeyTable.load(path, defaults)
    return KeyTable.parse(os.environ[ENV_INLINE], f"${ENV_INLINE}", defaults)


def auth_from_args(args: dict) -> tuple[KeyTable | None, TenantLimits]:
    """Pop the app's auth args; the key table, or None when auth is off (the demo, or said so)."""
    allow_open = bool(args.pop("allow_unauthenticated", False))
    limits = TenantLimits(
        **{
            name: args.pop(f"tenant_{name}")
            for name in ("max_concurrent", "max_prompt_tokens", "max_new_tokens")
            if f"tenant_{name}" in args
        }
    )
    table = resolve_key_table(args.pop("api_keys", None), limits)
    if table is None and not (allow_open or args.get("adapters") is None):
        raise KeysRequired(
            "no API keys: pass --api-keys FILE / api_keys (make one with `loraplex keys add`) or "
            f"set ${ENV_FILE}; --allow-unauthenticated serves without auth (local testing only)"
        )
    return table, limits


def add_key(path: str | Path, name: str, adapters: list[str], admin: bool = False, **limits) -> str:
    """Append a new key's hash to the key file (created if missing); returns the key, shown once."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    data = data if isinstance(data, dict) else {}
    entries = list(data.get("keys") or [])
    if any(isinstance(e, dict) and e.get("name") == name for e in entries):
        raise KeyFileError(f"{path}: a key named {name!r} exists; remove it first to rotate")
    key = new_key()
    entry = {"name": name, "sha256": hash_key(key), "adapters": list(adapters), "admin": admin}
    entry.update({k: v for k, v in limits.items() if v is not None})
    entries.append(entry)
    KeyTable.parse(json.dumps({"keys": entries}), str(path))  # refuse to write a file the server would refuse
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump({"keys": entries}, sort_keys=False))
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return key
