"""Password hashes for SMTP users: scrypt, in a self-describing string.

Format: ``$scrypt$ln=15,r=8,p=1$<salt>$<key>`` (salt and key in unpadded
base64).  ``hash_password`` makes one, ``PasswordHash.verify`` checks one in
constant time.  Both are CPU-heavy by design: call them off the reactor thread.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from typing import TYPE_CHECKING

import attr

if TYPE_CHECKING:
    from smtprelay.config import Secret

_FORMAT = re.compile(
    r"\$scrypt\$ln=(?P<ln>\d+),r=(?P<r>\d+),p=(?P<p>\d+)\$(?P<salt>[A-Za-z0-9+/]+)\$(?P<key>[A-Za-z0-9+/]+)"
)
DEFAULT_LN, DEFAULT_R, DEFAULT_P = 15, 8, 1


def is_password_hash(text: str) -> bool:
    return text.startswith("$scrypt$")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: bytes, salt: bytes, ln: int, r: int, p: int) -> bytes:
    n = 1 << ln
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=32,
                          maxmem=256 * n * r + (1 << 20))


@attr.frozen(repr=False)
class PasswordHash:
    ln: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def __repr__(self) -> str:
        return f"<PasswordHash scrypt ln={self.ln}>"

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        m = _FORMAT.fullmatch(text)
        if not m:
            raise ValueError("not a password hash made by `smtprelay hash-password`")
        ln, r, p = int(m["ln"]), int(m["r"]), int(m["p"])
        if not (1 <= ln <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
            raise ValueError("password hash parameters out of range")
        return cls(ln, r, p, _unb64(m["salt"]), _unb64(m["key"]))

    def verify(self, password: bytes) -> bool:
        """Constant-time check of ``password`` (bytes)."""
        candidate = _scrypt(password, self.salt, self.ln, self.r, self.p)
        return hmac.compare_digest(candidate, self.key)

    def __str__(self) -> str:
        return f"$scrypt$ln={self.ln},r={self.r},p={self.p}${_b64(self.salt)}${_b64(self.key)}"


def hash_password(password: bytes, ln: int = DEFAULT_LN, r: int = DEFAULT_R,
                  p: int = DEFAULT_P) -> str:
    """``password`` (bytes) -> the hash string for relay.toml."""
    salt = os.urandom(16)
    return str(PasswordHash(ln, r, p, salt, _scrypt(password, salt, ln, r, p)))


def check_password(credential: PasswordHash | Secret, password: bytes) -> bool:
    """``credential`` is a PasswordHash or a Secret holding the plain password."""
    if isinstance(credential, PasswordHash):
        return credential.verify(password)
    expected = credential.bytes()
    return bool(expected) and hmac.compare_digest(expected, password)
