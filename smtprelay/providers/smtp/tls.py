"""TLS towards the upstream SMTP server: the client options and what a handshake says.

This module owns the TLS set-up of an upstream connection (TLS 1.2 at least;
the certificate checked against the system roots plus ``provider.ca_file``,
unless ``verify_certificate = false``), the start-up check of ``ca_file``, and
the wrapper that keeps each connection's OpenSSL object so that a refused
chain can say why and a good one which protocol it negotiated.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet import ssl as tls
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from smtprelay.providers._http import SystemAndFileTrust
from smtprelay.providers.smtp import replies


@implementer(IOpenSSLClientConnectionCreator)
class RecordingCreator:
    """Wraps a connection creator to keep the OpenSSL connection it made, so
    that a failed handshake can say why the chain was refused and a
    successful one which protocol it negotiated.  One per connection."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.connection: SSL.Connection | None = None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        self.connection = self._inner.clientConnectionForTLS(tlsProtocol)
        return self.connection

    def verify_error(self) -> str | None:
        """OpenSSL's reason for refusing the chain ("unable to get local issuer
        certificate"), or None.  pyOpenSSL has no public accessor for it;
        the detail is best effort, the refusal itself does not depend on it."""
        try:
            from OpenSSL._util import ffi, lib

            code = lib.SSL_get_verify_result(getattr(self.connection, "_ssl"))  # noqa: B009
            if code:
                text: bytes = ffi.string(lib.X509_verify_cert_error_string(code))
                return text.decode("ascii", "replace")
        except Exception:
            pass
        return None

    def description(self) -> str:
        try:
            c = self.connection
            assert c is not None
            return f"{c.get_protocol_version_name()} {c.get_cipher_name()}"
        except Exception:
            return "TLS"


def check_ca_file(ca_file: str | None) -> str | None:
    """None, or why ``ca_file`` cannot serve as a trust anchor (said once, at start)."""
    if not ca_file:
        return None
    try:
        SSL.Context(SSL.TLS_CLIENT_METHOD).load_verify_locations(ca_file.encode())
    except SSL.Error as e:
        reasons = replies.ssl_reasons(e)
        return f"TLS: cannot use provider.ca_file {ca_file}: {', '.join(reasons) or 'unreadable'}"
    return None


def client_options(host: str, verify_certificate: bool, ca_file: str | None) -> Any:
    """The connection-creator factory for ``host`` (one per provider; reused)."""
    minimum = {"raiseMinimumTo": tls.TLSVersion.TLSv1_2}
    if verify_certificate:
        return tls.optionsForClientTLS(host, trustRoot=SystemAndFileTrust(ca_file),
                                       extraCertificateOptions=minimum)
    return tls.CertificateOptions(verify=False, **minimum)


def note(host: str, security: str, verify_certificate: bool, creator: RecordingCreator) -> str:
    """What ``check()`` says of an established TLS session."""
    checked = (f"certificate verified for {host}" if verify_certificate
               else "certificate NOT verified (verify_certificate = false)")
    how = "STARTTLS" if security == "starttls" else "TLS from the first byte"
    return f"{how}, {creator.description()}, {checked}"
