"""TLS context factories for the SMTP listeners (STARTTLS and implicit TLS).

``tls_minimum_version`` may be as low as "1.0" for old printers: OpenSSL 3
refuses TLS 1.0/1.1 at its default security level even when the protocol is
enabled, so for those the cipher list is opened with ``@SECLEVEL=0``.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

_VERSIONS = {
    "1.0": SSL.TLS1_VERSION,
    "1.1": SSL.TLS1_1_VERSION,
    "1.2": SSL.TLS1_2_VERSION,
    "1.3": SSL.TLS1_3_VERSION,
}
_MODERN_CIPHERS = (
    b"ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:ECDHE+AES:!aNULL:!eNULL:!MD5:!DSS:!RC4:!3DES"
)
_LEGACY_CIPHERS = b"DEFAULT:@SECLEVEL=0"


@implementer(IOpenSSLServerConnectionCreator)
class ServerContextFactory:
    """A reusable server-side context for ``listenSSL`` and ``startTLS``."""

    def __init__(self, certificate_path: str | os.PathLike[str], key_path: str | os.PathLike[str],
                 minimum_version: str = "1.2") -> None:
        self.minimum_version = minimum_version
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(_VERSIONS[minimum_version])
        options = SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
        ctx.set_options(options | getattr(SSL, "OP_NO_RENEGOTIATION", 0))
        ctx.use_certificate_chain_file(str(certificate_path).encode())
        ctx.use_privatekey_file(str(key_path).encode())
        ctx.check_privatekey()
        if minimum_version in ("1.0", "1.1"):
            ctx.set_cipher_list(_LEGACY_CIPHERS)
        else:
            ctx.set_cipher_list(_MODERN_CIPHERS)
        ctx.set_session_id(b"smtprelay")
        self._context = ctx

    def getContext(self) -> SSL.Context:
        return self._context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def certificate_not_after(pem_path: str | os.PathLike[str]) -> datetime.datetime:
    """The notAfter of a PEM certificate as a datetime (UTC), for expiry warnings."""
    with open(pem_path, "rb") as f:
        cert = crypto.load_certificate(crypto.FILETYPE_PEM, f.read())
    not_after = cert.get_notAfter()
    if not_after is None:  # X.509 requires one: only a corrupt certificate lacks it
        raise ValueError(f"{pem_path}: the certificate has no notAfter")
    text = not_after.decode("ascii")
    return datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.UTC)
