"""What the relay does with each answer of Microsoft Graph and Entra ID (pure, no I/O).

:func:`classify` turns one Graph answer (HTTP status, the ``error.code`` and
``error.message`` of its body, its request-id and ``Retry-After``) into a
:class:`Verdict`: ``permanent`` (the message can never be sent this way),
``temporary`` (retry later, maybe not before a time, maybe for the whole
mailbox), ``refresh`` (get a new token and try once more) or ``too_large``
(switch to the draft and upload-session form).  :func:`classify_token` does
the same for what msal returns or raises while getting a token: every token
problem is temporary (an administrator fixes a secret, the queue then
drains), and the credential ones are named so that the status page can say
why.  The rules are those of ``providers.md``; the table is tested
exhaustively in ``tests/test_provider_graph_errors.py``.

Details are one line, name the status, Graph's code and message and the
request-id, and never carry a token or a secret (Graph and Entra do not put
them in their answers; the provider scrubs the configured secret as well).
"""

from __future__ import annotations

import re
from typing import Any

import attr

PERMANENT = "permanent"
TEMPORARY = "temporary"
REFRESH = "refresh"
TOO_LARGE = "too_large"

MAX_TEXT = 300
# without a Retry-After, how long a throttled mailbox rests (Graph's own answers carry one)
DEFAULT_THROTTLE_SECONDS = 10.0

# operations that act on a draft: Mail.ReadWrite, where the others need Mail.Send
DRAFT_OPERATIONS = frozenset({"createMessage", "updateMessage", "addAttachment",
                              "createUploadSession", "upload", "deleteMessage"})


@attr.frozen
class Verdict:
    action: str  # PERMANENT | TEMPORARY | REFRESH | TOO_LARGE
    detail: str
    not_before: float | None = None
    mailbox_wide: bool = False
    # for token answers: what is wrong with the credential (None: nothing the admin must fix)
    credential_problem: str | None = None


def one_line(text: object, limit: int = MAX_TEXT) -> str:
    """``text`` without line breaks or runs of blanks, cut to ``limit`` characters."""
    if text is None:
        return ""
    text = re.sub(r"\s+", " ", str(text)).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(status: int, code: str | None = None, message: str | None = None,
             request_id: str | None = None) -> str:
    """``Graph 403 ErrorSendAsDenied: <message> (request-id ...)``."""
    parts = [f"Graph {status}"]
    if code:
        parts.append(f" {one_line(code, 80)}")
    if message:
        parts.append(f": {one_line(message)}")
    if request_id:
        parts.append(f" (request-id {one_line(request_id, 80)})")
    return "".join(parts)


_OPERATION_TEXT = {
    "sendMail": "sendMail",
    "createMessage": "creating the draft",
    "updateMessage": "setting the draft's recipients",
    "addAttachment": "adding an attachment",
    "createUploadSession": "creating an upload session",
    "upload": "uploading an attachment",
    "send": "sending the draft",
    "deleteMessage": "deleting the draft",
    "getUser": "reading the user",
    "getApplication": "reading the application",
}


def operation_text(operation: str | None) -> str:
    if not operation:
        return "request"
    return _OPERATION_TEXT.get(operation, operation)


def _access_denied_hint(operation: str, message: str | None) -> str:
    text = (message or "").lower()
    if "accesspolicy" in text or "access policy" in text or "rbac" in text:
        return ("the app may not act on this mailbox: add it to the app's RBAC for "
                "Applications scope or application access policy")
    if operation in DRAFT_OPERATIONS:
        return ("the app lacks Mail.ReadWrite (needed for large messages, recipients that "
                "differ from the headers and save_to_sent_items = false), or its admin "
                "consent")
    return "the app lacks the Mail.Send application permission, or its admin consent"


_PERMANENT_HINTS = {
    "ErrorSendAsDenied": ("the mailbox may not send as the message's From address: grant "
                          "it Send As, or use sender.on_disallowed = \"rewrite\""),
    "ErrorInvalidUser": "no such mailbox in the tenant",
    "MailboxNotEnabledForRESTAPI": ("the mailbox is inactive, soft-deleted or hosted "
                                    "on-premises"),
    "ErrorMessageSizeExceeded": ("larger than the mailbox's maximum send size "
                                 "(Set-Mailbox -MaxSendSize, up to 150MB)"),
    "ErrorInvalidRecipients": "a recipient was refused",
    "ErrorMimeContentInvalidBase64String": "Graph could not read the message",
    "Request_ResourceNotFound": "no such user in the tenant",
}

# 404s that name the mailbox: the message can never be sent as it
_PERMANENT_404 = frozenset({"ErrorInvalidUser", "MailboxNotEnabledForRESTAPI",
                            "Request_ResourceNotFound"})
# 4xx answers that are about timing, not about the message
_TEMPORARY_4XX = frozenset({408, 409, 412, 416, 423, 424, 425})


def classify(status: int, code: str | None = None, message: str | None = None,
             request_id: str | None = None, retry_after: float | None = None, now: float = 0.0,
             operation: str = "sendMail", refreshed: bool = False) -> Verdict:
    """The :class:`Verdict` for one Graph answer that was not a success.

    ``retry_after`` is the epoch time of a ``Retry-After`` header (or None),
    ``now`` the current time, ``operation`` one of the fake's route names
    (``sendMail``, ``createMessage``, ``upload``, ...), ``refreshed`` whether
    the token was already renewed once for this request.
    """
    said = _Said(f"{operation_text(operation)}: {describe(status, code, message, request_id)}")
    if status == 401:
        return _unauthorized(said, operation, refreshed)
    if status == 413:
        return said.verdict(TOO_LARGE)
    if status == 429:
        until = retry_after if retry_after is not None else now + DEFAULT_THROTTLE_SECONDS
        return said.verdict(TEMPORARY, "throttled: the whole mailbox waits", until, True)
    if status >= 500:
        if retry_after is not None:
            return said.verdict(TEMPORARY, None, retry_after, True)
        return said.verdict(TEMPORARY)
    if 400 <= status < 500:
        return _refused(said, status, code, message, operation, retry_after)
    # 1xx/3xx where an answer of 2xx was expected: not the message's fault
    return said.verdict(TEMPORARY, "unexpected answer")


@attr.frozen
class _Said:
    """What Graph said, in words: every verdict's detail starts with it."""

    base: str

    def verdict(self, action: str, hint: str | None = None, not_before: float | None = None,
                mailbox_wide: bool = False) -> Verdict:
        detail = self.base if not hint else f"{self.base} ({hint})"
        return Verdict(action, detail, not_before, mailbox_wide)


def _unauthorized(said: _Said, operation: str, refreshed: bool) -> Verdict:
    if operation == "upload":  # the upload URL carries its own, short-lived authorization
        return said.verdict(TEMPORARY, "the upload session's URL was refused (expired?)")
    if not refreshed:
        return said.verdict(REFRESH)
    return said.verdict(TEMPORARY, "the token was refused twice; retrying later")


def _refused(said: _Said, status: int, code: str | None, message: str | None, operation: str,
             retry_after: float | None) -> Verdict:
    """A 4xx other than 401, 413 and 429."""
    if status == 403:
        if code == "ErrorAccessDenied":
            return said.verdict(PERMANENT, _access_denied_hint(operation, message))
        return said.verdict(PERMANENT, _hint(code))
    if status == 404:
        if code in _PERMANENT_404:
            return said.verdict(PERMANENT, _hint(code))
        # a draft that vanished, or an endpoint that is wrong (provider.graph_endpoint):
        # neither is the message's fault
        return said.verdict(TEMPORARY, "not found: check provider.graph_endpoint"
                            if code not in ("ErrorItemNotFound",) else None)
    if status in _TEMPORARY_4XX:
        return said.verdict(TEMPORARY, None, retry_after, retry_after is not None)
    return said.verdict(PERMANENT, _hint(code))


def _hint(code: str | None) -> str | None:
    return _PERMANENT_HINTS.get(code) if code is not None else None


# ---------------------------------------------------------------- tokens (Entra ID, msal)

_AADSTS = re.compile(r"AADSTS(\d+)")

# AADSTS numbers that say the credential or the registration is wrong
_CREDENTIAL_CODES = {
    7000215: "the client secret was rejected",
    7000222: "the client secret has expired",
    7000218: "no credential was sent",
    700016: "the application (client_id) is not registered in the tenant",
    90002: "the tenant (tenant_id) was not found",
    900023: "the tenant (tenant_id) is not valid",
    700027: "the certificate was rejected",
    700024: "the certificate's client assertion was out of its time range",
    700021: "the certificate's client assertion names another application",
    50027: "the certificate's client assertion is malformed",
    500011: "Graph (provider.graph_endpoint) is not known to the tenant",
    1002012: "the scope was refused",
    7000112: "the application is disabled",
    700025: "the application is not allowed to use a client secret",
}
_CREDENTIAL_ERRORS = frozenset({"invalid_client", "unauthorized_client", "invalid_tenant",
                                "invalid_resource", "invalid_scope"})


def aadsts_code(result: dict[str, Any]) -> int | None:
    """The AADSTS number of an Entra error answer, or None."""
    codes = result.get("error_codes")
    if isinstance(codes, list) and codes and isinstance(codes[0], int):
        return codes[0]
    m = _AADSTS.search(str(result.get("error_description") or ""))
    return int(m.group(1)) if m else None


def _first_line(text: object) -> str:
    return one_line(str(text or "").replace("\r", "\n").split("\n", 1)[0])


def classify_token(result: dict[str, Any]) -> Verdict:
    """The Verdict for an msal answer without ``access_token`` (``{"error", ...}``)."""
    error = str(result.get("error") or "unknown_error")
    number = aadsts_code(result)
    description = _first_line(result.get("error_description"))
    detail = f"cannot get a token: {error}"
    if description:
        detail += f": {description}"
    problem = None
    if number in _CREDENTIAL_CODES:
        problem = f"{_CREDENTIAL_CODES[number]} (AADSTS{number})"
    elif error in _CREDENTIAL_ERRORS:
        problem = f"the token service refused the credential ({error}" + (
            f", AADSTS{number})" if number else ")")
    return Verdict(TEMPORARY, detail, credential_problem=problem)


def classify_token_exception(kind: str, text: str, status: int | None = None) -> Verdict:
    """The Verdict for msal raising instead of answering.

    ``kind`` is the exception's class name, ``text`` its message, ``status``
    an HTTP status when one is known (msal raises on 5xx).
    """
    text = _first_line(text)
    if status is not None:
        detail = f"cannot get a token: the token endpoint answered HTTP {status}"
    elif kind in ("SSLError",):
        detail = f"cannot get a token: TLS error with the token endpoint: {text}"
    elif kind in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout",
                  "ChunkedEncodingError", "ProxyError"):
        detail = f"cannot get a token: the token endpoint is unreachable ({kind}: {text})"
    elif "authority configuration" in text or "openid" in text.lower():
        detail = ("cannot get a token: cannot read the OpenID configuration of the "
                  f"authority ({text})")
    else:
        detail = f"cannot get a token: {kind}: {text}" if text else f"cannot get a token: {kind}"
    return Verdict(TEMPORARY, one_line(detail, 400))
