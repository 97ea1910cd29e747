"""Secrets hidden from, and restored into, documents the admin API shows and takes.

``SECRET_KEYS`` names every key that holds a secret; :func:`redact` shows each
as ``{"set": bool}`` and :func:`unredact` puts the current value back where
the administrator sent ``{"set": true}``.  Pure: documents in, documents out.
"""

from __future__ import annotations

from typing import Any

# secret keys: the admin API redacts these; "*" is any user name
SECRET_KEYS = (
    "provider.client_secret",
    "provider.password",
    "provider.refresh_token",
    "admin.token",
    "smtp.auth.users.*",
    "smtp.auth.users.*.password",
)


def _is_secret_key(key: str) -> bool:
    for pattern in SECRET_KEYS:
        p = pattern.split(".")
        k = key.split(".")
        if len(p) == len(k) and all(a == "*" or a == b for a, b in zip(p, k)):
            return True
    return False


def redact(document: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A copy of ``document`` with every secret replaced by ``{"set": bool}``."""
    out: dict[str, Any] = {}
    for name, value in document.items():
        key = f"{prefix}.{name}" if prefix else name
        is_user_table = (
            key.startswith("smtp.auth.users.") and key.count(".") == 3
            and isinstance(value, dict) and ("password" in value or "allowed" in value)
        )
        if _is_secret_key(key) and not is_user_table:
            out[name] = {"set": value not in (None, "", {})}
        elif isinstance(value, dict):
            out[name] = redact(value, key)
        else:
            out[name] = value
    return out


def unredact(new: dict[str, Any], current: object, prefix: str = "") -> dict[str, Any]:
    """``new`` with every ``{"set": true}`` secret taken from ``current``."""
    out: dict[str, Any] = {}
    for name, value in new.items():
        key = f"{prefix}.{name}" if prefix else name
        if _is_secret_key(key) and value == {"set": True}:
            old = current.get(name) if isinstance(current, dict) else None
            if old is None:
                out[name] = value  # parse() will say it is not a secret form
            else:
                out[name] = old
        elif _is_secret_key(key) and value == {"set": False}:
            continue
        elif isinstance(value, dict):
            cur = current.get(name, {}) if isinstance(current, dict) else {}
            out[name] = unredact(value, cur if isinstance(cur, dict) else {}, key)
        else:
            out[name] = value
    return out
