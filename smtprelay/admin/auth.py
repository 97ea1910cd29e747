"""Who may use the admin API: the bearer token, and a guard against other web sites.

``token_ok`` compares the ``Authorization: Bearer`` value with ``[admin] token``
in constant time (``hmac.compare_digest`` over bytes of any length).  A token
travels in a header that another web site cannot make a browser send, so
with a token nothing more is needed (and a reverse proxy that rewrites Host or
Origin keeps working).  With no token configured the API only listens on
loopback (``config.py`` refuses anything else), but a web page the
administrator happens to visit could still reach 127.0.0.1: then
``foreign_request`` refuses requests a browser marks as coming from another
origin, and a Host that is not a loopback name (DNS rebinding).
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import urlsplit


def bearer(header: bytes | str | None) -> str | None:
    """The token of an ``Authorization`` header value (bytes or str), or None."""
    if header is None:
        return None
    if isinstance(header, bytes):
        try:
            header = header.decode("ascii")
        except UnicodeDecodeError:
            return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    value = value.strip()
    return value or None


def token_ok(header: bytes | str | None, token: str | None) -> bool:
    """True when ``header`` carries ``token`` (a str); always True when no token is set."""
    if not token:
        return True
    given = bearer(header)
    # compare something of the same type even when the header is missing: the time
    # taken does not tell whether a token was sent
    given_bytes = (given or "").encode("utf-8")
    return hmac.compare_digest(given_bytes, token.encode("utf-8")) and given is not None


def _is_loopback_host(host: str) -> bool:
    if host in ("localhost", "localhost.") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_of(hostport: str) -> str:
    """``"127.0.0.1:8025"`` / ``"[::1]:8025"`` / ``"example"`` -> the host part."""
    if hostport.startswith("["):
        return hostport[1:].partition("]")[0]
    return hostport.rpartition(":")[0] if hostport.count(":") == 1 else hostport


def foreign_request(host: str | None, origin: str | None, sec_fetch_site: str | None,
                    token_set: bool) -> str | None:
    """A reason to refuse a request from another web site, or None.

    ``host``/``origin``/``sec_fetch_site`` are header values (str or None).
    """
    if token_set:
        return None
    if sec_fetch_site and sec_fetch_site not in ("same-origin", "none"):
        return "cross-site request refused"
    if origin and origin != "null":
        netloc = urlsplit(origin).netloc
        if not host or netloc.lower() != host.lower():
            return "cross-origin request refused"
    elif origin == "null":
        return "cross-origin request refused"
    if host and not _is_loopback_host(_host_of(host).lower()):
        return "without [admin] token the API answers only to a loopback Host"
    return None
