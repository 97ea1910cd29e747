"""What Google's answers mean for a delivery: pure functions, no I/O, no clock of their own.

Owns, for :mod:`smtprelay.providers.gmail.provider`, the classification of

* Gmail API answers to ``messages.send`` (:func:`classify_send`): sent (with the
  message id), a rate limit that holds back the whole mailbox, 401 (refresh the
  token once), temporary or permanent, as ``providers.md`` says;
* token endpoint errors as google-auth raises them (:func:`classify_token_error`):
  credential problems that defer and warn (delegation not granted, revoked refresh
  token, rejected key or client), an unknown mailbox (permanent), an unavailable
  endpoint (temporary);
* network failures of ``requests`` (:func:`describe_transport_error`) as one line;

and the back-off of a rate-limited mailbox (:func:`backoff_delay`,
:func:`retry_at_in_message`).  Every detail is one line with the status, the
reason and Google's message, and never carries a token
(:func:`smtprelay.scrub.scrub_tokens`).
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterable

import attr

from smtprelay.scrub import scrub_tokens

GMAIL_SEND = "https://www.googleapis.com/auth/gmail.send"
# scopes that allow users.messages.send (Gmail API reference, "Authorization scopes")
SEND_SCOPES = frozenset({
    GMAIL_SEND,
    "https://www.googleapis.com/auth/gmail.compose",
    "https://www.googleapis.com/auth/gmail.modify",
    "https://mail.google.com/",
})
MAX_MESSAGE_BYTES = 36_700_160  # 35 MiB: the media upload limit of messages.send
RATE_LIMIT_REASONS = frozenset({"userRateLimitExceeded", "rateLimitExceeded",
                                "dailyLimitExceeded", "quotaExceeded"})
FIRST_BACKOFF = 60.0
DAILY_BACKOFF = 3600.0
MAX_BACKOFF = 3600.0
MAX_DETAIL = 300

_RETRY_AFTER_TEXT = re.compile(
    r"(?i)retry after (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d))")


def one_line(text: object, limit: int = MAX_DETAIL) -> str:
    """``text`` on one line, without token-shaped words, at most ``limit`` characters."""
    text = " ".join(str(text).split())
    text = scrub_tokens(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_scope(scope: str) -> str:
    prefix = "https://www.googleapis.com/auth/"
    return scope[len(prefix):] if scope.startswith(prefix) else scope


def can_send(scopes: Iterable[str]) -> bool:
    return any(s in SEND_SCOPES for s in scopes)


# --- the Gmail API ---------------------------------------------------------------------


@attr.frozen
class Answer:
    """A classified answer of ``messages.send``."""

    kind: str  # "sent" | "rate_limit" | "unauthorized" | "temporary" | "permanent"
    #           | "ambiguous" (no answer after the whole message went out)
    detail: str
    status: int | None = None
    reason: str | None = None
    provider_id: str | None = None
    retry_at: float | None = None  # a time Google named in its message
    daily: bool = False  # a daily limit: back off longer


def _google_error(body: bytes) -> tuple[str | None, str | None]:
    """(reason, message) from a Google API error body, or (None, None)."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None, None
    if not isinstance(data, dict) or not isinstance(data.get("error"), dict):
        return None, None
    err = data["error"]
    reason = None
    errors = err.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        reason = errors[0].get("reason")
        message = errors[0].get("message") or err.get("message")
    else:
        message = err.get("message")
    if not reason:
        reason = err.get("status")
    # the top-level message says more for auth errors ("Request had insufficient ...")
    top = err.get("message")
    if isinstance(top, str) and top and top != message and reason in (
            "insufficientPermissions", "authError", "required"):
        message = top
    return (str(reason) if reason else None), (str(message) if message else None)


def _text_of(body: bytes) -> str:
    """A short, tag-free text of a non-JSON body (a proxy's error page)."""
    text = body[:2000].decode("utf-8", "replace")
    text = re.sub(r"<[^>]*>", " ", text)
    return one_line(text, 120)


def retry_at_in_message(message: str | None, now: float) -> float | None:
    """The time in "... Retry after 2025-11-24T10:00:00.000Z" (Gmail's 429), or None."""
    if not message:
        return None
    m = _RETRY_AFTER_TEXT.search(message)
    if not m:
        return None
    try:
        when = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return min(max(when.timestamp(), now), now + 86400)


def classify_send(status: int, body: bytes, now: float) -> Answer:
    """The :class:`Answer` for a ``messages.send`` response (``body`` as bytes)."""
    if 200 <= status < 300:
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            data = None
        if isinstance(data, dict) and isinstance(data.get("id"), str):
            ident = data["id"]
            thread = data.get("threadId")
            detail = f"{status} id={ident}" + (f" threadId={thread}" if thread else "")
            return Answer("sent", one_line(detail), status, provider_id=one_line(ident, 100))
        return Answer("sent", f"{status} (no message id in Gmail's answer)", status)

    reason, message = _google_error(body)
    if reason or message:
        detail = one_line(f"{status} {reason or 'error'}: {message or ''}".rstrip(": "))
    else:
        text = _text_of(body)
        detail = one_line(f"{status} (not a Google error body){': ' + text if text else ''}")

    if status == 429 or (status == 403 and reason in RATE_LIMIT_REASONS):
        return Answer("rate_limit", detail, status, reason,
                      retry_at=retry_at_in_message(message, now),
                      daily=reason == "dailyLimitExceeded")
    if status == 401:
        return Answer("unauthorized", detail, status, reason)
    if status in (408, 409) or status >= 500:
        return Answer("temporary", detail, status, reason)
    if 400 <= status < 500:
        # the request itself is wrong: the message, the mailbox, the permission
        return Answer("permanent", detail, status, reason)
    # 1xx/3xx: a proxy or a misconfigured api_endpoint; an admin can fix it
    return Answer("temporary", detail + " (unexpected answer; check provider.api_endpoint)",
                  status, reason)


def backoff_delay(level: int, daily: bool = False) -> float:
    """The pause of a rate-limited mailbox without a Retry-After: 60 s doubling to 1 h
    (a daily limit: 1 h at once)."""
    first = DAILY_BACKOFF if daily else FIRST_BACKOFF
    return min(first * (2 ** max(0, min(level, 20))), MAX_BACKOFF if not daily else 4 * 3600.0)


# --- the token endpoint -----------------------------------------------------------------


@attr.frozen
class TokenFailure:
    """Why no token could be had, and what the delivery should do about it."""

    kind: str  # "credential" (defer and warn) | "permanent" | "temporary"
    detail: str
    expired: bool = False  # a user's refresh token revoked or expired


_TEMPORARY_TOKEN_ERRORS = frozenset({"internal_failure", "server_error",
                                     "temporarily_unavailable", "rate_limit_exceeded"})


def classify_token_error(error: str | None, description: str | None, retryable: bool,
                         mailbox: str, service_account: bool) -> TokenFailure:
    """The :class:`TokenFailure` for a token endpoint error answer.

    ``error``/``description`` are the OAuth ``error`` and ``error_description``
    (None when the answer was not JSON), ``retryable`` what google-auth decided
    after its own retries (429, 5xx, ``temporarily_unavailable``).
    """
    error = one_line(error or "", 60)
    said = one_line(f"{error}: {description}" if description else error or "no details", 240)
    if retryable or error in _TEMPORARY_TOKEN_ERRORS:
        return TokenFailure("temporary", f"the token endpoint is unavailable: {said}")
    if error == "unauthorized_client":
        return _unauthorized_client(said, mailbox, service_account)
    if error == "invalid_grant":
        return _invalid_grant(said, description or "", mailbox, service_account)
    if error == "invalid_client":
        return TokenFailure("credential",
                            f"the OAuth client was rejected (client_id or client_secret): {said}")
    if error == "invalid_scope":
        return TokenFailure("credential", f"the scope {GMAIL_SEND} was refused: {said}")
    if error:
        return TokenFailure("credential", f"the token endpoint refused the credential: {said}")
    return TokenFailure("temporary", f"the token endpoint gave an unexpected answer: {said}")


def _unauthorized_client(said: str, mailbox: str, service_account: bool) -> TokenFailure:
    if service_account:
        return TokenFailure(
            "credential",
            f"delegation not granted for {mailbox}: {said} (grant the service account's "
            f"client ID the scope {GMAIL_SEND} under domain-wide delegation)")
    return TokenFailure("credential", f"the refresh token belongs to another OAuth client: {said}")


def _invalid_grant(said: str, text: str, mailbox: str, service_account: bool) -> TokenFailure:
    """``invalid_grant``: an unknown user or a rejected key (service account), or a
    revoked refresh token (user OAuth); ``text`` is the error description."""
    if not service_account:
        return TokenFailure("credential", f"refresh token revoked or expired: {said}",
                            expired=True)
    if text.startswith("Invalid email or User ID"):
        return TokenFailure(
            "permanent",
            f"{mailbox} is not a user of the Google Workspace domain ({said}); with a "
            "service account the envelope sender must be a user's primary address")
    if "iat and exp" in text:
        return TokenFailure("credential",
                            f"the token endpoint refused the key's JWT as out of date "
                            f"({said}): check this machine's clock")
    return TokenFailure("credential", f"the service account key was rejected: {said}")


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")
_SSL_REASON = re.compile(r"\[SSL: ([A-Z_]+)\] ([^(')\]]+)")


def describe_transport_error(error: BaseException) -> str:
    """A ``requests``/``urllib3`` failure (as google-auth wraps it) as one short line."""
    seen: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in seen and len(seen) < 8:
        seen.append(e)
        e = e.args[0] if getattr(e, "args", None) and isinstance(e.args[0], BaseException) \
            else (e.__cause__ or e.__context__)
    names = {type(x).__name__ for x in seen}
    text = " ".join(str(x) for x in seen)
    if names & {"ConnectTimeout", "ReadTimeout", "Timeout", "TimeoutError", "socket.timeout"} \
            or "timed out" in text.lower():
        return "timed out"
    m = _SSL_REASON.search(text)
    if m or "SSLError" in names:
        return "TLS error: " + (one_line(m.group(2).strip(), 120) if m else "handshake failed")
    m = _ERRNO.search(text)
    if m:
        return "connection failed: " + one_line(m.group(1).strip(), 120)
    if "Connection refused" in text:
        return "connection failed: Connection refused"
    if names & {"ConnectionError", "NewConnectionError", "MaxRetryError", "ProtocolError",
                "RemoteDisconnected", "ConnectionResetError"}:
        return "connection failed: " + (type(seen[-1]).__name__)
    return one_line(f"{type(error).__name__}: {error}", 160)
