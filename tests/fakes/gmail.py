"""A faithful fake of Google's OAuth 2.0 token endpoint and the Gmail API send call, over HTTPS.

Owns everything the gmail provider talks to: ``POST /token`` (service-account JWT
bearer grant with domain-wide delegation, and the refresh-token grant of user OAuth),
``POST /upload/gmail/v1/users/{userId}/messages/send`` (media and multipart upload),
``POST /gmail/v1/users/{userId}/messages/send`` (JSON ``raw``) and
``GET /gmail/v1/users/{userId}/profile`` (what a connection test might call: it needs a
read or compose scope, gmail.send alone gets 403), the state behind them, fault
scripting, and a control API under ``/_fake/``.  It is kind to nobody: what works
against it must work against Google (see ``/work/shared/spec/providers.md``).  What
Gmail does to the message itself lives in :mod:`tests.fakes.gmail_message`; key files
and OAuth users for tests in :mod:`tests.fakes.google_accounts`.

Running it
----------
In-process (tests; everything on the reactor thread)::

    fake = FakeGoogle(reactor)                      # optional: clock=task.Clock()
    server = fake.listen(TestCA(ca_dir))            # reactor.listenSSL(0, ..., "127.0.0.1")
    server.token_uri, server.api_endpoint           # https://127.0.0.1:PORT/token, ...
    fake.add_mailbox("alice@example.com")
    ServiceAccountKey.generate().register(fake, {"alice@example.com": [GMAIL_SEND]})
    ...
    yield fake.stop()                               # closes every connection it accepted

``listen(fake, ca)`` is the same as ``fake.listen(ca)``; ``fake.resource()`` is the
twisted.web resource and ``make_site(fake)`` a Site for it if you listen yourself
(``refuse_connections`` then is not available).  ``clock`` (default: the reactor) times
access-token expiry, refresh-token expiry and the rate-limit window; JWT
``iat``/``exp`` are checked against the wall clock (``wall``), as google-auth signs them
with it.  ``fake.next_request(route)`` fires once the next request of a route has been
dealt with, so tests wait for events instead of time.  State is for the reactor thread
only: from another thread use ``blockingCallFromThread`` or the control API.

As a process (benchmarks, end-to-end tests)::

    python -m tests.fakes.gmail --port 0 --ca-dir DIR [--latency 0.05 | token=0.1,send=0.3]
        [--token-lifetime 3599] [--state state.json] [--seed 0] [--no-bodies]

prints one JSON line ``{"port": N}`` once listening; the clients trust ``DIR/ca.pem``.
``--state`` takes a JSON object with any of the lists ``mailboxes``,
``service_accounts``, ``oauth_clients``, ``refresh_tokens``, ``faults``,
``rate_limits``, each item being the body of the control call of that name, and
``config`` (the body of ``POST /_fake/config``).  ``--no-bodies`` (benchmarks) records
the size and SHA-256 of each message instead of its bytes.  SIGTERM stops it.

Control API (JSON, no auth; each call is also a method of FakeGoogle)
---------------------------------------------------------------------
=============================  ===========================================================
POST /_fake/mailboxes          ``{"address", "send_as": [addr | {"address", "verified"}],
                               "gmail_enabled": true}`` -> ``add_mailbox`` (a Workspace
                               user; an unknown ``sub`` gets "Invalid email or User ID")
POST /_fake/service-accounts   ``{"client_email", "client_id", "keys": {kid: public PEM},
                               "delegations": {"user@d" | "@d" | "*": [scopes]}}``
                               -> ``add_service_account`` (see google_accounts)
POST /_fake/delegations        ``{"client_email", "subject", "scopes"}``; ``[]`` revokes
                               -> ``grant_delegation``
POST /_fake/oauth-clients      ``{"client_id", "client_secret"}`` -> ``add_oauth_client``
POST /_fake/refresh-tokens     ``{"refresh_token", "client_id", "mailbox", "scopes",
                               "revoked": false, "expires_in": null}`` -> ``add_refresh_token``
POST /_fake/refresh-tokens/revoke  ``{"refresh_token"}`` -> ``revoke_refresh_token``
POST /_fake/config             ``{"token_lifetime", "latency": {route: seconds},
                               "max_message_bytes", "keep_bodies"}`` -> ``configure``
POST /_fake/access-tokens/expire   ``{"owner": addr | null}`` -> ``expire_access_tokens``
POST /_fake/faults             a fault script (below) -> ``add_fault``, answers ``{"id"}``
GET  /_fake/faults, POST /_fake/faults/clear (or DELETE /_fake/faults) -> ``clear_faults``
POST /_fake/rate-limits        ``{"mailbox": addr | null (all), "max_sends", "window",
                               "status": 429 | 403, "reason", "retry_after_header"}``
                               -> ``set_rate_limit``; ``/rate-limits/clear`` removes all
POST /_fake/refuse             ``{"seconds": null | N}``: stop listening (connections are
                               refused) until ``POST /_fake/accept`` (in-process) or for
                               N seconds -> ``refuse_connections`` / ``accept_connections``
POST /_fake/hung/drop          abort the connections of requests left hanging
GET  /_fake/messages           ``?mailbox=&bodies=0`` what was sent: ids, recipients, From
                               before and after, headers, ``raw`` and ``delivered`` (base64),
                               sizes and SHA-256 -> ``messages`` / ``messages_for()``
GET  /_fake/token-requests     every token request (grant, client, subject, status, error,
                               JWT claims) and ``counts`` per subject (the service
                               account's own email without ``sub``) -> ``token_requests``,
                               ``token_counts``
GET  /_fake/state              the whole configuration and the counters
POST /_fake/reset              back to an empty fake (listeners stay)
=============================  ===========================================================

A fault script: ``{"route": "token" | "send" | "profile", "kind": "reply" | "hang" |
"drop", "count": N | null (forever), "after": M (let M matching requests pass first),
"probability": p (storms; seeded by ``seed``), "mailbox": addr (Gmail routes only),
"process": false}``; the first script that matches a request decides it.  ``reply``
answers ``status`` with ``headers``, ``body`` (dict or text) or a Google-shaped body
built from ``reason``/``message``; ``retry_after`` (seconds) or ``retry_after_date``
(seconds from now, sent as an HTTP date) add ``Retry-After``.
``hang`` reads the whole body and never answers; ``drop`` reads it and aborts the
connection; with ``"process": true`` the request is carried out (the message is sent
and recorded) before the answer is withheld: the ambiguous outcome.  Latency delays
every answer of a route.

What it verifies
----------------
``/token``, JWT bearer: RS256 signature against the key named by ``kid`` (or any key
of the account without ``kid``), ``iss`` a registered ``client_email``, ``aud`` Google's
token URL (google-auth keeps it when ``token_uri`` points elsewhere), ``exp - iat`` at
most an hour and ``now`` inside, a ``scope``, ``sub`` an existing user and every
requested scope delegated to the account for it; errors are Google's (400
``invalid_grant``, 401 ``unauthorized_client``, 400 ``invalid_scope``).  Refresh grant:
400 ``invalid_request`` without client id, 401 ``invalid_client`` for an unknown client
or wrong secret, 400 ``invalid_grant`` "Token has been expired or revoked.", 400
``unauthorized_client`` for another client's token.  Success bodies: JWT grant
``{"access_token", "expires_in", "token_type"}``; refresh grant adds ``scope``.

Send: Bearer token known and unexpired (else 401 ``required``/``authError`` with
``WWW-Authenticate``), a scope that allows sending (else 403
``insufficientPermissions``), ``userId`` ``me`` or the token's own mailbox (else 403
"Delegation denied for <owner>"), a token of a user, not of a service account without
``sub`` (400 ``failedPrecondition``), Gmail enabled for the user, the rate limit,
``uploadType``, media type ``message/*``, at most ``max_message_bytes`` (36,700,160; over:
413 ``uploadTooLarge``), JSON ``raw`` in base64 (JSON bodies over 5 MiB: 400), then
the Gmail rules of :mod:`tests.fakes.gmail_message`.  Success: 200 ``{"id", "threadId",
"labelIds"}`` with fresh ids.  Error bodies are ``{"error": {"code", "message", "errors":
[{"message", "domain", "reason"}], "status"}}``.
"""

import argparse
import base64
import binascii
import email.utils
import hashlib
import json
import math
import random
import re
import secrets
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, unquote

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from twisted.internet import defer
from twisted.python import log
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.fakes import gmail_message
from tests.fakes.tlsca import TestCA

GMAIL_SEND = "https://www.googleapis.com/auth/gmail.send"
# Scopes that allow users.messages.send (Gmail API reference, "Authorization scopes").
SEND_SCOPES = frozenset(
    {
        GMAIL_SEND,
        "https://www.googleapis.com/auth/gmail.compose",
        "https://www.googleapis.com/auth/gmail.modify",
        "https://mail.google.com/",
    }
)
# google-auth signs aud = the first; Google still accepts its older token URLs.
# users.getProfile (a connection test) needs one of these: gmail.send is not among them.
PROFILE_SCOPES = frozenset(
    {
        "https://mail.google.com/",
        "https://www.googleapis.com/auth/gmail.modify",
        "https://www.googleapis.com/auth/gmail.compose",
        "https://www.googleapis.com/auth/gmail.readonly",
        "https://www.googleapis.com/auth/gmail.metadata",
    }
)
GOOGLE_TOKEN_AUDIENCES = frozenset(
    {
        "https://oauth2.googleapis.com/token",
        "https://www.googleapis.com/oauth2/v4/token",
        "https://accounts.google.com/o/oauth2/token",
    }
)
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
MAX_MESSAGE_BYTES = 36_700_160  # 35 MiB, the media upload limit of messages.send
MAX_JSON_BODY = 5 * 1024 * 1024  # metadata endpoint; Google's exact limit is unpublished
DEFAULT_TOKEN_LIFETIME = 3599  # what Google answers as expires_in
JWT_MAX_LIFETIME = 3600
JWT_CLOCK_SKEW = 60

UNAUTHORIZED_CLIENT = (
    "Client is unauthorized to retrieve access tokens using this method, or client not "
    "authorized for any of the scopes requested."
)
INVALID_JWT_SIGNATURE = "Invalid JWT Signature."
INVALID_JWT_TIMEFRAME = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
    "timeframe. Check your iat and exp values in the JWT claim."
)
INVALID_JWT_AUDIENCE = "Invalid JWT: Failed audience check."
ACCOUNT_NOT_FOUND = "Invalid grant: account not found"
INVALID_SUBJECT = "Invalid email or User ID"
INVALID_SCOPE = "Invalid OAuth scope or ID token audience provided."
TOKEN_EXPIRED_OR_REVOKED = "Token has been expired or revoked."
_SEE = "See https://developers.google.com/identity/sign-in/web/devconsole-project."
AUTH_MISSING = (
    "Request is missing required authentication credential. Expected OAuth 2 access "
    "token, login cookie or other valid authentication credential. " + _SEE
)
AUTH_INVALID = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, "
    "login cookie or other valid authentication credential. " + _SEE
)
INSUFFICIENT_SCOPES = "Request had insufficient authentication scopes."
RAW_REQUIRED = (
    "'raw' RFC822 payload message string or uploading message via /upload/* URL required"
)
UPLOAD_URL_REQUIRED = (
    "Upload requests must include an uploadType URL parameter and a URL path beginning "
    "with /upload/"
)

_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_DEFAULT_REASON = {
    400: ("badRequest", "Bad Request"),
    401: ("authError", "Invalid Credentials"),
    403: ("forbidden", "Forbidden"),
    404: ("notFound", "Requested entity was not found."),
    413: ("uploadTooLarge", "Media is too large. Limit: 35MB"),
    429: ("rateLimitExceeded", "Resource has been exhausted (e.g. check quota)."),
    500: ("backendError", "Internal error encountered."),
    502: ("backendError", "Bad Gateway"),
    503: ("backendError", "The service is currently unavailable."),
    504: ("backendError", "The service is currently unavailable."),
}
_REASON_MESSAGE = {
    "badRequest": "Bad Request",
    "invalidArgument": "Invalid argument",
    "failedPrecondition": "Precondition check failed.",
    "required": "Login Required.",
    "authError": "Invalid Credentials",
    "insufficientPermissions": "Insufficient Permission",
    "forbidden": "Forbidden",
    "userRateLimitExceeded": "User Rate Limit Exceeded",
    "rateLimitExceeded": "Rate Limit Exceeded",
    "dailyLimitExceeded": "Daily Limit Exceeded",
    "backendError": "Backend Error",
    "notFound": "Requested entity was not found.",
}
# the top-level "message" differs from errors[0].message for these
_TOP_MESSAGE = {
    "required": AUTH_MISSING,
    "authError": AUTH_INVALID,
    "insufficientPermissions": INSUFFICIENT_SCOPES,
}
_REASON_STATUS = {"failedPrecondition": "FAILED_PRECONDITION", "notImplemented": "UNIMPLEMENTED"}
_USAGE_LIMITS = frozenset(
    {"userRateLimitExceeded", "rateLimitExceeded", "dailyLimitExceeded", "quotaExceeded"}
)
_OAUTH_DEFAULT = {
    400: ("invalid_request", "Bad Request"),
    401: ("invalid_client", "Unauthorized"),
    403: ("access_denied", "Forbidden"),
    429: ("rate_limit_exceeded", "Rate Limit Exceeded"),
    500: ("internal_failure", "Backend Error"),
    503: ("temporarily_unavailable", "The service is currently unavailable."),
}

GMAIL_HEADERS = {
    "Content-Type": "application/json; charset=UTF-8",
    "Vary": "Origin, X-Origin, Referer",
}
TOKEN_HEADERS = {
    "Content-Type": "application/json; charset=utf-8",
    "Cache-Control": "no-cache, no-store, max-age=0, must-revalidate",
    "Pragma": "no-cache",
    "Expires": "Mon, 01 Jan 1990 00:00:00 GMT",
}


def gmail_error(
    code,
    reason=None,
    message=None,
    *,
    top_message=None,
    domain=None,
    status=None,
    details=None,
    **error_fields,
):
    """A Google API error body: ``{"error": {"code", "message", "errors", "status"}}``."""
    default_reason, default_message = _DEFAULT_REASON.get(code, ("backendError", "Backend Error"))
    if reason is None:
        reason = default_reason
        message = message or default_message
    message = message or _REASON_MESSAGE.get(reason, default_message)
    item = {
        "message": message,
        "domain": domain or ("usageLimits" if reason in _USAGE_LIMITS else "global"),
        "reason": reason,
    }
    item.update(error_fields)
    body = {
        "code": code,
        "message": top_message or _TOP_MESSAGE.get(reason, message),
        "errors": [item],
        "status": status or _REASON_STATUS.get(reason) or _STATUS.get(code, "UNKNOWN"),
    }
    if details:
        body["details"] = details
    return {"error": body}


def oauth_error(error, description):
    """A Google OAuth 2.0 token endpoint error body."""
    return {"error": error, "error_description": description}


class _Answer(Exception):
    """A finished Gmail API answer raised from deep in a handler."""

    def __init__(self, status, headers, payload):
        super().__init__(status)
        self.triple = (status, headers, payload)

    @classmethod
    def error(cls, code, reason=None, message=None, headers=None, **kw):
        return cls(
            code, {**GMAIL_HEADERS, **(headers or {})}, gmail_error(code, reason, message, **kw)
        )


def _error_info(reason, method):
    return [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": reason,
            "domain": "googleapis.com",
            "metadata": {
                "service": "gmail.googleapis.com",
                "method": f"caribou.api.proto.MailboxService.{method}",
            },
        }
    ]


def _b64url_decode(text):
    if isinstance(text, str):
        text = text.encode("ascii")
    if not re.fullmatch(rb"[A-Za-z0-9_-]*={0,2}", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))


def _b64_bytes_field(text):
    """Decode a JSON bytes field as Google's JSON mapping does: base64 or base64url."""
    cleaned = re.sub(r"\s", "", text).rstrip("=").replace("-", "+").replace("_", "/")
    return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)


def _rfc3339(t):
    dt = datetime.fromtimestamp(t, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


# --- state ---------------------------------------------------------------------------


@dataclass
class ServiceAccount:
    client_email: str
    client_id: str
    keys: dict  # private_key_id -> RSA public key
    delegations: dict = field(default_factory=dict)  # "user@d" | "@d" | "*" -> frozenset

    def delegated_scopes(self, subject):
        subject = subject.lower()
        domain = "@" + subject.rpartition("@")[2]
        for key in (subject, domain, "*"):
            if key in self.delegations:
                return self.delegations[key]
        return frozenset()


@dataclass
class Mailbox:
    address: str
    send_as: dict = field(default_factory=dict)  # lower address -> verified
    gmail_enabled: bool = True

    def verified_aliases(self):
        return [a for a, verified in self.send_as.items() if verified]


@dataclass
class RefreshToken:
    refresh_token: str
    client_id: str
    mailbox: str
    scopes: frozenset
    revoked: bool = False
    expires_at: float | None = None


@dataclass
class AccessToken:
    token: str
    owner: str  # the mailbox, or the service account's own email without sub
    scopes: frozenset
    expires_at: float
    grant: str  # "jwt-bearer" | "refresh_token"
    client: str  # client_email or client_id
    is_user: bool  # False: a service account acting as itself


@dataclass
class TokenRequest:
    at: float
    grant_type: str | None
    client: str | None
    subject: str | None
    scopes: list
    status: int
    error: str | None = None
    error_description: str | None = None
    claims: dict | None = None


@dataclass
class SentMessage:
    id: str
    thread_id: str
    label_ids: list
    mailbox: str
    user_id: str
    via: str  # "media" | "multipart" | "json"
    client: str
    recipients: tuple
    to: tuple
    cc: tuple
    bcc: tuple
    from_original: str | None
    from_address: str | None
    from_delivered: str
    from_rewritten: bool
    message_id: str
    headers: tuple
    delivered_headers: tuple
    added_headers: tuple
    raw: bytes | None  # None when the fake keeps no bodies (benchmarks)
    delivered: bytes | None
    raw_size: int
    raw_sha256: str
    delivered_size: int
    delivered_sha256: str
    received_at: float

    def to_json(self, bodies=True):
        d = asdict(self)
        for key in ("raw", "delivered"):
            d[key] = (
                base64.b64encode(d[key]).decode("ascii") if bodies and d[key] is not None else None
            )
        return d


@dataclass
class Fault:
    id: int
    route: str  # "token" | "send" | "profile"
    kind: str = "reply"  # "reply" | "hang" | "drop"
    count: int | None = 1
    after: int = 0
    probability: float = 1.0
    mailbox: str | None = None
    process: bool = False
    status: int = 503
    headers: dict = field(default_factory=dict)
    body: object = None
    reason: str | None = None
    message: str | None = None
    retry_after: int | None = None
    retry_after_date: int | None = None
    seen: int = 0
    fired: int = 0


@dataclass
class RateLimit:
    max_sends: int
    window: float
    status: int = 429
    reason: str | None = None
    retry_after_header: bool = False
    mailbox: str | None = None


_ROUTES = ("token", "send", "profile")
_NOT_FOUND_PAGE = (
    b"<!DOCTYPE html><title>Error 404 (Not Found)!!1</title>"
    b"<p><b>404.</b> That\xe2\x80\x99s an error."
)
_SEND_PATH = re.compile(r"/(upload/)?gmail/v1/users/([^/]+)/messages/send")
_PROFILE_PATH = re.compile(r"/gmail/v1/users/([^/]+)/profile")


class FakeGoogle:
    """Google's token endpoint and Gmail's send call, with their state: reactor thread only."""

    def __init__(
        self,
        reactor,
        *,
        clock=None,
        wall=time.time,
        token_lifetime=DEFAULT_TOKEN_LIFETIME,
        latency=None,
        seed=0,
        keep_bodies=True,
    ):
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.wall = wall
        self._seed = seed
        self._keep_bodies = keep_bodies
        self._servers = []
        self._initial = (token_lifetime, dict(latency or {}))
        self._hung = []
        self._waiters = {}
        self.reset()

    # --- control ------------------------------------------------------------------

    def reset(self):
        """Forget every account, message, fault and setting (listeners stay)."""
        for request in getattr(self, "_hung", []):
            _abort(request)
        self.token_lifetime, latency = self._initial
        self.latency = {route: float(latency.get(route, 0)) for route in _ROUTES}
        self.max_message_bytes = MAX_MESSAGE_BYTES
        self.keep_bodies = self._keep_bodies
        self.mailboxes = {}
        self.service_accounts = {}
        self.oauth_clients = {}
        self.refresh_tokens = {}
        self.access_tokens = {}
        self.faults = []
        self.rate_limits = {}
        self.messages = []
        self.token_requests = []
        self.token_counts = Counter()
        self._send_times = {}
        self._threads = {}
        self._hung = []
        self._fault_ids = 0
        self._id_counter = 0
        self._random = random.Random(self._seed)
        return {}

    def add_mailbox(self, address, send_as=(), gmail_enabled=True):
        aliases = {}
        for alias in send_as:
            if isinstance(alias, str):
                aliases[alias.lower()] = True
            else:
                aliases[alias["address"].lower()] = bool(alias.get("verified", True))
        self.mailboxes[address.lower()] = Mailbox(address, aliases, bool(gmail_enabled))
        return {"address": address}

    def add_service_account(self, client_email, keys, client_id="", delegations=None):
        loaded = {}
        for kid, pem in keys.items():
            key = serialization.load_pem_public_key(
                pem.encode("ascii") if isinstance(pem, str) else pem
            )
            if not isinstance(key, rsa.RSAPublicKey):
                raise ValueError("service account keys are RSA")
            loaded[kid] = key
        account = ServiceAccount(client_email, client_id, loaded)
        for subject, scopes in (delegations or {}).items():
            account.delegations[subject.lower()] = frozenset(scopes)
        self.service_accounts[client_email.lower()] = account
        return {"client_email": client_email}

    def grant_delegation(self, client_email, subject, scopes):
        """Domain-wide delegation of ``scopes`` for ``subject`` ("user@d", "@d", "*")."""
        account = self.service_accounts[client_email.lower()]
        if scopes:
            account.delegations[subject.lower()] = frozenset(scopes)
        else:
            account.delegations.pop(subject.lower(), None)
        return {"client_email": client_email, "subject": subject, "scopes": sorted(scopes)}

    def add_oauth_client(self, client_id, client_secret):
        self.oauth_clients[client_id] = client_secret
        return {"client_id": client_id}

    def add_refresh_token(
        self,
        refresh_token,
        client_id,
        mailbox,
        scopes=(GMAIL_SEND,),
        revoked=False,
        expires_in=None,
    ):
        expires_at = None if expires_in is None else self.clock.seconds() + float(expires_in)
        self.refresh_tokens[refresh_token] = RefreshToken(
            refresh_token, client_id, mailbox, frozenset(scopes), bool(revoked), expires_at
        )
        return {"refresh_token": refresh_token}

    def revoke_refresh_token(self, refresh_token):
        """Revoking a refresh token also revokes the access tokens it gave (as Google does)."""
        record = self.refresh_tokens[refresh_token]
        record.revoked = True
        for token in list(self.access_tokens.values()):
            if (
                token.grant == "refresh_token"
                and token.client == record.client_id
                and (token.owner.lower() == record.mailbox.lower())
            ):
                del self.access_tokens[token.token]
        return {"refresh_token": refresh_token, "revoked": True}

    def configure(
        self, token_lifetime=None, latency=None, max_message_bytes=None, keep_bodies=None
    ):
        if token_lifetime is not None:
            self.token_lifetime = int(token_lifetime)
        for route, seconds in (latency or {}).items():
            if route not in _ROUTES:
                raise ValueError(f"latency route must be one of {_ROUTES}")
            self.latency[route] = float(seconds)
        if max_message_bytes is not None:
            self.max_message_bytes = int(max_message_bytes)
        if keep_bodies is not None:
            self.keep_bodies = bool(keep_bodies)
        return self._config()

    def expire_access_tokens(self, owner=None):
        """Make issued access tokens expire now (all, or those of ``owner``)."""
        now = self.clock.seconds()
        n = 0
        for token in self.access_tokens.values():
            if owner is None or token.owner.lower() == owner.lower():
                token.expires_at = min(token.expires_at, now)
                n += 1
        return {"expired": n}

    def add_fault(self, route, kind="reply", **options):
        if route not in _ROUTES:
            raise ValueError(f"route must be one of {_ROUTES}")
        if kind not in ("reply", "hang", "drop"):
            raise ValueError("kind must be reply, hang or drop")
        self._fault_ids += 1
        fault = Fault(self._fault_ids, route, kind, **options)
        if fault.mailbox:
            fault.mailbox = fault.mailbox.lower()
        self.faults.append(fault)
        return {"id": fault.id}

    def clear_faults(self):
        self.faults = []
        return {}

    def set_rate_limit(
        self, max_sends, window, mailbox=None, status=429, reason=None, retry_after_header=False
    ):
        """More than ``max_sends`` accepted sends in ``window`` seconds -> 429 or 403."""
        if status not in (403, 429):
            raise ValueError("status must be 403 or 429")
        key = mailbox.lower() if mailbox else "*"
        self.rate_limits[key] = RateLimit(
            int(max_sends), float(window), status, reason, bool(retry_after_header), mailbox
        )
        return {"mailbox": mailbox}

    def clear_rate_limits(self):
        self.rate_limits = {}
        self._send_times = {}
        return {}

    def refuse_connections(self, seconds=None):
        """Stop listening: new connections are refused; back after ``seconds`` if given.

        Returns a Deferred that fires once the listening sockets are closed.
        """
        if not self._servers:
            raise ValueError("not listening through listen()")
        return defer.DeferredList([server.refuse(seconds) for server in self._servers])

    def accept_connections(self):
        """Listen again; a Deferred that fires once listening."""
        return defer.DeferredList([server.accept() for server in self._servers])

    def next_request(self, route):
        """A Deferred that fires once the next request of ``route`` has been dealt with.

        That is after its latency, when it was answered, held by a ``hang`` fault (it is
        then in :attr:`hung`), dropped, or its client went away first.
        """
        if route not in _ROUTES:
            raise ValueError(f"route must be one of {_ROUTES}")
        d = defer.Deferred()
        self._waiters.setdefault(route, []).append(d)
        return d

    @property
    def hung(self):
        """The requests a ``hang`` fault holds unanswered."""
        return list(self._hung)

    def drop_hung(self):
        hung, self._hung = self._hung, []
        for request in hung:
            _abort(request)
        return {"dropped": len(hung)}

    def messages_for(self, mailbox=None):
        if mailbox is None:
            return list(self.messages)
        return [m for m in self.messages if m.mailbox.lower() == mailbox.lower()]

    def snapshot(self):
        return {
            "config": self._config(),
            "mailboxes": [asdict(m) for m in self.mailboxes.values()],
            "service_accounts": [
                {
                    "client_email": a.client_email,
                    "client_id": a.client_id,
                    "key_ids": sorted(a.keys),
                    "delegations": {k: sorted(v) for k, v in a.delegations.items()},
                }
                for a in self.service_accounts.values()
            ],
            "oauth_clients": sorted(self.oauth_clients),
            "refresh_tokens": [
                {**asdict(r), "scopes": sorted(r.scopes)} for r in self.refresh_tokens.values()
            ],
            "faults": [asdict(f) for f in self.faults],
            "rate_limits": [asdict(r) for r in self.rate_limits.values()],
            "access_tokens": len(self.access_tokens),
            "messages": len(self.messages),
            "token_counts": dict(self.token_counts),
            "hung": len(self._hung),
        }

    def apply_state(self, state):
        """Load a ``--state`` document (see the module docstring)."""
        calls = {
            "mailboxes": self.add_mailbox,
            "service_accounts": self.add_service_account,
            "oauth_clients": self.add_oauth_client,
            "refresh_tokens": self.add_refresh_token,
            "faults": self.add_fault,
            "rate_limits": self.set_rate_limit,
        }
        unknown = set(state) - set(calls) - {"config"}
        if unknown:
            raise ValueError(f"unknown state keys: {sorted(unknown)}")
        if "config" in state:
            self.configure(**state["config"])
        for key, call in calls.items():
            for item in state.get(key, ()):
                call(**item)

    def _config(self):
        return {
            "token_lifetime": self.token_lifetime,
            "latency": dict(self.latency),
            "max_message_bytes": self.max_message_bytes,
            "keep_bodies": self.keep_bodies,
        }

    # --- listening ----------------------------------------------------------------

    def listen(self, ca, port=0, interface="127.0.0.1"):
        """Serve over HTTPS on loopback (see :func:`listen`); returns the FakeGoogleServer."""
        return listen(self, ca, port, interface)

    @property
    def url(self):
        """``https://127.0.0.1:PORT`` of the first listener (the ``api_endpoint``)."""
        return self._servers[0].url

    @property
    def token_uri(self):
        return self._servers[0].token_uri

    def stop(self):
        """Stop every listener, dropping its connections; a Deferred."""
        return defer.DeferredList([server.stop() for server in list(self._servers)])

    # --- web ------------------------------------------------------------------------

    def resource(self):
        return _FakeGoogleResource(self)

    def site(self):
        site = Site(self.resource())
        site.protocol = _TrackedChannel
        site.displayTracebacks = False
        site.channels = set()
        return site

    def _render(self, request):
        request.setHeader(b"server", b"ESF")
        path = request.path.decode("latin-1")
        method = request.method.decode("latin-1")
        request.content.seek(0)
        body = request.content.read()
        if path.startswith("/_fake/"):
            return self._control(request, method, path[len("/_fake/") :].strip("/"), body)
        if method == "POST" and path == "/token":
            return self._serve(request, "token", None, lambda: self._token(request, body))
        match = _SEND_PATH.fullmatch(path)
        if method == "POST" and match:
            via = "upload" if match.group(1) else "json"
            user_id = unquote(match.group(2))
            hint = self._mailbox_hint(request, user_id)
            return self._serve(
                request, "send", hint, lambda: self._send(request, body, user_id, via)
            )
        match = _PROFILE_PATH.fullmatch(path)
        if method == "GET" and match:
            user_id = unquote(match.group(1))
            hint = self._mailbox_hint(request, user_id)
            return self._serve(request, "profile", hint, lambda: self._profile(request, user_id))
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/html; charset=UTF-8")
        return _NOT_FOUND_PAGE

    def _serve(self, request, route, mailbox, handler):
        """Answer after the route's latency, as the first matching fault says or normally."""
        fault = self._match_fault(route, mailbox)
        waiters = self._waiters.pop(route, [])
        state = {"gone": False, "call": None}

        def notify():
            for waiter in waiters:
                self.reactor.callLater(0, waiter.callback, route)
            del waiters[:]

        def gone(_):
            state["gone"] = True
            if state["call"] is not None and state["call"].active():
                state["call"].cancel()
                notify()

        request.notifyFinish().addBoth(gone)

        def answer():
            state["call"] = None
            try:
                if state["gone"]:
                    return
                if fault is not None and fault.kind == "reply":
                    status, headers, payload = self._fault_reply(route, fault)
                elif fault is None or fault.process:
                    status, headers, payload = handler()
                if fault is not None and fault.kind == "hang":
                    self._hung.append(request)
                elif fault is not None and fault.kind == "drop":
                    _abort(request)
                else:
                    _respond(request, status, headers, payload)
            except Exception:
                # a bug of the fake: loud in the log (trial fails the test), never a Google answer
                log.err(None, f"tests.fakes.gmail: {route} request failed in the fake")
                _respond(request, 599, {"Content-Type": "text/plain"}, "bug in the fake\n")
            finally:
                notify()

        delay = self.latency.get(route, 0)
        if delay > 0:
            state["call"] = self.reactor.callLater(delay, answer)
        else:
            answer()
        return NOT_DONE_YET

    def _match_fault(self, route, mailbox):
        for fault in self.faults:
            if fault.route != route:
                continue
            if fault.mailbox and fault.mailbox != (mailbox or "").lower():
                continue
            if fault.count is not None and fault.fired >= fault.count:
                continue
            if fault.seen < fault.after:
                fault.seen += 1
                continue
            if fault.probability < 1 and self._random.random() >= fault.probability:
                continue
            fault.fired += 1
            return fault
        return None

    def _fault_reply(self, route, fault):
        base = dict(TOKEN_HEADERS if route == "token" else GMAIL_HEADERS)
        if fault.retry_after is not None:
            base["Retry-After"] = str(fault.retry_after)
        if fault.retry_after_date is not None:
            base["Retry-After"] = email.utils.formatdate(
                self.wall() + fault.retry_after_date, usegmt=True
            )
        base.update(fault.headers)
        if fault.body is not None:
            payload = fault.body
        elif route != "token":
            payload = gmail_error(fault.status, fault.reason, fault.message)
        else:
            error, description = _OAUTH_DEFAULT.get(
                fault.status, ("internal_failure", "Backend Error")
            )
            payload = oauth_error(fault.reason or error, fault.message or description)
        return fault.status, base, payload

    def _mailbox_hint(self, request, user_id):
        if user_id != "me":
            return user_id
        token = self.access_tokens.get(_bearer(request) or "")
        return token.owner if token else None

    # --- the token endpoint ------------------------------------------------------

    def _token(self, request, body):
        ctype = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
        try:
            if ctype == "application/json":
                params = {k: str(v) for k, v in json.loads(body or b"{}").items()}
            else:
                params = {
                    k: v[0]
                    for k, v in parse_qs(body.decode("utf-8"), keep_blank_values=True).items()
                }
        except (ValueError, AttributeError, UnicodeDecodeError):
            params = {}
        grant_type = params.get("grant_type")
        log = TokenRequest(self.clock.seconds(), grant_type, None, None, [], 0)
        if not grant_type:
            status, payload = 400, oauth_error(
                "invalid_request", "Required parameter is missing: grant_type"
            )
        elif grant_type == JWT_BEARER:
            status, payload = self._jwt_grant(params, log)
        elif grant_type == "refresh_token":
            status, payload = self._refresh_grant(params, log)
        else:
            status, payload = 400, oauth_error(
                "unsupported_grant_type", f"Invalid grant_type: {grant_type}"
            )
        log.status = status
        if status != 200:
            log.error, log.error_description = payload["error"], payload["error_description"]
        self.token_requests.append(log)
        self.token_counts[log.subject or log.client or "?"] += 1
        return status, TOKEN_HEADERS, payload

    def _jwt_grant(self, params, log):
        def invalid_grant(description):
            return 400, oauth_error("invalid_grant", description)

        assertion = params.get("assertion")
        if not assertion:
            return 400, oauth_error("invalid_request", "Missing required parameter: assertion")
        try:
            head_b64, claims_b64, sig_b64 = assertion.split(".")
            header = json.loads(_b64url_decode(head_b64))
            claims = json.loads(_b64url_decode(claims_b64))
            signature = _b64url_decode(sig_b64)
            if not isinstance(header, dict) or not isinstance(claims, dict):
                raise ValueError("not a JSON object")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return invalid_grant(INVALID_JWT_SIGNATURE)
        log.claims = claims
        log.client = claims.get("iss") if isinstance(claims.get("iss"), str) else None
        log.subject = claims.get("sub") if isinstance(claims.get("sub"), str) else None
        scope = claims.get("scope")
        log.scopes = scope.split() if isinstance(scope, str) else []

        account = self.service_accounts.get((log.client or "").lower())
        if account is None:
            return invalid_grant(ACCOUNT_NOT_FOUND)
        kid = header.get("kid")
        if kid:
            keys = [account.keys[kid]] if kid in account.keys else []
        else:
            keys = list(account.keys.values())
        if header.get("alg") != "RS256" or not _verify_any(keys, head_b64, claims_b64, signature):
            return invalid_grant(INVALID_JWT_SIGNATURE)

        now = self.wall()
        iat, exp = claims.get("iat"), claims.get("exp")
        if not (
            isinstance(iat, (int, float))
            and isinstance(exp, (int, float))
            and iat < exp
            and exp - iat <= JWT_MAX_LIFETIME
            and iat <= now + JWT_CLOCK_SKEW
            and exp > now - JWT_CLOCK_SKEW
        ):
            return invalid_grant(INVALID_JWT_TIMEFRAME)
        if claims.get("aud") not in GOOGLE_TOKEN_AUDIENCES:
            return invalid_grant(INVALID_JWT_AUDIENCE)
        scopes = frozenset(log.scopes)
        if not scopes:
            return 400, oauth_error("invalid_scope", INVALID_SCOPE)

        subject = log.subject
        if subject:
            mailbox = self.mailboxes.get(subject.lower())
            if mailbox is None:
                return invalid_grant(INVALID_SUBJECT)
            if not scopes <= account.delegated_scopes(subject):
                return 401, oauth_error("unauthorized_client", UNAUTHORIZED_CLIENT)
            owner, is_user = mailbox.address, True
        else:
            owner, is_user = account.client_email, False
        token = self._issue(owner, scopes, "jwt-bearer", account.client_email, is_user, "ya29.c.")
        return 200, {
            "access_token": token.token,
            "expires_in": self.token_lifetime,
            "token_type": "Bearer",
        }

    def _refresh_grant(self, params, log):
        client_id = params.get("client_id")
        log.client = client_id
        if not client_id:
            return 400, oauth_error(
                "invalid_request", "Could not determine client ID from request."
            )
        if client_id not in self.oauth_clients:
            return 401, oauth_error("invalid_client", "The OAuth client was not found.")
        if params.get("client_secret") != self.oauth_clients[client_id]:
            return 401, oauth_error("invalid_client", "Unauthorized")
        refresh_token = params.get("refresh_token")
        if not refresh_token:
            return 400, oauth_error("invalid_request", "Missing required parameter: refresh_token")
        record = self.refresh_tokens.get(refresh_token)
        if record is not None:
            log.subject = record.mailbox
        now = self.clock.seconds()
        if (
            record is None
            or record.revoked
            or (record.expires_at is not None and now >= record.expires_at)
        ):
            return 400, oauth_error("invalid_grant", TOKEN_EXPIRED_OR_REVOKED)
        if record.client_id != client_id:
            return 400, oauth_error("unauthorized_client", "Unauthorized")
        requested = frozenset(params.get("scope", "").split())
        log.scopes = sorted(requested or record.scopes)
        if requested and not requested <= record.scopes:
            return 400, oauth_error("invalid_scope", "Bad Request")
        scopes = requested or record.scopes
        token = self._issue(record.mailbox, scopes, "refresh_token", client_id, True, "ya29.a0")
        payload = {
            "access_token": token.token,
            "expires_in": self.token_lifetime,
            "scope": " ".join(sorted(scopes)),
            "token_type": "Bearer",
        }
        if record.expires_at is not None:
            payload["refresh_token_expires_in"] = max(0, int(record.expires_at - now))
        return 200, payload

    def _issue(self, owner, scopes, grant, client, is_user, prefix):
        token = AccessToken(
            prefix + secrets.token_urlsafe(96),
            owner,
            frozenset(scopes),
            self.clock.seconds() + self.token_lifetime,
            grant,
            client,
            is_user,
        )
        self.access_tokens[token.token] = token
        return token

    # --- the Gmail API ------------------------------------------------------------

    def _authorize(self, request, user_id, scopes, method):
        """(token, mailbox) for a Gmail API call, or the Google error answer as an Answer."""
        realm = 'Bearer realm="https://accounts.google.com/"'
        bearer = _bearer(request)
        if bearer is None:
            raise _Answer.error(
                401,
                "required",
                headers={"WWW-Authenticate": realm},
                location="Authorization",
                locationType="header",
                details=_error_info("CREDENTIALS_MISSING", method),
            )
        token = self.access_tokens.get(bearer)
        if token is None or self.clock.seconds() >= token.expires_at:
            reason = "ACCESS_TOKEN_EXPIRED" if token else "ACCESS_TOKEN_TYPE_UNSUPPORTED"
            raise _Answer.error(
                401,
                "authError",
                headers={"WWW-Authenticate": realm + ', error="invalid_token"'},
                location="Authorization",
                locationType="header",
                details=_error_info(reason, method),
            )
        if not token.scopes & scopes:
            scope = " ".join(sorted(scopes))
            raise _Answer.error(
                403,
                "insufficientPermissions",
                headers={
                    "WWW-Authenticate": f'{realm}, error="insufficient_scope", scope="{scope}"'
                },
                details=_error_info("ACCESS_TOKEN_SCOPE_INSUFFICIENT", method),
            )
        if not token.is_user:
            raise _Answer.error(400, "failedPrecondition")
        if user_id != "me" and user_id.lower() != token.owner.lower():
            raise _Answer.error(403, "forbidden", f"Delegation denied for {token.owner}")
        mailbox = self.mailboxes.get(token.owner.lower())
        if mailbox is None or not mailbox.gmail_enabled:
            raise _Answer.error(400, "failedPrecondition", "Mail service not enabled")
        return token, mailbox

    def _profile(self, request, user_id):
        """users.getProfile: what a connection test may call (gmail.send alone is not enough)."""
        try:
            _, mailbox = self._authorize(request, user_id, PROFILE_SCOPES, "GetProfile")
        except _Answer as answer:
            return answer.triple
        mine = [m for m in self.messages if m.mailbox == mailbox.address]
        return (
            200,
            GMAIL_HEADERS,
            {
                "emailAddress": mailbox.address,
                "messagesTotal": len(mine),
                "threadsTotal": len({m.thread_id for m in mine}),
                "historyId": str(1000 + len(mine)),
            },
        )

    def _send(self, request, body, user_id, via):
        try:
            return self._send_or_raise(request, body, user_id, via)
        except _Answer as answer:
            return answer.triple

    def _send_or_raise(self, request, body, user_id, via):
        def error(code, reason=None, message=None, headers=None, **kw):
            return _Answer.error(code, reason, message, headers, **kw).triple

        upload_type = _arg(request, "uploadType")
        if via == "upload":
            if upload_type is None:
                return error(400, "badRequest", UPLOAD_URL_REQUIRED)
            if upload_type == "resumable":
                return error(
                    501, "notImplemented", "uploadType=resumable is not implemented by the fake"
                )
            if upload_type not in ("media", "multipart"):
                return error(400, "badRequest", f"Invalid upload type: {upload_type}")
            via = upload_type

        token, mailbox = self._authorize(request, user_id, SEND_SCOPES, "SendMessage")
        limited = self._rate_limited(mailbox)
        if limited is not None:
            return limited

        thread_id = None
        if via == "json":
            if len(body) > MAX_JSON_BODY:
                return error(
                    400,
                    "badRequest",
                    f"Request payload size exceeds the limit: {MAX_JSON_BODY} bytes.",
                )
            try:
                resource = json.loads(body)
                if not isinstance(resource, dict):
                    raise ValueError
            except (ValueError, UnicodeDecodeError):
                return error(400, "badRequest", "Invalid JSON payload received.")
            raw_field = resource.get("raw")
            thread_id = resource.get("threadId")
            if not raw_field:
                return error(400, "badRequest", RAW_REQUIRED)
            try:
                raw = _b64_bytes_field(raw_field)
            except (ValueError, binascii.Error, TypeError):
                return error(
                    400,
                    "invalid",
                    f"Invalid value at 'message.raw' (TYPE_BYTES), "
                    f'Base64 decoding failed for "{str(raw_field)[:40]}"',
                )
        elif via == "multipart":
            try:
                metadata, raw, media_type = _multipart_related(
                    request.getHeader("content-type"), body
                )
            except ValueError as e:
                return error(400, "badRequest", str(e))
            if not media_type.startswith("message/"):
                return error(
                    400,
                    "badContent",
                    f"Media type '{media_type}' is not supported. Valid media types: [message/*]",
                )
            thread_id = metadata.get("threadId")
        else:
            media_type = (
                (request.getHeader("content-type") or "application/octet-stream")
                .split(";")[0]
                .strip()
                .lower()
            )
            if not media_type.startswith("message/"):
                return error(
                    400,
                    "badContent",
                    f"Media type '{media_type}' is not supported. Valid media types: [message/*]",
                )
            raw = body
        if len(raw) > self.max_message_bytes:
            return error(
                413,
                "uploadTooLarge",
                f"Media is too large. Limit: {_limit_text(self.max_message_bytes)}",
            )
        if not raw:
            return error(400, "badRequest", RAW_REQUIRED)
        if thread_id and not any(
            mb == mailbox.address.lower() and t == thread_id
            for (mb, _), (t, _) in self._threads.items()
        ):
            return error(404, "notFound")

        try:
            delivery = gmail_message.prepare_delivery(
                raw,
                mailbox.address,
                mailbox.verified_aliases(),
                new_message_id=lambda: f"<CA{secrets.token_urlsafe(33)}@mail.gmail.com>",
                date=email.utils.formatdate(self.wall()),
            )
        except gmail_message.MessageRejected as e:
            return error(400, "invalidArgument", e.message)

        message_id = self._new_id()
        fields, _ = gmail_message.split_message(raw)
        subject = gmail_message.thread_subject(fields)
        if thread_id:
            refs = gmail_message.referenced_ids(fields)
            if not any(
                self._threads.get((mailbox.address.lower(), r), (None, None))
                == (thread_id, subject)
                for r in refs
            ):
                thread_id = None  # Gmail then starts a new thread rather than failing
        thread_id = thread_id or message_id
        self._threads[(mailbox.address.lower(), delivery.message_id.lower())] = (
            thread_id,
            subject,
        )
        labels = ["SENT"]
        if mailbox.address.lower() in {r.lower() for r in delivery.recipients.all}:
            labels = ["UNREAD", "SENT", "INBOX"]
        self.messages.append(
            SentMessage(
                id=message_id,
                thread_id=thread_id,
                label_ids=labels,
                mailbox=mailbox.address,
                user_id=user_id,
                via=via,
                client=token.client,
                recipients=delivery.recipients.all,
                to=delivery.recipients.to,
                cc=delivery.recipients.cc,
                bcc=delivery.recipients.bcc,
                from_original=delivery.from_original,
                from_address=delivery.from_address,
                from_delivered=delivery.from_delivered,
                from_rewritten=delivery.from_rewritten,
                message_id=delivery.message_id,
                headers=delivery.headers,
                delivered_headers=delivery.delivered_headers,
                added_headers=delivery.added_headers,
                raw=raw if self.keep_bodies else None,
                delivered=delivery.delivered if self.keep_bodies else None,
                raw_size=len(raw),
                raw_sha256=hashlib.sha256(raw).hexdigest(),
                delivered_size=len(delivery.delivered),
                delivered_sha256=hashlib.sha256(delivery.delivered).hexdigest(),
                received_at=self.clock.seconds(),
            )
        )
        self._note_send(mailbox)
        return 200, GMAIL_HEADERS, {"id": message_id, "threadId": thread_id, "labelIds": labels}

    def _new_id(self):
        # Gmail ids are 16 hex digits that grow with time: milliseconds << 20 | counter.
        self._id_counter = (self._id_counter + 1) & 0xFFFFF
        return f"{(int(self.wall() * 1000) << 20 | self._id_counter) & (2**64 - 1):016x}"

    def _limit_for(self, mailbox):
        return self.rate_limits.get(mailbox.address.lower()) or self.rate_limits.get("*")

    def _rate_limited(self, mailbox):
        limit = self._limit_for(mailbox)
        if limit is None:
            return None
        now = self.clock.seconds()
        times = self._send_times.setdefault(mailbox.address.lower(), deque())
        while times and times[0] <= now - limit.window:
            times.popleft()
        if len(times) < limit.max_sends:
            return None
        retry_at = (times[0] if times else now) + limit.window
        headers = dict(GMAIL_HEADERS)
        if limit.retry_after_header:
            headers["Retry-After"] = str(max(1, math.ceil(retry_at - now)))
        if limit.status == 429:
            reason = limit.reason or "rateLimitExceeded"
            message = f"User-rate limit exceeded.  Retry after {_rfc3339(retry_at)}"
        else:
            reason = limit.reason or "userRateLimitExceeded"
            message = None
        return limit.status, headers, gmail_error(limit.status, reason, message)

    def _note_send(self, mailbox):
        if self._limit_for(mailbox) is not None:
            self._send_times.setdefault(mailbox.address.lower(), deque()).append(
                self.clock.seconds()
            )

    # --- control API over HTTP ------------------------------------------------------

    def _control(self, request, method, name, body):
        query = {k.decode(): v[-1].decode() for k, v in request.args.items()}
        routes = {
            ("GET", "state"): lambda p: self.snapshot(),
            ("POST", "reset"): lambda p: self.reset(),
            ("POST", "mailboxes"): lambda p: self.add_mailbox(**p),
            ("POST", "service-accounts"): lambda p: self.add_service_account(**p),
            ("POST", "delegations"): lambda p: self.grant_delegation(**p),
            ("POST", "oauth-clients"): lambda p: self.add_oauth_client(**p),
            ("POST", "refresh-tokens"): lambda p: self.add_refresh_token(**p),
            ("POST", "refresh-tokens/revoke"): lambda p: self.revoke_refresh_token(**p),
            ("POST", "config"): lambda p: self.configure(**p),
            ("POST", "access-tokens/expire"): lambda p: self.expire_access_tokens(**p),
            ("POST", "faults"): lambda p: self.add_fault(**p),
            ("GET", "faults"): lambda p: {"faults": [asdict(f) for f in self.faults]},
            ("POST", "faults/clear"): lambda p: self.clear_faults(),
            ("DELETE", "faults"): lambda p: self.clear_faults(),
            ("POST", "rate-limits"): lambda p: self.set_rate_limit(**p),
            ("POST", "rate-limits/clear"): lambda p: self.clear_rate_limits(),
            ("DELETE", "rate-limits"): lambda p: self.clear_rate_limits(),
            ("POST", "refuse"): lambda p: (self.refuse_connections(**p), {"refusing": True})[1],
            ("POST", "accept"): lambda p: (self.accept_connections(), {"refusing": False})[1],
            ("POST", "hung/drop"): lambda p: self.drop_hung(),
            ("GET", "messages"): lambda p: {
                "messages": [
                    m.to_json(bodies=query.get("bodies", "1") not in ("0", "false"))
                    for m in self.messages_for(query.get("mailbox"))
                ]
            },
            ("GET", "token-requests"): lambda p: {
                "requests": [asdict(r) for r in self.token_requests],
                "counts": dict(self.token_counts),
            },
        }
        handler = routes.get((method, name))
        if handler is None:
            status, payload = 404, {"error": f"no control call {method} /_fake/{name}"}
        else:
            try:
                params = json.loads(body) if body.strip() else {}
                if not isinstance(params, dict):
                    raise ValueError("the body must be a JSON object")
                status, payload = 200, handler(params)
            except Exception as e:  # a control call is test setup: say what was wrong
                status, payload = 400, {"error": f"{type(e).__name__}: {e}"}
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(payload, default=list).encode("utf-8")


class _FakeGoogleResource(Resource):
    isLeaf = True

    def __init__(self, fake):
        super().__init__()
        self._fake = fake

    def render(self, request):
        return self._fake._render(request)


def _limit_text(limit):
    return f"{limit // (1024 * 1024)}MB" if limit % (1024 * 1024) == 0 else f"{limit} bytes"


def _arg(request, name):
    values = request.args.get(name.encode("ascii"))
    return values[-1].decode("utf-8", "replace") if values else None


def _bearer(request):
    """The bearer token, "" for another scheme, None without an Authorization header."""
    header = request.getHeader("authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _verify_any(keys, head_b64, claims_b64, signature):
    signed = f"{head_b64}.{claims_b64}".encode("ascii")
    for key in keys:
        try:
            key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
            return True
        except InvalidSignature:
            continue
    return False


def _multipart_related(content_type, body):
    """(metadata dict, media bytes, media type) of a multipart/related upload."""
    ctype = content_type or ""
    if not ctype.lower().startswith("multipart/related"):
        raise ValueError("Invalid multipart request with 0 mime parts.")
    boundary = re.search(r'boundary="?([^";]+)"?', ctype)
    if not boundary:
        raise ValueError("Invalid multipart request with 0 mime parts.")
    delimiter = b"--" + boundary.group(1).encode("latin-1")
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk.lstrip(b"\n")
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            head, sep, content = chunk.partition(b"\n\n")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        elif content.endswith(b"\n"):
            content = content[:-1]
        headers = {}
        for line in re.split(rb"\r?\n", head):
            key, colon, value = line.partition(b":")
            if colon:
                headers[key.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        if headers.get("content-transfer-encoding", "").lower() == "base64":
            content = base64.b64decode(content)
        parts.append((headers, content))
    if len(parts) != 2:
        raise ValueError(f"Invalid multipart request with {len(parts)} mime parts.")
    try:
        metadata = json.loads(parts[0][1] or b"{}")
    except ValueError:
        raise ValueError("Invalid JSON payload received.") from None
    media_type = (
        parts[1][0].get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    )
    return metadata if isinstance(metadata, dict) else {}, parts[1][1], media_type


def _respond(request, status, headers, payload):
    if isinstance(payload, (dict, list)):
        data = json.dumps(payload, indent=2).encode("utf-8") + b"\n"
    elif isinstance(payload, str):
        data = payload.encode("utf-8")
    else:
        data = payload or b""
    request.setResponseCode(status)
    for name, value in headers.items():
        request.setHeader(name.encode("latin-1"), str(value).encode("latin-1"))
    request.setHeader(b"content-length", str(len(data)).encode("ascii"))
    request.write(data)
    request.finish()


def _abort(request):
    transport = getattr(request.channel, "transport", None) if request.channel else None
    if transport is not None:
        transport.abortConnection()


# --- listening -----------------------------------------------------------------------


class _TrackedChannel(HTTPChannel):
    """An HTTP channel its site knows about, so that stop() can close it."""

    def connectionMade(self):
        super().connectionMade()
        self.lost = defer.Deferred()
        self.site.channels.add(self)

    def connectionLost(self, reason):
        self.site.channels.discard(self)
        try:
            super().connectionLost(reason)
        finally:
            self.lost.callback(None)


class FakeGoogleServer:
    """One HTTPS listener of a FakeGoogle on loopback; ``stop()`` leaves the reactor clean."""

    def __init__(self, fake, context_factory, port=0, interface="127.0.0.1"):
        self.fake = fake
        self.reactor = fake.reactor
        self.interface = interface
        self._context_factory = context_factory
        self.site = fake.site()
        self._listener = None
        self._stopping = None
        self._reopen = None
        self._listener = self.reactor.listenSSL(
            port, self.site, context_factory, interface=interface
        )
        self.port = self._listener.getHost().port
        fake._servers.append(self)

    @property
    def url(self):
        host = f"[{self.interface}]" if ":" in self.interface else self.interface
        return f"https://{host}:{self.port}"

    @property
    def token_uri(self):
        return self.url + "/token"

    @property
    def api_endpoint(self):
        return self.url

    def refuse(self, seconds=None):
        """Close the listening socket (reopened after ``seconds`` if given); a Deferred."""
        if self._listener is not None:
            self._stopping = defer.maybeDeferred(self._listener.stopListening)
            self._listener = None
        if self._reopen is not None and self._reopen.active():
            self._reopen.cancel()
        self._reopen = self.reactor.callLater(seconds, self.accept) if seconds else None
        d = defer.Deferred()
        (self._stopping or defer.succeed(None)).addBoth(lambda r: (d.callback(None), r)[1])
        return d

    def accept(self):
        """Listen again on the same port (after ``refuse``); a Deferred."""
        if self._reopen is not None and self._reopen.active():
            self._reopen.cancel()
        self._reopen = None
        if self._listener is not None:
            return defer.succeed(None)
        stopping, self._stopping = self._stopping or defer.succeed(None), None

        def relisten(_):
            if self._listener is None:
                self._listener = self.reactor.listenSSL(
                    self.port, self.site, self._context_factory, interface=self.interface
                )

        return stopping.addCallback(relisten)

    @defer.inlineCallbacks
    def stop(self):
        if self._reopen is not None and self._reopen.active():
            self._reopen.cancel()
        self._reopen = None
        if self in self.fake._servers:
            self.fake._servers.remove(self)
        if self._listener is not None:
            yield self._listener.stopListening()
            self._listener = None
        if self._stopping is not None:
            yield self._stopping
            self._stopping = None
        channels = list(self.site.channels)
        for channel in channels:
            channel.transport.abortConnection()
        yield defer.DeferredList([c.lost for c in channels])


def make_site(fake):
    """The twisted.web Site of ``fake`` (as every fake in tests.fakes offers)."""
    return fake.site()


def listen(fake, ca, port=0, interface="127.0.0.1"):
    """Serve ``fake`` over HTTPS with the test CA's server certificate.

    ``ca`` is a :class:`TestCA` or its directory.  Returns a FakeGoogleServer.
    """
    if not isinstance(ca, TestCA):
        ca = TestCA(ca)
    return FakeGoogleServer(fake, ca.server_context_factory(), port, interface)


# --- as a process --------------------------------------------------------------------


def _parse_latency(text):
    if text is None:
        return {}
    if "=" not in text:
        return {route: float(text) for route in _ROUTES}
    out = {}
    for item in text.split(","):
        route, _, seconds = item.partition("=")
        if route.strip() not in _ROUTES:
            raise argparse.ArgumentTypeError(f"latency route must be one of {_ROUTES}")
        out[route.strip()] = float(seconds)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.gmail",
        description="Fake Google OAuth token endpoint and Gmail API send call over HTTPS.",
    )
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--ca-dir", required=True, help="test CA folder (created if missing)")
    parser.add_argument(
        "--latency",
        type=_parse_latency,
        default=None,
        help="seconds for every answer, or token=S,send=S",
    )
    parser.add_argument("--token-lifetime", type=int, default=DEFAULT_TOKEN_LIFETIME)
    parser.add_argument("--state", type=Path, help="JSON document of accounts to load")
    parser.add_argument("--seed", type=int, default=0, help="seed of fault probabilities")
    parser.add_argument(
        "--no-bodies",
        action="store_true",
        help="record sizes and digests of messages, not their bytes",
    )
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    fake = FakeGoogle(
        reactor,
        token_lifetime=args.token_lifetime,
        latency=args.latency,
        seed=args.seed,
        keep_bodies=not args.no_bodies,
    )
    if args.state:
        fake.apply_state(json.loads(args.state.read_text()))
    server = listen(fake, TestCA(args.ca_dir), args.port, args.interface)
    sys.stdout.write(json.dumps({"port": server.port}) + "\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
