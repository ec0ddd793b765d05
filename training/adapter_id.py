"""The adapter-ID rules: which tenant strings are valid IDs, and their safe internal names.

Tenant IDs become folder names in the adapter store and PEFT adapter names become module
attributes (an adapter called `double` would shadow `nn.Module.double`), so IDs are validated
here and never used as attribute names directly.
"""

from __future__ import annotations

import hashlib
import re

from loraplex.training.errors import InvalidAdapterId

MAX_ID_LENGTH = 128
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def validate_adapter_id(adapter_id: object) -> str:
    """Return the ID unchanged if it is a safe name, else raise InvalidAdapterId with the reason."""
    if not isinstance(adapter_id, str):
        raise InvalidAdapterId(f"adapter ID must be a string, got {type(adapter_id).__name__}")
    shown = repr(adapter_id[:40])
    if not adapter_id:
        raise InvalidAdapterId("adapter ID is empty")
    if len(adapter_id) > MAX_ID_LENGTH:
        raise InvalidAdapterId(f"adapter ID {shown}... is longer than {MAX_ID_LENGTH} characters")
    if ".." in adapter_id:
        raise InvalidAdapterId(f"adapter ID {shown} contains '..'")
    if not _ID_PATTERN.fullmatch(adapter_id):
        raise InvalidAdapterId(
            f"adapter ID {shown} is not a safe name: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return adapter_id


def internal_name(adapter_id: str) -> str:
    """A PEFT-safe module name for a validated ID: stable, collision-resistant, never a builtin."""
    return "t_" + hashlib.sha256(validate_adapter_id(adapter_id).encode()).hexdigest()[:16]
