"""What an upstream SMTP server's replies mean: pure functions, no I/O.

The SMTP provider (:mod:`smtprelay.providers.smtp`) does the talking; this
module owns the reading of what was said:

- ``parse_reply_line`` / ``Reply``: one reply (possibly multi-line) and its
  one-line form for the delivery log;
- ``parse_ehlo`` / ``choose_auth``: the extensions an EHLO answer offers and
  the SASL mechanism to use (PLAIN before LOGIN);
- ``classify``: sent / temporary / permanent for a reply at a given stage
  (4xx temporary, 5xx permanent, but never permanent for a problem of the
  connection or of our credentials: an admin fixes those, and the queue must
  then drain rather than have bounced everything);
- ``combine``: per-recipient results -> the overall result and detail;
- ``describe_failure``: a one-line reason for a connection, TLS or timeout
  failure ("TLS: certificate verify failed (hostname mismatch ...)").
"""

from __future__ import annotations

import re

import attr

from smtprelay.model import Result

MAX_DETAIL = 400
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_SPACES = re.compile(r" {2,}")

# Stages of a session: a refusal here concerns the connection, not the message.
SESSION_STAGES = frozenset({"greeting", "ehlo", "helo", "starttls", "auth", "rset"})
# Stages of a transaction: the reply concerns this message (or this recipient).


def one_line(text: str, limit: int = MAX_DETAIL) -> str:
    """``text`` without control characters or runs of spaces, at most ``limit`` long."""
    text = _SPACES.sub(" ", _CONTROL.sub(" ", text)).strip()
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text


class MalformedReply(ValueError):
    """A line that is not ``DDD[ -]text``: the server does not speak SMTP."""


def parse_reply_line(line: bytes) -> tuple[int, bool, str]:
    """``b"250-SIZE 1000"`` -> ``(250, False, "SIZE 1000")``; the bool says final.

    A reply line is three digits, then a space (last line), a hyphen (more
    follow) or nothing (last line, no text).  Anything else raises
    :class:`MalformedReply`.
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    if len(line) < 3 or not line[:3].isdigit() or line[:1] not in b"12345":
        raise MalformedReply(f"malformed reply line {one_line(repr(line[:60]))}")
    sep = line[3:4]
    if sep not in (b"", b" ", b"-"):
        raise MalformedReply(f"malformed reply line {one_line(repr(line[:60]))}")
    return int(line[:3]), sep != b"-", line[4:].decode("utf-8", "replace")


@attr.frozen
class Reply:
    """One complete reply: its code and the text of each line."""

    code: int
    lines: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return " ".join(line.strip() for line in self.lines if line.strip())

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 status ("5.1.1") when the text starts with one."""
        m = re.match(r"([245]\.\d{1,3}\.\d{1,3})\b", self.text)
        return m.group(1) if m else None

    def __str__(self) -> str:
        """One line: ``550 5.1.1 <x@y>: Recipient address rejected``.

        A multi-line reply repeats its enhanced code on each line; it is
        shown once.
        """
        parts: list[str] = []
        status = self.enhanced
        for line in self.lines:
            line = line.strip()
            if status and parts and line.startswith(status + " "):
                line = line[len(status) + 1:]
            if line:
                parts.append(line)
        return one_line(f"{self.code} {' '.join(parts)}".strip())


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO reply -> ``{KEYWORD: "params"}`` (keywords upper-cased; the first
    line is the server's name, not an extension)."""
    out: dict[str, str] = {}
    for line in reply.lines[1:]:
        words = line.strip().split(None, 1)
        if not words:
            continue
        keyword = words[0].upper()
        params = words[1].strip() if len(words) > 1 else ""
        if keyword.startswith("AUTH="):
            # old servers also announce "AUTH=LOGIN PLAIN" (a pre-RFC 2554 draft)
            keyword, params = "AUTH", f"{keyword[5:]} {params}"
        if keyword == "AUTH" and "AUTH" in out:
            params = f"{out['AUTH']} {params}"
        out[keyword] = params.strip()
    return out


def auth_mechanisms(extensions: dict[str, str]) -> set[str]:
    """The SASL mechanisms offered, upper-cased."""
    if "AUTH" not in extensions:
        return set()
    return {m.upper() for m in extensions["AUTH"].split()}


def choose_auth(extensions: dict[str, str]) -> str | None:
    """"PLAIN" or "LOGIN" (in that order of preference), or None."""
    offered = auth_mechanisms(extensions)
    for mechanism in ("PLAIN", "LOGIN"):
        if mechanism in offered:
            return mechanism
    return None


def size_limit(extensions: dict[str, str]) -> int | None:
    """The server's SIZE limit in octets, or None when it declares none."""
    value = extensions.get("SIZE", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return None


def classify(reply: Reply, stage: str) -> Result:
    """The :class:`Result` of ``reply`` to the command of ``stage``.

    2xx is sent, 4xx temporary, 5xx permanent: for the message stages
    ("mail", "rcpt", "data", "dot").  Two exceptions keep messages queued
    until an admin acts, since the message itself is not at fault:

    - 530 (authentication or STARTTLS required) and any 5.7.0 / 5.7.8 /
      5.7.9 / 5.7.11 / 5.7.14 status (authentication problems, RFC 4954) at
      any stage;
    - every refusal of a session stage (greeting, EHLO, STARTTLS, AUTH,
      RSET): the server refuses the connection, not the message.

    Codes outside 2xx-5xx (1xx, 3xx where not expected) mean the exchange went
    wrong: temporary.
    """
    code = reply.code
    if 200 <= code < 300:
        return Result.SENT
    if stage in SESSION_STAGES:
        return Result.TEMPORARY
    if code == 530 or code in (534, 535, 538) or reply.enhanced in _AUTH_STATUSES:
        return Result.TEMPORARY
    if 500 <= code < 600:
        return Result.PERMANENT
    return Result.TEMPORARY


# RFC 4954 / 3463 statuses that concern the client's credentials or TLS, not the message
_AUTH_STATUSES = frozenset({"5.7.0", "5.7.8", "5.7.9", "5.7.11", "5.7.14"})

_QUEUE_ID = (
    re.compile(r"queued as ([A-Za-z0-9][A-Za-z0-9._@/+=-]*)", re.I),  # Postfix, Sendmail-likes
    re.compile(r"\bid[= ]([A-Za-z0-9][A-Za-z0-9._@/+=-]{3,})", re.I),  # Exim "id=1abcd-..."
    re.compile(r"(<[^<>\s]+@[^<>\s]+>)"),  # Exchange: the Message-ID it assigned
)


def queue_id(reply: Reply) -> str | None:
    """The upstream's id for an accepted message, when its reply names one."""
    text = reply.text
    for pattern in _QUEUE_ID:
        m = pattern.search(text)
        if m:
            return m.group(1)[:200]
    return None


def overall(results: dict[str, tuple[Result, str]]) -> Result:
    """The result that stands for a set of per-recipient results.

    SENT as soon as one recipient got it (the rest is reported per
    recipient), else TEMPORARY if one will be retried, else PERMANENT.
    """
    kinds = {r for r, _ in results.values()}
    if Result.SENT in kinds or not kinds:
        return Result.SENT
    if Result.TEMPORARY in kinds:
        return Result.TEMPORARY
    return Result.PERMANENT


def combine(results: dict[str, tuple[Result, str]]) -> tuple[Result, str]:
    """``{address: (Result, detail)}`` -> ``(Result, detail)`` for the whole message.

    One detail when all recipients share it, else ``address: detail`` pairs
    (as the queue's delivery log writes partial deliveries).
    """
    details = {d for _, d in results.values()}
    if len(details) == 1:
        detail = details.pop()
    else:
        detail = "; ".join(f"{a}: {d}" for a, (_, d) in results.items())
    return overall(results), one_line(detail, MAX_DETAIL * 2)


# -- failures without a reply ----------------------------------------------------------


def ssl_reasons(exc: BaseException) -> list[str]:
    """The reason strings of an OpenSSL error (``[(lib, func, reason), ...]``)."""
    reasons: list[str] = []
    for arg in getattr(exc, "args", ()):
        if isinstance(arg, list):
            for item in arg:
                if isinstance(item, tuple) and item:
                    reasons.append(str(item[-1]))
                elif item:
                    reasons.append(str(item))
        elif isinstance(arg, str) and arg:
            reasons.append(arg)
    return [r for r in reasons if r]


def is_tls_failure(exc: BaseException | None) -> bool:
    """True for a failed TLS handshake or certificate verification."""
    from OpenSSL import SSL

    if isinstance(exc, SSL.Error):
        return True
    try:
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover - service_identity is a dependency
        return False
    return isinstance(exc, VerificationError)


def describe_tls_failure(exc: BaseException, host: str,
                         verify_reason: str | None = None) -> str:
    """One line for a failed handshake: what went wrong, as an admin would search it.

    ``verify_reason`` is what the certificate chain check said, when known
    ("unable to get local issuer certificate", "certificate has expired").
    """
    from service_identity import VerificationError

    if isinstance(exc, VerificationError):
        return (f"TLS: certificate verify failed (hostname mismatch: the certificate "
                f"is not valid for {host})")
    reasons = ssl_reasons(exc)
    if any("certificate verify failed" in r for r in reasons):
        why = f" ({verify_reason})" if verify_reason else ""
        return f"TLS: certificate verify failed{why}"
    if reasons:
        return one_line("TLS: handshake failed: " + ", ".join(dict.fromkeys(reasons)))
    return "TLS: handshake failed"


def describe_connection_failure(exc: BaseException, host: str, port: int,
                                timeout: float) -> str:
    """One line for a connection that could not be made or was lost."""
    from twisted.internet import defer, error

    where = f"{host}:{port}"
    if isinstance(exc, error.DNSLookupError):
        return f"cannot resolve {host} (DNS lookup failed)"
    if isinstance(exc, error.ConnectionRefusedError):
        return f"{where}: connection refused"
    if isinstance(exc, (error.TimeoutError, defer.TimeoutError, TimeoutError)):
        return f"{where}: no connection within {timeout:g}s (connect timeout)"
    if isinstance(exc, error.NoRouteError):
        return f"{where}: no route to host"
    if isinstance(exc, error.ConnectionLost):
        return f"{where}: connection reset by the server"
    if isinstance(exc, error.ConnectionDone):
        return f"{where}: connection closed by the server"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{where}: {exc.strerror}"
    text = str(exc) or type(exc).__name__
    return one_line(f"{where}: {text}")
