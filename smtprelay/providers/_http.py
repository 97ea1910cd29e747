"""HTTP for the API providers: one treq client per provider, and the pure parts.

- :func:`make_client`: a ``treq.HTTPClient`` over a persistent connection
  pool, verifying certificates against the system store plus ``ca_file``
  (for TLS-inspecting proxies and test CAs);
- :func:`retry_after`: ``Retry-After`` as seconds or an HTTP date -> an epoch time;
- :func:`read_body`: a response body with a size cap (a hostile or broken
  server must not make us buffer gigabytes), and :func:`json_error` for the
  ``{"error": ...}`` bodies of Graph and Google;
- :func:`describe_failure`: a connection/TLS/timeout failure as one line;
  :func:`handshake_failed`: whether it happened before TLS was up (so that no
  request can have reached the server: not an ambiguous outcome).
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any

import treq
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from zope.interface import alsoProvides, implementer

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime
    from twisted.web.http_headers import Headers
    from twisted.web.iweb import IResponse

MAX_ERROR_BODY = 64 * 1024


@implementer(IOpenSSLTrustRoot)
class SystemAndFileTrust:
    """The platform's CA store, plus the certificates in ``ca_file`` if given."""

    def __init__(self, ca_file: str | bytes | None = "") -> None:
        self.ca_file = ca_file

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        if self.ca_file:
            context.load_verify_locations(self.ca_file.encode() if isinstance(self.ca_file, str)
                                          else self.ca_file)


class TLSHandshakeLost(net_error.ConnectionLost):
    """The connection ended before its TLS handshake completed: nothing was sent."""

    def __str__(self) -> str:
        return "the connection was closed during the TLS handshake"


@implementer(IOpenSSLClientConnectionCreator)
class _WatchHandshake:
    """Twisted's TLS layer buffers the request until its handshake is done, and the
    HTTP client then counts it as written: a server (or a middlebox) that closes the
    connection during the handshake looks like one that took the request and never
    answered.  This tells them apart: a connection lost before the handshake
    completed is reported to the HTTP client as :class:`TLSHandshakeLost`."""

    def __init__(self, inner: IOpenSSLClientConnectionCreator) -> None:
        self._inner = inner

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._inner.clientConnectionForTLS(tlsProtocol)
        app = tlsProtocol.wrappedProtocol
        done: list[bool] = []
        earlier = getattr(app, "handshakeCompleted", None) \
            if IHandshakeListener.providedBy(app) else None
        lost = app.connectionLost

        def handshakeCompleted() -> None:
            done.append(True)
            if earlier is not None:
                earlier()

        def connectionLost(reason: Failure) -> None:
            if not done and not reason.check(SSL.Error, defer.CancelledError):
                reason = Failure(TLSHandshakeLost())
            return lost(reason)

        alsoProvides(app, IHandshakeListener)
        app.handshakeCompleted = handshakeCompleted
        app.connectionLost = connectionLost
        return connection


class _Policy(BrowserLikePolicyForHTTPS):
    """Browser-like verification with our trust root and TLS 1.2 as the floor."""

    def creatorForNetloc(self, hostname: bytes, port: int) -> _WatchHandshake:
        from twisted.internet.ssl import TLSVersion, optionsForClientTLS

        return _WatchHandshake(optionsForClientTLS(
            hostname.decode("idna"), trustRoot=self._trustRoot,
            extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2}))


def make_client(reactor: IReactorTime, ca_file: str = "", max_per_host: int = 8,
                connect_timeout: float = 30) -> tuple[treq.client.HTTPClient,
                                                       HTTPConnectionPool]:
    """-> (treq.HTTPClient, HTTPConnectionPool) with persistent connections."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = 120
    policy = _Policy(trustRoot=SystemAndFileTrust(ca_file))
    agent = Agent(reactor, contextFactory=policy, pool=pool, connectTimeout=connect_timeout)
    return treq.client.HTTPClient(agent), pool


def retry_after(headers: Headers, now: float) -> float | None:
    """The epoch time a ``Retry-After`` header asks us to wait until, or None.

    ``headers`` is a twisted ``Headers``; both forms of RFC 9110 are read:
    delay-seconds and an HTTP date.  Nonsense is ignored rather than trusted.
    """
    values: Sequence[bytes | str] | None = headers.getRawHeaders(b"retry-after")
    if not values:
        values = headers.getRawHeaders("retry-after")
    if not values:
        return None
    first = values[0]
    value = (first.decode("latin-1") if isinstance(first, bytes) else first).strip()
    if value.isdigit():
        return now + min(int(value), 86400)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return min(max(when.timestamp(), now), now + 86400)


@defer.inlineCallbacks
def read_body(response: IResponse,
              limit: int = MAX_ERROR_BODY) -> Generator[defer.Deferred[Any], Any, bytes]:
    """The body of ``response``, at most ``limit`` bytes (the rest discarded)."""
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        if size < limit:
            chunks.append(data[: limit - size])
        size += len(data)

    try:
        yield treq.collect(response, collect)
    except Exception:
        # a body cut short is still useful for the error detail
        pass
    return b"".join(chunks)


def json_error(body: bytes) -> tuple[Any, Any, Any]:
    """``(code, message, extra)`` from a Graph/Google error body, or Nones."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None, None, None
    if not isinstance(data, dict):
        return None, None, None
    err = data.get("error")
    if isinstance(err, dict):
        return err.get("code"), err.get("message"), err
    if isinstance(err, str):
        # OAuth token endpoints: {"error": "invalid_grant", "error_description": "..."}
        return err, data.get("error_description"), data
    return None, None, data


def handshake_failed(failure: Failure) -> bool:
    """Did ``failure`` end the connection before TLS was up (nothing sent)?"""
    if failure.check(TLSHandshakeLost, SSL.Error):
        return True
    reasons = getattr(failure.value, "reasons", None) or ()
    return bool(reasons) and all(r.check(TLSHandshakeLost, SSL.Error) for r in reasons)


def describe_failure(failure: Failure) -> str:
    """A connection-level failure (no HTTP answer) as one line for the log."""
    e = failure.value
    if failure.check(defer.TimeoutError, defer.CancelledError, net_error.TimeoutError):
        return "timed out waiting for the server"
    if failure.check(net_error.ConnectionRefusedError):
        return "connection refused"
    if failure.check(net_error.DNSLookupError):
        return f"cannot resolve the host name ({e})"
    if failure.check(SSL.Error):
        return f"TLS error: {_ssl_reason(e)}"
    inner = getattr(e, "reasons", None)
    if inner:
        # twisted.web's ResponseNeverReceived / RequestTransmissionFailed wrap failures
        for f in inner:
            if f.check(SSL.Error):
                return f"TLS error: {_ssl_reason(f.value)}"
            if f.check(TLSHandshakeLost):
                return f"TLS error: {f.value}"
        return f"connection failed: {inner[0].getErrorMessage() or type(inner[0].value).__name__}"
    if failure.check(net_error.ConnectError, net_error.ConnectionLost,
                     net_error.ConnectionDone):
        return f"connection failed: {type(e).__name__}"
    return f"{type(e).__name__}: {failure.getErrorMessage()}"


def _ssl_reason(e: object) -> str:
    args: tuple[Any, ...] = getattr(e, "args", ())
    try:
        parts = [str(x[2]) for x in args[0] if isinstance(x, tuple) and len(x) == 3]
    except (IndexError, TypeError):
        parts = []
    return ", ".join(p for p in parts if p) or str(e)
