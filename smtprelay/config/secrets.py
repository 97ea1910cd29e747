"""What validating a configuration needs from the outside world, gathered first.

:func:`gather` is the configuration's only I/O besides reading relay.toml: it
looks up the environment variables ``{env = ...}`` secrets name, reads the
files ``{file = ...}`` secrets name, checks which configured paths are
readable, checks the SMTP TLS certificate against its key, and asks for this
host's name when ``smtp.hostname`` is not set.  The answers go into a
:class:`Facts`, which :func:`smtprelay.config.parsing.parse_document` (pure)
validates the document against.  Blocking: the admin API runs it in a thread.

It reads only what the document names at the places parsing looks (the
secret keys, the path keys of the provider type in use), and it is total: a
malformed document gathers what it can, and parsing reports the rest.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

import attr

from smtprelay.config.parsing import PROVIDER_KEYS, resolve

# the path keys of each provider type that parsing checks are readable
_PROVIDER_PATHS = {
    "m365": ("certificate", "certificate_key", "ca_file"),
    "gmail": ("service_account_file", "ca_file"),
    "smtp": ("ca_file",),
    "outbox": (),
}
_PROVIDER_SECRETS = {
    "m365": ("client_secret",),
    "gmail": ("client_secret", "refresh_token"),
    "smtp": ("password",),
    "outbox": (),
}

# the outcomes of the TLS key pair check (parsing turns them into problems)
KEYPAIR_OK = ""
KEYPAIR_BAD_CERTIFICATE = "certificate"
KEYPAIR_MISMATCH = "mismatch"
KEYPAIR_BAD_KEY = "key"


@attr.frozen(repr=False)
class SecretFile:
    """A ``{file = ...}`` secret as read: its text, or why it could not be read."""

    text: str | None
    reason: str = ""

    def __repr__(self) -> str:
        return f"<SecretFile {'read' if self.text is not None else self.reason}>"


@attr.frozen(repr=False)
class Facts:
    """Everything outside the document that validating it depends on."""

    base_dir: str = "."
    environ: Mapping[str, str] = attr.field(factory=dict)  # only the names secrets use
    files: Mapping[str, SecretFile] = attr.field(factory=dict)  # resolved path -> contents
    access: Mapping[str, str] = attr.field(factory=dict)  # resolved path -> "" or why not
    keypairs: Mapping[tuple[str, str], str] = attr.field(factory=dict)  # (cert, key) -> KEYPAIR_*
    fqdn: str = ""

    def __repr__(self) -> str:
        return (f"<Facts base_dir={self.base_dir!r} environ={sorted(self.environ)} "
                f"files={sorted(self.files)} access={dict(self.access)}>")


class _Gatherer:
    def __init__(self, base_dir: str, environ: Mapping[str, str]) -> None:
        self.base_dir = base_dir
        self.source_environ = environ
        self.environ: dict[str, str] = {}
        self.files: dict[str, SecretFile] = {}
        self.access: dict[str, str] = {}
        self.keypairs: dict[tuple[str, str], str] = {}
        self.fqdn = ""

    def secret(self, value: object) -> None:
        if not isinstance(value, dict) or len(value) != 1:
            return
        (kind, ref), = value.items()
        if not isinstance(ref, str):
            return
        if kind == "env" and ref in self.source_environ:
            self.environ[ref] = self.source_environ[ref]
        elif kind == "file":
            path = resolve(self.base_dir, ref)
            if path not in self.files:
                self.files[path] = _read_secret_file(path)

    def path(self, value: object) -> str:
        """The resolved path, its readability recorded; "" for no path."""
        if not isinstance(value, str) or not value:
            return ""
        path = resolve(self.base_dir, value)
        if path not in self.access:
            self.access[path] = _unreadable(path)
        return path

    def facts(self) -> Facts:
        return Facts(base_dir=self.base_dir, environ=self.environ, files=self.files,
                     access=self.access, keypairs=self.keypairs, fqdn=self.fqdn)


def _table(parent: object, name: str) -> dict[str, object]:
    value = parent.get(name) if isinstance(parent, dict) else None
    return value if isinstance(value, dict) else {}


def _os_reason(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__


def _read_secret_file(path: str) -> SecretFile:
    try:
        return SecretFile(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        return SecretFile(None, _os_reason(e))


def _unreadable(path: str) -> str:
    if os.access(path, os.R_OK):
        return ""
    return "no such file" if not os.path.exists(path) else "not readable"


def check_keypair(cert_path: str, key_path: str) -> str:
    """Whether the PEM certificate (chain) and key at these paths go together: KEYPAIR_*."""
    from OpenSSL import SSL

    ctx = SSL.Context(SSL.TLS_METHOD)
    try:
        ctx.use_certificate_chain_file(cert_path.encode())
    except SSL.Error:
        return KEYPAIR_BAD_CERTIFICATE
    try:
        ctx.use_privatekey_file(key_path.encode())
        ctx.check_privatekey()
    except SSL.Error as e:
        return KEYPAIR_MISMATCH if "mismatch" in str(e) else KEYPAIR_BAD_KEY
    return KEYPAIR_OK


def _smtp(g: _Gatherer, smtp: dict[str, object]) -> None:
    hostname = smtp.get("hostname")
    if not (isinstance(hostname, str) and hostname):
        g.fqdn = socket.getfqdn()
    cert = g.path(smtp.get("tls_certificate"))
    key = g.path(smtp.get("tls_key"))
    if cert and key and not g.access[cert] and not g.access[key]:
        g.keypairs[(cert, key)] = check_keypair(cert, key)
    users = _table(_table(smtp, "auth"), "users")
    for value in users.values():
        if isinstance(value, dict) and ("password" in value or "allowed" in value):
            g.secret(value.get("password"))
        else:
            g.secret(value)


def _provider(g: _Gatherer, provider: dict[str, object]) -> None:
    kind = provider.get("type", "outbox")
    if not isinstance(kind, str) or kind not in PROVIDER_KEYS:
        kind = "outbox"
    for name in _PROVIDER_PATHS[kind]:
        g.path(provider.get(name))
    for name in _PROVIDER_SECRETS[kind]:
        g.secret(provider.get(name))


def gather(document: object, base_dir: str | os.PathLike[str] = ".",
           environ: Mapping[str, str] | None = None) -> Facts:
    """Blocking: the facts :func:`~smtprelay.config.parsing.parse_document` needs."""
    g = _Gatherer(str(base_dir), os.environ if environ is None else environ)
    _smtp(g, _table(document, "smtp"))
    _provider(g, _table(document, "provider"))
    g.secret(_table(document, "admin").get("token"))
    return g.facts()
