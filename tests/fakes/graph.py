"""A faithful fake of Microsoft Entra ID (tokens) and Microsoft Graph mail sending, over HTTPS.

This module owns the fake's state (:class:`FakeGraph`: tenants, app
registrations, mailboxes, tokens, drafts, upload sessions, scripted faults and
everything received), the twisted.web resource that serves it, the listening
helper and the command line.  The pure rules live beside it:
:mod:`tests.fakes.graph_entra` (client credentials, assertions, Entra errors)
and :mod:`tests.fakes.graph_mail` (MIME and JSON messages, Graph errors).  It
follows ``providers.md`` (``m365``) to the status code and is kind to nobody:
what works against it should work against the real service.

Running it
----------
In-process (reactor injected; trial tests)::

    fake = FakeGraph(reactor, latency=0.05)   # optional clock=task.Clock()
    port = fake.listen(ca_dir)             # reactor.listenSSL(0, ..., interface="127.0.0.1")
    url = fake.url                         # https://127.0.0.1:PORT, authority and Graph both
    fake.add_app("11111111-...", secrets=["s3cret"], permissions=["Mail.Send"])
    fake.add_mailbox("relay@contoso.com")
    ...
    yield fake.stop()                      # stops listening, drops connections, cancels timers

``fake.resource()`` is the bare twisted.web resource; ``make_site(fake)`` the
factory ``listen`` serves (``listen(fake, ca)`` is the same as a function).
``clock`` (default: the reactor) measures token and upload-session lifetimes,
so a test can expire them with ``Clock.advance``; dates (secret and certificate
validity, assertion ``exp``/``nbf``, records) are wall-clock time, as msal
signs its assertions with it.  Latency always runs on the reactor.

As a process (end-to-end tests, benchmarks)::

    python -m tests.fakes.graph --port 0 --ca-dir DIR [--latency 0.05] [--setup FILE]
        [--token-lifetime 3599] [--mailbox-concurrency 4] [--no-content] [--record-limit N]

prints one JSON line ``{"port": N, "url": "https://127.0.0.1:N"}`` once listening.
Clients trust ``DIR/ca.pem`` (:class:`tests.fakes.tlsca.TestCA`).

Served like the real thing
--------------------------
* ``GET /{tenant}/v2.0/.well-known/openid-configuration`` (msal with
  ``instance_discovery=False``; ``{tenant}`` is the tenant id or a domain, the
  token endpoint it names always the id), ``POST /{tenant}/oauth2/v2.0/token``:
  client credentials only, scope ``{this origin}/.default`` (or Graph's app id),
  with ``client_secret`` (body or Basic) or a certificate ``client_assertion``
  (RS256 + ``x5t`` or PS256 + ``x5t#S256``, signature, ``aud``, ``iss``/``sub``,
  ``exp``/``nbf`` checked).  Entra's errors: 7000215 bad secret, 7000222 expired
  secret, 700016 unknown app, 700027 bad assertion, 90002 unknown tenant...
  Tokens are opaque, live ``token_lifetime`` seconds (default 3599), are good
  only for the origin they were asked for, and carry the app's permissions as
  they were when issued.
* ``POST /v1.0/users/{m}/sendMail``: MIME as base64 ``text/plain`` (recipients
  from its To, Cc and Bcc; always saved to Sent Items) or JSON ``{"message",
  "saveToSentItems"}``; 202 and no body.  Any Graph request over 4 MB: 413.
* Drafts (``Mail.ReadWrite``): ``POST /v1.0/users/{m}/messages`` (JSON or MIME),
  ``GET``/``PATCH``/``DELETE .../messages/{id}``, ``POST .../attachments``,
  ``POST .../attachments/createUploadSession`` (3 MB to 150 MB) and its upload
  URL (``PUT`` fragments in order, each a multiple of 320 KiB but the last, at
  most 4 MB, no Authorization header: 200 then 201 with ``Location``; ``DELETE``
  cancels), ``POST .../messages/{id}/send`` (the mailbox's ``max_send_size``,
  35 MB by default, applies).
* ``GET /v1.0/users/{m}`` (``User.Read.All``), ``GET
  /v1.0/applications(appId='{id}')?$select=passwordCredentials``
  (``Application.Read.All``).
* More than ``mailbox_concurrency`` (4) requests in flight for one app and
  mailbox: 429 ``ApplicationThrottled`` with ``Retry-After``.  Its body has no
  ``innerError``, as the real one was seen to have none; every other Graph error
  is ``{"error": {"code", "message", "innerError": {"date", "request-id",
  "client-request-id"}}}``.
* Not modelled: the 10,000 requests per 10 minutes and 30 messages per minute
  limits (script them as faults), Exchange rewriting the MIME it sends
  (``delivered_mime`` is the MIME received less its Bcc header).

Control API (JSON, same port, no auth; every call has an in-process twin)
-------------------------------------------------------------------------
::

    GET    /_fake/state                    fake.state(): tenants, apps, mailboxes, settings
    POST   /_fake/reset {"records_only"}   fake.reset(records_only=False)
    POST   /_fake/setup {...}              fake.setup(doc)  (doc below)
    POST   /_fake/settings {...}           fake.configure(latency=, token_lifetime=,
                                               mailbox_concurrency=, throttle_retry_after=,
                                               upload_session_lifetime=, proxy_ports=[]
                                               (ports of TCP proxies in front of it: its
                                               Graph origin there too))
    POST   /_fake/latency {"seconds"}      fake.configure(latency=...)
    POST   /_fake/tenants                  fake.add_tenant(tenant_id=, domains=[], display_name=)
    POST   /_fake/apps                     fake.add_app(client_id=, tenant=, secrets=[],
                                               certificates=[], permissions=["Mail.Send"],
                                               mailboxes=None, password_credentials=None)
    PATCH  /_fake/apps/{id}                fake.update_app(id, permissions=, mailboxes=,
                                               password_credentials=)
    POST   /_fake/apps/{id}/secrets        fake.add_secret(id, value, end=, start=,
                                               display_name=, key_id=)
    POST   /_fake/apps/{id}/certificates   fake.add_certificate(id, pem, start=, end=)
    DELETE /_fake/apps/{id}/credentials/K  fake.remove_credential(id, key_id)
    POST   /_fake/mailboxes                fake.add_mailbox(address, tenant=, id=, upn=,
                                               mail_enabled=True, send_as=[],
                                               max_send_size=, max_recipients=500)
    PATCH  /_fake/mailboxes/{address}      fake.update_mailbox(address, ...)
    GET    /_fake/faults                   fake.faults()
    POST   /_fake/faults                   fake.add_fault(...)  (below)
    DELETE /_fake/faults                   fake.clear_faults()
    POST   /_fake/faults/storm             fake.storm(route, count, status=503,
                                               retry_after=None, retry_after_every=2)
    POST   /_fake/refuse {"connections"}   fake.refuse_connections(n)
    POST   /_fake/tokens/expire            fake.expire_tokens(client_id=None)
    GET    /_fake/tokens                   fake.token_requests (each: client, method,
                                               ok, AADSTS code, assertion alg/x5t)
    GET    /_fake/messages                 fake.messages (?mailbox=, ?content=0,
                                               ?wait=N&timeout=S long-polls for N in all)
    GET    /_fake/drafts                   fake.drafts_left()
    GET    /_fake/deletions                fake.deletions
    GET    /_fake/stats                    fake.stats(): token requests, requests and
                                               statuses per route, max_concurrency,
                                               throttled, messages, drafts_left
    GET    /_fake/requests                 fake.request_log (the last 10,000)

Times are epoch seconds or ISO 8601 strings.  Secrets are ``"value"`` or
``{"value", "end", "start", "display_name", "key_id"}`` (default end: two
years on); certificates are a PEM or ``{"pem", "start", "end"}`` (default: the
certificate's validity).  Permissions are Graph application roles:
``Mail.Send``, ``Mail.ReadWrite`` (drafts, attachments, upload sessions),
``User.Read.All``, ``Application.Read.All``.  ``mailboxes`` on an app is an
application access policy (None: every mailbox).  ``send_as`` on a mailbox
lists the other From addresses it may use.  ``password_credentials`` replaces
what ``applications(appId=)`` reports.  ``setup`` takes
``{"tenants": [...], "apps": [...], "mailboxes": [...], "settings": {...}}``
with the same keys (also ``--setup FILE``).

Faults: ``add_fault(route, status=503, headers=None, body=None, code=None,
message=None, times=1, action="respond", delay=None, mailbox=None,
retry_after=None, retry_after_date=None)``.  ``route`` is one of ``discovery``,
``token``, ``sendMail``, ``createMessage``, ``getMessage``, ``updateMessage``,
``deleteMessage``, ``addAttachment``, ``createUploadSession``, ``upload``,
``cancelUpload``, ``send``, ``getUser``, ``getApplication`` or ``*``.  Actions:
``respond`` (the scripted answer, nothing processed; the body defaults to the
Graph- or Entra-shaped error for the status, ``code``/``message`` override it,
``body`` replaces it), ``hang`` (read the request, never answer), ``drop``
(close the connection), ``reset`` (abort it), and ``accept_then_hang``,
``accept_then_drop``, ``accept_then_reset``: the request is processed (a message
is delivered) and then left unanswered, the ambiguous outcome.
``retry_after`` is seconds (or any string, verbatim); ``retry_after_date`` is
seconds from now, sent as an HTTP date.  ``refuse_connections(n)`` aborts the
next n TCP connections before the TLS handshake.

Records: each delivered message (``Delivery``) has the mailbox, the client,
``sender`` (From), ``to``/``cc``/``bcc``/``recipients``, subject, Message-ID,
``mime`` as received for the MIME forms, ``delivered_mime`` (that MIME without
its Bcc header) for MIME sendMail, the
JSON body and ``internetMessageHeaders``, attachments (name, contentType,
isInline, contentId, bytes), ``saved_to_sent_items``, ``method`` (``mime``,
``json`` or ``draft``) and timestamps.  Over HTTP bytes are base64
(``mime_b64``, ``content_b64``) next to their size and sha256.
"""

import argparse
import base64
import collections
import email.utils
import hashlib
import hmac
import json
import re
import secrets
import sys
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote, unquote, urlsplit

from twisted.internet import defer, task
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.web import resource, server
from zope.interface import implementer

from tests.fakes import graph_entra as entra
from tests.fakes import graph_mail as mail
from tests.fakes.graph_entra import (
    EntraError,
    KeyCredential,
    PasswordCredential,
    parse_when,
    utc_iso,
)
from tests.fakes.graph_mail import Attachment, GraphError

log = Logger()

GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
TWO_YEARS = 2 * 365 * 24 * 3600
DEFAULT_MAX_SEND_SIZE = 35 * 1024 * 1024  # Exchange Online's default MaxSendSize
WWW_AUTHENTICATE = (
    'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/'
    f'authorize", client_id="{GRAPH_APP_ID}"'
)
GRAPH_JSON = (
    "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;"
    "charset=utf-8"
)

MAIL_SEND = ("Mail.Send",)
MAIL_READWRITE = ("Mail.ReadWrite",)
USER_READ = ("User.Read.All", "User.ReadWrite.All", "User.ReadBasic.All", "Directory.Read.All")
APPLICATION_READ = ("Application.Read.All", "Application.ReadWrite.All", "Directory.Read.All")

ENTRA_ROUTES = frozenset({"discovery", "jwks", "token"})
ROUTES = frozenset(
    """discovery jwks token sendMail createMessage getMessage updateMessage deleteMessage
    addAttachment createUploadSession upload cancelUpload send getUser getApplication""".split()
)
FAULT_ACTIONS = frozenset(
    "respond hang drop reset accept_then_hang accept_then_drop accept_then_reset".split()
)
_UNSET = object()

DEFAULT_ERRORS = {
    400: ("BadRequest", "The request is invalid."),
    401: ("InvalidAuthenticationToken", "Access token validation failure."),
    403: ("ErrorAccessDenied", "Access is denied. Check credentials and try again."),
    404: ("ErrorItemNotFound", "The specified object was not found in the store."),
    409: (
        "ErrorIrresolvableConflict",
        "The send or update operation could not be performed because the change key passed in "
        "the request does not match the current change key for the item.",
    ),
    413: ("RequestEntityTooLarge", "The maximum request length supported is 4MB."),
    429: ("ApplicationThrottled", "Application is over its MailboxConcurrency limit."),
    500: ("ErrorInternalServerError", "An internal server error occurred. The operation failed."),
    502: ("BadGateway", "The gateway received an invalid response from the backend."),
    503: ("ServiceUnavailable", "The service is temporarily unavailable. Please retry later."),
    504: ("GatewayTimeout", "The gateway did not receive a response from the backend in time."),
}
DEFAULT_ENTRA_ERRORS = {
    400: ("invalid_request", 90023, "The authentication service request isn't valid."),
    401: ("invalid_client", 7000215, "Invalid client secret provided."),
    429: (
        "temporarily_unavailable",
        90055,
        "There are too many incoming requests. Please try again later.",
    ),
    500: (
        "server_error",
        50000,
        "There was an error issuing a token or an issue with our sign-in service.",
    ),
}


def _graph_id():
    """An id shaped like Exchange's: URL-safe base64 that ends in ``=``."""
    return "AAMkA" + base64.urlsafe_b64encode(secrets.token_bytes(61)).decode("ascii")


def _norm_origin(url):
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    return f"{parts.scheme.lower()}://{host}" + (f":{port}" if port and port != 443 else "")


def _lower_set(values):
    return {v.lower() for v in values}


# ---------------------------------------------------------------- the things the fake holds


@dataclass
class Tenant:
    id: str
    domains: list
    display_name: str = None

    @property
    def directory(self):
        """How Entra names the directory in its messages."""
        return self.display_name or (self.domains[0] if self.domains else self.id)

    def names(self):
        return {self.id.lower(), *(d.lower() for d in self.domains)}

    def describe(self):
        return {"tenant_id": self.id, "domains": self.domains, "display_name": self.display_name}


@dataclass
class App:
    client_id: str
    tenant_id: str
    permissions: set
    secrets: list = field(default_factory=list)
    keys: list = field(default_factory=list)
    mailboxes: set = None  # an application access policy: None lets it reach every mailbox
    password_credentials: list = None  # what applications(appId=) reports instead of secrets
    display_name: str = None
    object_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def resource(self):
        return {
            "id": self.object_id,
            "appId": self.client_id,
            "displayName": self.display_name,
            "signInAudience": "AzureADMyOrg",
            "passwordCredentials": (
                self.password_credentials
                if self.password_credentials is not None
                else [s.describe() for s in self.secrets]
            ),
            "keyCredentials": [k.describe() for k in self.keys],
        }

    def describe(self):
        return {
            "client_id": self.client_id,
            "tenant": self.tenant_id,
            "permissions": sorted(self.permissions),
            "mailboxes": None if self.mailboxes is None else sorted(self.mailboxes),
            "secrets": [s.describe() for s in self.secrets],
            "certificates": [k.describe() for k in self.keys],
            "password_credentials": self.password_credentials,
            "display_name": self.display_name,
        }


@dataclass
class Mailbox:
    address: str
    id: str
    upn: str
    tenant_id: str = None  # None: visible from every tenant
    mail_enabled: bool = True
    send_as: set = field(default_factory=set)
    max_send_size: int = DEFAULT_MAX_SEND_SIZE
    max_recipients: int = 500
    display_name: str = None

    def is_self(self, address):
        return address is None or address.lower() in (self.address.lower(), self.upn.lower())

    def may_send_as(self, address):
        return self.is_self(address) or address.lower() in self.send_as

    def describe(self):
        return {
            "address": self.address,
            "id": self.id,
            "upn": self.upn,
            "tenant": self.tenant_id,
            "mail_enabled": self.mail_enabled,
            "send_as": sorted(self.send_as),
            "max_send_size": self.max_send_size,
            "max_recipients": self.max_recipients,
            "display_name": self.display_name,
        }


@dataclass
class Token:
    value: str
    client_id: str
    tenant_id: str
    resource: str
    roles: frozenset
    issued_at: float
    expires_at: float


@dataclass
class Fault:
    route: str
    status: int = 503
    headers: dict = field(default_factory=dict)
    body: object = None
    code: str = None
    message: str = None
    times: int = 1
    action: str = "respond"
    delay: float = None
    mailbox: str = None
    retry_after: object = None
    retry_after_date: float = None

    @property
    def processes(self):
        return self.action.startswith("accept_then_")

    def describe(self):
        return {
            "route": self.route,
            "status": self.status,
            "headers": self.headers,
            "body": self.body,
            "code": self.code,
            "message": self.message,
            "times": self.times,
            "action": self.action,
            "delay": self.delay,
            "mailbox": self.mailbox,
            "retry_after": self.retry_after,
            "retry_after_date": self.retry_after_date,
        }


@dataclass
class UploadSession:
    id: str
    draft: "Draft"
    client_id: str
    authtoken: str
    name: str
    size: int
    content_type: str
    is_inline: bool
    content_id: str
    expires_at: float  # the wall-clock date it reports
    deadline: float  # the same moment on the fake's clock
    received: bytearray = field(default_factory=bytearray)


@dataclass
class Draft:
    id: str
    mailbox: Mailbox
    client_id: str
    created_at: float
    fields: dict
    mime: bytes = None
    attachments: list = field(default_factory=list)
    sessions: dict = field(default_factory=dict)
    change_key: int = 1
    modified_at: float = None
    conversation_id: str = field(default_factory=_graph_id)

    def describe(self):
        return {
            "id": self.id,
            "mailbox": self.mailbox.address,
            "client_id": self.client_id,
            "created_at": utc_iso(self.created_at, 6),
            "subject": self.fields.get("subject"),
            "to": mail.addresses(self.fields.get("toRecipients")),
            "cc": mail.addresses(self.fields.get("ccRecipients")),
            "bcc": mail.addresses(self.fields.get("bccRecipients")),
            "attachments": [a.record(with_content=False) for a in self.attachments],
            "upload_sessions": [
                {"id": s.id, "name": s.name, "size": s.size, "received": len(s.received)}
                for s in self.sessions.values()
            ],
            "from_mime": self.mime is not None,
        }


@dataclass
class Delivery:
    """A message Graph accepted for delivery, as the fake recorded it."""

    id: str
    method: str  # mime | json | draft
    mailbox: str
    client_id: str
    sender: str
    to: list
    cc: list
    bcc: list
    subject: str
    message_id: str
    saved_to_sent_items: bool
    received_at: float
    delivered_at: float
    mime: bytes = None
    delivered_mime: bytes = None
    body: dict = None
    internet_message_headers: list = field(default_factory=list)
    attachments: list = field(default_factory=list)
    draft_id: str = None
    draft_created_at: float = None
    mime_size: int = None
    mime_sha256: str = None

    def __post_init__(self):
        if self.mime is not None:
            self.mime_size = len(self.mime)
            self.mime_sha256 = hashlib.sha256(self.mime).hexdigest()

    def forget_content(self):
        self.mime = self.delivered_mime = None
        for attachment in self.attachments:
            attachment.forget_content()

    @property
    def recipients(self):
        return mail.unique(self.to + self.cc + self.bcc)

    def record(self, with_content=True):
        out = {
            "id": self.id,
            "method": self.method,
            "mailbox": self.mailbox,
            "client_id": self.client_id,
            "from": self.sender,
            "to": self.to,
            "cc": self.cc,
            "bcc": self.bcc,
            "recipients": self.recipients,
            "subject": self.subject,
            "message_id": self.message_id,
            "saved_to_sent_items": self.saved_to_sent_items,
            "body": self.body,
            "internet_message_headers": self.internet_message_headers,
            "attachments": [a.record(with_content) for a in self.attachments],
            "draft_id": self.draft_id,
            "received_at": utc_iso(self.received_at, 6),
            "delivered_at": utc_iso(self.delivered_at, 6),
            "draft_created_at": (
                utc_iso(self.draft_created_at, 6) if self.draft_created_at is not None else None
            ),
            "mime_size": self.mime_size,
            "mime_sha256": self.mime_sha256,
        }
        if with_content:
            for name in ("mime", "delivered_mime"):
                value = getattr(self, name)
                out[f"{name}_b64"] = None if value is None else base64.b64encode(value).decode()
        return out


@dataclass
class Call:
    """One HTTP request as the handlers see it."""

    method: str
    path: str
    segments: list
    query: dict
    headers: dict
    body: bytes
    origin: str
    at: float
    request_id: str
    client_request_id: str
    route: str = None

    def header(self, name):
        return self.headers.get(name.lower())

    def media_type(self):
        return (self.header("content-type") or "").split(";")[0].strip().lower()

    def arg(self, name, default=None):
        values = self.query.get(name)
        return values[0] if values else default


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    action: str = "respond"  # respond | hang | drop | reset


def _json_reply(status, document, headers=None, content_type="application/json; charset=utf-8"):
    return Reply(
        status,
        json.dumps(document).encode("utf-8"),
        {"Content-Type": content_type, **(headers or {})},
    )


# ---------------------------------------------------------------- the fake


class FakeGraph:
    """Entra ID and Graph mail for one test or benchmark; everything observable on it."""

    def __init__(
        self,
        reactor,
        *,
        clock=None,
        latency=0.0,
        token_lifetime=3599,
        mailbox_concurrency=4,
        throttle_retry_after=1,
        upload_session_lifetime=900,
        record_content=True,
        record_limit=None,
        hosts=(),
        verbose=False,
    ):
        self._reactor = reactor
        # the names Graph answers to: the test CA's server certificate covers these
        self.hosts = {"127.0.0.1", "localhost", "::1", *(h.lower() for h in hosts)}
        self._clock = clock or reactor
        self._initial = dict(
            latency=latency,
            token_lifetime=token_lifetime,
            mailbox_concurrency=mailbox_concurrency,
            throttle_retry_after=throttle_retry_after,
            upload_session_lifetime=upload_session_lifetime,
            proxy_ports=(),
        )
        self.record_content = record_content
        self.record_limit = record_limit
        self.verbose = verbose
        self._ports = []
        self._factories = []
        self._sleeping = set()
        self._waiters = []
        self._reset_all()

    # -- configuration ------------------------------------------------------

    def _reset_all(self):
        for name, value in self._initial.items():
            setattr(self, name, value)
        self._tenants = {}
        self._apps = {}
        self._mailboxes = {}
        self._faults = collections.OrderedDict()
        self._reset_records()

    def _cancel_waiters(self):
        waiters, self._waiters = self._waiters, []
        for _, waiting in waiters:
            waiting.cancel()

    def _reset_records(self):
        self._cancel_waiters()
        self._tokens = {}
        self._drafts = {}
        self._sessions = {}
        self._messages = collections.deque(maxlen=self.record_limit)
        self._delivered = 0
        self.deletions = []
        self.token_requests = []
        self.request_log = collections.deque(maxlen=10000)
        self._inflight = collections.Counter()  # (client_id, mailbox id) -> requests
        self._inflight_mailbox = collections.Counter()  # mailbox address -> requests
        self._max_concurrency = collections.Counter()
        self._throttled = collections.Counter()
        self._route_counts = collections.Counter()
        self._statuses = collections.defaultdict(collections.Counter)
        self._refuse = 0

    def reset(self, records_only=False):
        """Forget what was received (and, unless ``records_only``, every setting too)."""
        if records_only:
            self._reset_records()
        else:
            self._reset_all()

    def configure(
        self,
        latency=_UNSET,
        token_lifetime=_UNSET,
        mailbox_concurrency=_UNSET,
        throttle_retry_after=_UNSET,
        upload_session_lifetime=_UNSET,
        proxy_ports=_UNSET,
    ):
        for name, value in (
            ("latency", latency),
            ("token_lifetime", token_lifetime),
            ("mailbox_concurrency", mailbox_concurrency),
            ("throttle_retry_after", throttle_retry_after),
            ("upload_session_lifetime", upload_session_lifetime),
            ("proxy_ports", _UNSET if proxy_ports is _UNSET else tuple(proxy_ports)),
        ):
            if value is not _UNSET:
                setattr(self, name, value)

    def set_latency(self, seconds):
        self.latency = seconds

    def add_tenant(self, tenant_id=None, domains=(), display_name=None):
        tenant = Tenant(str(tenant_id or uuid.uuid4()), list(domains), display_name)
        self._tenants[tenant.id.lower()] = tenant
        return tenant

    def _tenant_named(self, name):
        if name is None:
            return None
        lowered = str(name).lower()
        for tenant in self._tenants.values():
            if lowered in tenant.names():
                return tenant
        return None

    def _default_tenant(self, name):
        if name is not None:
            return self._tenant_named(name) or self.add_tenant(name)
        if len(self._tenants) == 1:
            return next(iter(self._tenants.values()))
        if not self._tenants:
            return self.add_tenant()
        raise ValueError("several tenants are registered: name one")

    def add_app(
        self,
        client_id=None,
        tenant=None,
        secrets=(),
        certificates=(),
        permissions=("Mail.Send",),
        mailboxes=None,
        password_credentials=None,
        display_name=None,
    ):
        """Register an application (creating its tenant if needed); returns the App."""
        owner = self._default_tenant(tenant)
        app = App(
            client_id=str(client_id or uuid.uuid4()),
            tenant_id=owner.id,
            permissions=set(permissions),
            mailboxes=None if mailboxes is None else _lower_set(mailboxes),
            password_credentials=password_credentials,
            display_name=display_name,
        )
        self._apps[app.client_id.lower()] = app
        for secret in secrets:
            if isinstance(secret, str):
                secret = {"value": secret}
            self.add_secret(app.client_id, **secret)
        for certificate in certificates:
            if isinstance(certificate, (str, bytes)):
                certificate = {"pem": certificate}
            self.add_certificate(app.client_id, **certificate)
        return app

    def app(self, client_id):
        try:
            return self._apps[client_id.lower()]
        except KeyError:
            raise KeyError(f"no app {client_id!r}") from None

    def update_app(
        self, client_id, permissions=_UNSET, mailboxes=_UNSET, password_credentials=_UNSET
    ):
        app = self.app(client_id)
        if permissions is not _UNSET:
            app.permissions = set(permissions)
        if mailboxes is not _UNSET:
            app.mailboxes = None if mailboxes is None else _lower_set(mailboxes)
        if password_credentials is not _UNSET:
            app.password_credentials = password_credentials
        return app

    def add_secret(self, client_id, value, end=None, start=None, display_name=None, key_id=None):
        now = self._now()
        secret = PasswordCredential(
            value=value,
            end=parse_when(end) if end is not None else now + TWO_YEARS,
            start=parse_when(start) if start is not None else now - 60,
            key_id=key_id or str(uuid.uuid4()),
            display_name=display_name,
        )
        self.app(client_id).secrets.append(secret)
        return secret

    def add_certificate(self, client_id, pem, start=None, end=None, display_name=None, key_id=None):
        key = KeyCredential.from_pem(
            pem, parse_when(start), parse_when(end), key_id=key_id, display_name=display_name
        )
        self.app(client_id).keys.append(key)
        return key

    def remove_credential(self, client_id, key_id):
        app = self.app(client_id)
        app.secrets = [s for s in app.secrets if s.key_id != key_id]
        app.keys = [k for k in app.keys if k.key_id != key_id]

    def add_mailbox(
        self,
        address,
        tenant=None,
        id=None,
        upn=None,
        mail_enabled=True,
        send_as=(),
        max_send_size=DEFAULT_MAX_SEND_SIZE,
        max_recipients=500,
        display_name=None,
    ):
        owner = self._tenant_named(tenant) if tenant is not None else None
        if tenant is not None and owner is None:
            owner = self.add_tenant(tenant)
        mailbox = Mailbox(
            address=address,
            id=str(id or uuid.uuid4()),
            upn=upn or address,
            tenant_id=owner.id if owner else None,
            mail_enabled=mail_enabled,
            send_as=_lower_set(send_as),
            max_send_size=max_send_size,
            max_recipients=max_recipients,
            display_name=display_name,
        )
        self._mailboxes[address.lower()] = mailbox
        return mailbox

    def mailbox(self, address):
        try:
            return self._mailboxes[address.lower()]
        except KeyError:
            raise KeyError(f"no mailbox {address!r}") from None

    def update_mailbox(self, address, **changes):
        mailbox = self.mailbox(address)
        for name, value in changes.items():
            if name == "send_as":
                value = _lower_set(value)
            if name not in (
                "mail_enabled",
                "send_as",
                "max_send_size",
                "max_recipients",
                "display_name",
                "upn",
            ):
                raise TypeError(f"unknown mailbox setting {name!r}")
            setattr(mailbox, name, value)
        return mailbox

    def setup(self, document):
        """Tenants, apps, mailboxes and settings from one document (``--setup``)."""
        for tenant in document.get("tenants", ()):
            self.add_tenant(**tenant)
        for app in document.get("apps", ()):
            self.add_app(**app)
        for mailbox in document.get("mailboxes", ()):
            if isinstance(mailbox, str):
                mailbox = {"address": mailbox}
            self.add_mailbox(**mailbox)
        self.configure(**document.get("settings", {}))

    def state(self):
        return {
            "tenants": [t.describe() for t in self._tenants.values()],
            "apps": [a.describe() for a in self._apps.values()],
            "mailboxes": [m.describe() for m in self._mailboxes.values()],
            "settings": {name: getattr(self, name) for name in self._initial},
            "faults": self.faults(),
            "url": self.url if self._ports else None,
        }

    # -- faults ---------------------------------------------------------------

    def add_fault(
        self,
        route,
        status=503,
        headers=None,
        body=None,
        code=None,
        message=None,
        times=1,
        action="respond",
        delay=None,
        mailbox=None,
        retry_after=None,
        retry_after_date=None,
    ):
        """Script the next ``times`` answers of ``route`` (see the module docstring)."""
        if route != "*" and route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; one of {sorted(ROUTES)} or '*'")
        if action not in FAULT_ACTIONS:
            raise ValueError(f"unknown action {action!r}; one of {sorted(FAULT_ACTIONS)}")
        fault = Fault(
            route,
            status,
            dict(headers or {}),
            body,
            code,
            message,
            int(times),
            action,
            delay,
            mailbox,
            retry_after,
            retry_after_date,
        )
        self._faults.setdefault(route, collections.deque()).append(fault)
        return fault

    def storm(self, route, count, status=503, retry_after=None, retry_after_every=2, mailbox=None):
        """The next ``count`` requests of ``route`` fail; every n-th carries ``Retry-After``."""
        for i in range(count):
            with_header = retry_after is not None and i % max(1, retry_after_every) == 0
            self.add_fault(
                route, status, retry_after=retry_after if with_header else None, mailbox=mailbox
            )

    def faults(self):
        return [f.describe() for queue in self._faults.values() for f in queue]

    def clear_faults(self):
        self._faults.clear()

    def refuse_connections(self, count):
        """Abort the next ``count`` connections before their TLS handshake."""
        self._refuse = int(count)

    def _take_fault(self, route, mailbox):
        for key in (route, "*"):
            queue = self._faults.get(key)
            if not queue:
                continue
            for fault in list(queue):
                if fault.mailbox is not None and (
                    mailbox is None or fault.mailbox.lower() != mailbox.lower()
                ):
                    continue
                fault.times -= 1
                if fault.times <= 0:
                    queue.remove(fault)
                return fault
        return None

    def expire_tokens(self, client_id=None):
        """Every token (of ``client_id``) expires now: Graph answers 401 until a new one."""
        now = self._tick()
        for token in self._tokens.values():
            if client_id is None or token.client_id.lower() == client_id.lower():
                token.expires_at = min(token.expires_at, now)

    # -- records ----------------------------------------------------------------

    @property
    def messages(self):
        return list(self._messages)

    def messages_for(self, mailbox):
        return [m for m in self._messages if m.mailbox.lower() == mailbox.lower()]

    def wait_for_messages(self, count):
        """A Deferred firing with the messages once ``count`` have been delivered in all."""
        if self._delivered >= count:
            return defer.succeed(self.messages)
        d = defer.Deferred()
        self._waiters.append((count, d))
        return d

    def drafts_left(self):
        """Drafts created and neither sent nor deleted: what a sender leaked."""
        return list(self._drafts.values())

    def stats(self):
        return {
            "token_requests": len(self.token_requests),
            "tokens_issued": sum(1 for t in self.token_requests if t["ok"]),
            "token_requests_by_client": dict(
                collections.Counter(t["client_id"] for t in self.token_requests)
            ),
            "requests": dict(self._route_counts),
            "statuses": {route: dict(c) for route, c in self._statuses.items()},
            "max_concurrency": dict(self._max_concurrency),
            "in_flight": {k: v for k, v in self._inflight_mailbox.items() if v},
            "throttled": dict(self._throttled),
            "messages": self._delivered,
            "drafts_left": len(self._drafts),
            "deletions": len(self.deletions),
        }

    def _deliver(self, delivery):
        if not self.record_content:
            delivery.forget_content()
        self._messages.append(delivery)
        self._delivered += 1
        ready = [(n, d) for n, d in self._waiters if self._delivered >= n]
        self._waiters = [(n, d) for n, d in self._waiters if self._delivered < n]
        for _, d in ready:
            if not d.called:  # a long poll that timed out has given up on it
                d.callback(self.messages)

    # -- serving ----------------------------------------------------------------

    def resource(self):
        return _FakeResource(self)

    def listen(self, ca_dir, port=0, interface="127.0.0.1"):
        """Serve over HTTPS with the test CA's server certificate; returns the listening port."""
        from tests.fakes.tlsca import TestCA

        ca = ca_dir if hasattr(ca_dir, "server_context_factory") else TestCA(ca_dir)
        factory = make_site(self)
        listening = self._reactor.listenSSL(
            port, factory, ca.server_context_factory(), interface=interface
        )
        self._ports.append(listening)
        self._factories.append(factory)
        return listening

    @property
    def url(self):
        address = self._ports[0].getHost()
        host = f"[{address.host}]" if ":" in address.host else address.host
        return f"https://{host}:{address.port}"

    def stop(self):
        """Stop listening, abort open connections, cancel pending delays; a Deferred."""
        stopping = [defer.maybeDeferred(p.stopListening) for p in self._ports]
        self._ports = []
        for factory in self._factories:
            for protocol in list(factory.protocols):
                protocol.transport.abortConnection()
        self._factories = []
        for sleeping in list(self._sleeping):
            sleeping.cancel()
        self._cancel_waiters()
        d = defer.gatherResults(stopping)
        # aborted connections finish closing on the next turn of the reactor
        d.addCallback(lambda _: task.deferLater(self._reactor, 0, lambda: None))
        return d

    def _now(self):
        """Wall-clock time: dates of secrets, certificates, assertions, records."""
        return time.time()

    def _tick(self):
        """The clock's time: what token and upload-session lifetimes are measured on."""
        return self._clock.seconds()

    def _sleep(self, seconds):
        if not seconds:
            return defer.succeed(None)
        d = task.deferLater(self._reactor, seconds, lambda: None)
        self._sleeping.add(d)
        d.addBoth(lambda result: (self._sleeping.discard(d), result)[1])
        return d

    def _call(self, request):
        raw_path = request.path.decode("latin-1")
        request.content.seek(0)
        body = request.content.read()
        headers = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        host = headers.get("host")
        if not host:
            address = request.getHost()
            host = f"{address.host}:{address.port}"
        request_id = str(uuid.uuid4())
        return Call(
            method=request.method.decode("ascii"),
            path=raw_path,
            segments=[unquote(s) for s in raw_path.split("/")[1:]],
            query={
                k.decode("utf-8", "replace"): [v.decode("utf-8", "replace") for v in vs]
                for k, vs in request.args.items()
            },
            headers=headers,
            body=body,
            origin=_norm_origin(f"https://{host}"),
            at=self._now(),
            request_id=request_id,
            client_request_id=headers.get("client-request-id") or request_id,
        )

    async def _serve(self, request):
        done = []
        request.notifyFinish().addBoth(lambda _: done.append(True))
        call = self._call(request)
        entry = {
            "at": utc_iso(call.at, 6),
            "method": call.method,
            "path": re.sub(r"authtoken=[^&]*", "authtoken=...", request.uri.decode("latin-1")),
            "route": None,
            "status": None,
            "authorization": call.header("authorization") is not None,
            "length": len(call.body),
        }
        self.request_log.append(entry)
        try:
            if call.segments[:1] == ["_fake"]:
                reply = await _Control(self).handle(call)
            else:
                reply = await self._dispatch(call, request, entry)
        except defer.CancelledError:
            return  # stop() is closing everything
        except GraphError as e:
            reply = self._graph_error(call, e)
        except EntraError as e:
            reply = self._entra_error(call, e)
        except Exception:
            log.failure(
                "the Graph fake failed on {method} {path}", method=call.method, path=call.path
            )
            reply = self._graph_error(
                call, GraphError(500, "UnknownError", "The fake raised; see its log.")
            )
        entry["status"] = reply.status if reply.action == "respond" else reply.action
        if call.route:
            self._statuses[call.route][entry["status"]] += 1
        if done:
            return  # the client went away: nobody to answer
        self._answer(request, reply)

    def _answer(self, request, reply):
        if reply.action == "hang":
            return
        if reply.action == "drop":
            # TLS would wait for the client's close_notify: close the TCP connection under it too
            transport = request.channel.transport
            transport.loseConnection()
            while getattr(transport, "transport", None) is not None:
                transport = transport.transport
            transport.loseConnection()
            return
        if reply.action == "reset":
            request.channel.transport.abortConnection()
            return
        request.setResponseCode(reply.status)
        for name, value in reply.headers.items():
            request.setHeader(name, str(value))
        if reply.status not in (204, 304):
            request.setHeader("Content-Length", str(len(reply.body)))
            if reply.body and request.method != b"HEAD":
                request.write(reply.body)
        request.finish()

    def _graph_headers(self, call):
        return {
            "request-id": call.request_id,
            "client-request-id": call.client_request_id,
            "Strict-Transport-Security": "max-age=31536000",
            "Cache-Control": "no-cache",
        }

    def _graph_error(self, call, error):
        body = mail.error_body(
            error.code,
            error.message,
            call.request_id,
            call.client_request_id,
            self._now(),
            inner=error.inner,
        )
        return _json_reply(error.status, body, {**self._graph_headers(call), **error.headers})

    def _entra_headers(self, trace_id):
        return {
            "Cache-Control": "no-store, no-cache",
            "Pragma": "no-cache",
            "x-ms-request-id": trace_id,
            "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
        }

    def _entra_error(self, call, error):
        trace_id = str(uuid.uuid4())
        body = error.body(
            self._now(), trace_id, call.header("client-request-id") or str(uuid.uuid4())
        )
        return _json_reply(error.status, body, self._entra_headers(trace_id))

    # -- routing ------------------------------------------------------------------

    def _route(self, call):
        """(route name, handler, parameters) for a request, or a Graph error."""
        s, low, method = call.segments, [x.lower() for x in call.segments], call.method
        table = None
        params = {}
        if len(s) >= 2 and low[0] == "v1.0":
            if low[1] == "me":
                raise GraphError(
                    400,
                    "BadRequest",
                    "/me request is only valid with delegated authentication flow.",
                )
            if low[1] == "users" and len(s) >= 3:
                params["mailbox"] = s[2]
                rest = low[3:]
                if not rest:
                    table = {"GET": ("getUser", self._get_user)}
                elif rest == ["sendmail"]:
                    table = {"POST": ("sendMail", self._send_mail)}
                elif rest == ["messages"]:
                    table = {"POST": ("createMessage", self._create_message)}
                elif len(rest) >= 2 and rest[0] == "messages":
                    params["message"] = s[4]
                    tail = [t.removeprefix("microsoft.graph.") for t in rest[2:]]
                    table = {
                        (): {
                            "GET": ("getMessage", self._get_message),
                            "PATCH": ("updateMessage", self._update_message),
                            "DELETE": ("deleteMessage", self._delete_message),
                        },
                        ("attachments",): {"POST": ("addAttachment", self._add_attachment)},
                        ("attachments", "createuploadsession"): {
                            "POST": ("createUploadSession", self._create_upload_session)
                        },
                        ("send",): {"POST": ("send", self._send_draft)},
                    }.get(tuple(tail))
            elif match := re.fullmatch(r"applications\(appid='([^']*)'\)", s[1], re.I):
                params["app_id"] = match.group(1)
                table = {"GET": ("getApplication", self._get_application)} if len(s) == 2 else None
            elif low[1] == "applications" and len(s) == 3:
                params["object_id"] = s[2]
                table = {"GET": ("getApplication", self._get_application)}
            if table is None:
                raise GraphError(
                    400, "BadRequest", f"Resource not found for the segment '{s[-1]}'."
                )
        elif len(s) == 5 and low[:2] == ["api", "v2.0"]:
            parts = [
                re.fullmatch(rf"{name}\('([^']*)'\)", seg, re.I)
                for name, seg in zip(
                    ("users", "messages", "attachmentsessions"), s[2:], strict=True
                )
            ]
            if all(parts):
                params = {
                    "user": parts[0].group(1),
                    "message": parts[1].group(1),
                    "session": parts[2].group(1),
                }
                table = {
                    "PUT": ("upload", self._upload),
                    "DELETE": ("cancelUpload", self._cancel_upload),
                }
        elif len(s) == 4 and low[1:] == ["v2.0", ".well-known", "openid-configuration"]:
            params["tenant"] = s[0]
            table = {"GET": ("discovery", self._discovery)}
        elif len(s) == 4 and low[1:] == ["discovery", "v2.0", "keys"]:
            params["tenant"] = s[0]
            table = {"GET": ("jwks", self._jwks)}
        elif len(s) == 4 and low[1:] == ["oauth2", "v2.0", "token"]:
            params["tenant"] = s[0]
            return "token", self._token, params  # Entra answers every method itself
        if table is None:
            raise GraphError(404, "ResourceNotFound", "Resource could not be discovered.")
        if method not in table:
            raise GraphError(
                405, "BadRequest", "Specified HTTP method is not allowed for the request uri."
            )
        name, handler = table[method]
        return name, handler, params

    async def _dispatch(self, call, request, entry):
        route, handler, params = self._route(call)
        call.route = entry["route"] = route
        self._route_counts[route] += 1
        entry["mailbox"] = params.get("mailbox")
        fault = self._take_fault(route, self._fault_mailbox(params))
        if fault is not None and not fault.processes:
            await self._sleep(self.latency if fault.delay is None else fault.delay)
            return self._scripted(call, route, fault)
        reply = await handler(call, request, **params)
        if fault is not None:
            await self._sleep(fault.delay or 0)
            return Reply(action=fault.action.removeprefix("accept_then_"))
        return reply

    def _fault_mailbox(self, params):
        if "mailbox" in params:
            mailbox = self._find_mailbox(params["mailbox"], None)
            return mailbox.address if mailbox else params["mailbox"]
        if "session" in params:
            session = self._sessions.get(params["session"])
            return session.draft.mailbox.address if session else None
        return None

    def _scripted(self, call, route, fault):
        if fault.action != "respond":
            return Reply(action=fault.action)
        headers = dict(fault.headers)
        if fault.retry_after is not None:
            headers["Retry-After"] = str(fault.retry_after)
        if fault.retry_after_date is not None:
            headers["Retry-After"] = email.utils.formatdate(
                self._now() + fault.retry_after_date, usegmt=True
            )
        if fault.body is not None:
            body = fault.body if isinstance(fault.body, (str, bytes)) else json.dumps(fault.body)
            body = body.encode("utf-8") if isinstance(body, str) else body
            headers.setdefault("Content-Type", "application/json")
            if route not in ENTRA_ROUTES:
                headers = {**self._graph_headers(call), **headers}
            return Reply(fault.status, body, headers)
        if fault.status < 400:
            return Reply(fault.status, b"", {**self._graph_headers(call), **headers})
        if route in ENTRA_ROUTES:
            error, number, text = DEFAULT_ENTRA_ERRORS.get(
                fault.status,
                ("temporarily_unavailable", 90006, "The service is temporarily unavailable."),
            )
            reply = self._entra_error(
                call, EntraError(fault.status, fault.code or error, number, fault.message or text)
            )
        else:
            code, text = DEFAULT_ERRORS.get(
                fault.status, ("UnknownError", "An unexpected error occurred.")
            )
            reply = self._graph_error(
                call,
                GraphError(
                    fault.status,
                    fault.code or code,
                    fault.message or text,
                    inner=not (fault.status == 429 and fault.code is None),
                ),
            )
        reply.headers.update(headers)
        return reply

    # -- Entra ------------------------------------------------------------------

    async def _discovery(self, call, request, tenant):
        await self._sleep(self.latency)
        found = self._tenant_named(tenant)
        if found is None and tenant.lower() not in ("common", "organizations"):
            raise entra.unknown_tenant(tenant, error="invalid_tenant")
        document = entra.openid_configuration(call.origin, tenant, found.id if found else None)
        return _json_reply(200, document, self._entra_headers(str(uuid.uuid4())))

    async def _jwks(self, call, request, tenant):
        await self._sleep(self.latency)
        if self._tenant_named(tenant) is None and tenant.lower() not in ("common", "organizations"):
            raise entra.unknown_tenant(tenant, error="invalid_tenant")
        return _json_reply(200, {"keys": []})

    async def _token(self, call, request, tenant):
        await self._sleep(self.latency)
        record = {
            "at": utc_iso(self._now(), 6),
            "tenant": tenant,
            "client_id": None,
            "method": None,
            "ok": False,
            "error_code": None,
        }
        self.token_requests.append(record)
        try:
            token = self._issue_token(call, tenant, record)
        except EntraError as e:
            record["error_code"] = e.code
            raise
        record["ok"] = True
        document = {
            "token_type": "Bearer",
            "expires_in": self.token_lifetime,
            "ext_expires_in": self.token_lifetime,
            "access_token": token.value,
        }
        return _json_reply(200, document, self._entra_headers(str(uuid.uuid4())))

    def _issue_token(self, call, path_tenant, record):
        if call.method != "POST":
            raise entra.post_only(call.method)
        if path_tenant.lower() in ("common", "consumers"):
            raise entra.common_endpoint()
        tenant = self._tenant_named(path_tenant)
        if tenant is None:
            raise entra.unknown_tenant(path_tenant)
        form = {}
        if call.media_type() == "application/x-www-form-urlencoded":
            form = parse_qs(call.body.decode("utf-8", "replace"), keep_blank_values=True)

        def param(name):
            values = form.get(name)
            return values[0] if values else None

        basic_id, basic_secret = _basic_credentials(call.header("authorization"))
        grant = param("grant_type")
        if not grant:
            raise entra.missing_parameter("grant_type")
        if grant != "client_credentials":
            raise entra.unsupported_grant(grant)
        client_id = param("client_id") or basic_id
        if not client_id:
            raise entra.missing_parameter("client_id")
        record["client_id"] = client_id
        app = self._apps.get(client_id.lower())
        if app is None or app.tenant_id != tenant.id:
            raise entra.unknown_client(client_id, tenant.directory)
        scope = param("scope")
        if not scope:
            raise entra.missing_parameter("scope")
        scopes = scope.split()
        if len(scopes) != 1 or not scopes[0].endswith("/.default"):
            raise entra.invalid_scope(scope)
        audience = scopes[0][: -len("/.default")]
        if audience != GRAPH_APP_ID and not self._is_graph_origin(audience, call):
            raise entra.unknown_resource(audience, tenant.directory)

        now = self._now()
        assertion_type, assertion = param("client_assertion_type"), param("client_assertion")
        if assertion_type is not None or assertion is not None:
            record["method"] = "client_assertion"
            if assertion_type != entra.CLIENT_ASSERTION_TYPE:
                raise EntraError(
                    400,
                    "invalid_request",
                    90023,
                    f"The client_assertion_type '{assertion_type}' is not supported.",
                )
            if not assertion:
                raise entra.missing_parameter("client_assertion")
            names = {path_tenant, tenant.id, *tenant.domains}
            audiences = {f"{call.origin}/{n}/oauth2/{v}token" for n in names for v in ("v2.0/", "")}
            key, header = entra.verify_client_assertion(
                assertion, app.client_id, app.keys, audiences, now
            )
            record["assertion"] = {
                "alg": header["alg"],
                "thumbprint": "x5t#S256" if "x5t#S256" in header else "x5t",
                "x5c": "x5c" in header,
                "key_id": key.key_id,
            }
        else:
            record["method"] = "client_secret"
            presented = param("client_secret") or basic_secret
            if not presented:
                raise entra.missing_credential()
            matching = [s for s in app.secrets if s.matches(presented)]
            if not any(s.start <= now < s.end for s in matching):
                if any(s.end <= now for s in matching):
                    raise entra.expired_secret(app.client_id)
                raise entra.invalid_secret(app.client_id)

        tick = self._tick()
        for value in [v for v, t in self._tokens.items() if t.expires_at < tick - 3600]:
            del self._tokens[value]
        token = Token(
            value=secrets.token_urlsafe(96),
            client_id=app.client_id,
            tenant_id=tenant.id,
            resource=GRAPH_APP_ID if audience == GRAPH_APP_ID else _norm_origin(audience),
            roles=frozenset(app.permissions),
            issued_at=tick,
            expires_at=tick + self.token_lifetime,
        )
        self._tokens[token.value] = token
        return token

    def _is_graph_origin(self, resource, call):
        """Is ``resource`` this fake's Graph (any name its certificate has, a port it serves)?

        The authority and Graph may be named differently (``localhost`` and
        ``127.0.0.1``); a token is then good only where it was asked for.
        """
        parts = urlsplit(resource)
        if parts.scheme.lower() != "https" or parts.path not in ("", "/") or parts.query:
            return False
        ports = {p.getHost().port for p in self._ports} or {urlsplit(call.origin).port}
        ports.update(self.proxy_ports)  # a TCP proxy in front of it (tests.faultproxy)
        return (parts.hostname or "").lower() in self.hosts and (parts.port or 443) in ports

    # -- Graph: who is asking, for which mailbox --------------------------------

    def _authenticate(self, call):
        auth = call.header("authorization") or ""
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise GraphError(
                401,
                "InvalidAuthenticationToken",
                "Access token is empty.",
                {"WWW-Authenticate": WWW_AUTHENTICATE},
            )
        token = self._tokens.get(value.strip())
        if token is None:
            raise GraphError(
                401,
                "InvalidAuthenticationToken",
                "CompactToken parsing failed with error code: 80049217",
                {"WWW-Authenticate": WWW_AUTHENTICATE},
            )
        if self._tick() >= token.expires_at:
            raise GraphError(
                401,
                "InvalidAuthenticationToken",
                "Lifetime validation failed, the token is expired.",
                {"WWW-Authenticate": WWW_AUTHENTICATE},
            )
        if token.resource not in (GRAPH_APP_ID, call.origin):
            raise GraphError(
                401,
                "InvalidAuthenticationToken",
                "Access token validation failure. Invalid audience.",
                {"WWW-Authenticate": WWW_AUTHENTICATE},
            )
        return token

    def _find_mailbox(self, ident, tenant_id):
        lowered = ident.lower()
        for mailbox in self._mailboxes.values():
            if lowered in (mailbox.address.lower(), mailbox.upn.lower(), mailbox.id.lower()):
                if tenant_id is None or mailbox.tenant_id in (None, tenant_id):
                    return mailbox
        return None

    async def _enter_mailbox(self, call, request, ident, roles):
        """Authenticate, authorise, resolve the mailbox, take a concurrency slot, wait."""
        if len(call.body) > mail.REQUEST_LIMIT:
            raise mail.too_large()
        token = self._authenticate(call)
        if not token.roles.intersection(roles):
            raise GraphError(
                403, "ErrorAccessDenied", "Access is denied. Check credentials and try again."
            )
        if ident.lower() == "me":
            raise GraphError(
                400, "BadRequest", "/me request is only valid with delegated authentication flow."
            )
        mailbox = self._find_mailbox(ident, token.tenant_id)
        if mailbox is None:
            raise GraphError(404, "ErrorInvalidUser", f"The requested user '{ident}' is invalid.")
        if not mailbox.mail_enabled:
            raise GraphError(
                404,
                "MailboxNotEnabledForRESTAPI",
                "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
            )
        app = self._apps.get(token.client_id.lower())
        if (
            app is not None
            and app.mailboxes is not None
            and mailbox.address.lower() not in app.mailboxes
        ):
            raise GraphError(
                403,
                "ErrorAccessDenied",
                "Access to OData is disabled: [RAOP] : Blocked by tenant configured "
                "AppOnly AccessPolicy settings.",
            )
        self._admit(request, token.client_id, mailbox)
        await self._sleep(self.latency)
        return token, mailbox

    def _admit(self, request, client_id, mailbox):
        key = (client_id.lower(), mailbox.id)
        if self._inflight[key] >= self.mailbox_concurrency:
            self._throttled[mailbox.address] += 1
            raise GraphError(
                429,
                "ApplicationThrottled",
                "Application is over its MailboxConcurrency limit.",
                {"Retry-After": str(self.throttle_retry_after)},
                inner=False,
            )
        inflight, inflight_mailbox = self._inflight, self._inflight_mailbox
        inflight[key] += 1
        inflight_mailbox[mailbox.address] += 1
        self._max_concurrency[mailbox.address] = max(
            self._max_concurrency[mailbox.address], inflight_mailbox[mailbox.address]
        )

        def release(_):
            # the counters a reset() replaced are left alone
            inflight[key] -= 1
            inflight_mailbox[mailbox.address] -= 1

        request.notifyFinish().addBoth(release)

    def _json_object(self, call):
        if call.media_type() != "application/json":
            raise GraphError(
                415,
                "UnsupportedMediaType",
                f"Content-Type '{call.header('content-type')}' is not supported for this request.",
            )
        try:
            document = json.loads(call.body.decode("utf-8-sig"))
        except (ValueError, UnicodeDecodeError):
            raise mail.bad_json() from None
        if not isinstance(document, dict):
            raise mail.bad_json()
        return document

    def _draft(self, mailbox, message_id):
        draft = self._drafts.get(message_id)
        if draft is None or draft.mailbox is not mailbox:
            raise GraphError(
                404, "ErrorItemNotFound", "The specified object was not found in the store."
            )
        return draft

    def _check_recipients(self, mailbox, to, cc, bcc):
        everyone = to + cc + bcc
        if not everyone:
            raise mail.no_recipients()
        for address in everyone:
            if not mail.is_address(address):
                raise mail.unresolved_recipient(address)
        if len(mail.unique(everyone)) > mailbox.max_recipients:
            raise GraphError(
                400,
                "ErrorInvalidRecipients",
                f"At least one recipient is not valid., The message has more than "
                f"{mailbox.max_recipients} recipients.",
            )

    # -- Graph: sending ---------------------------------------------------------

    async def _send_mail(self, call, request, mailbox):
        token, mbx = await self._enter_mailbox(call, request, mailbox, MAIL_SEND)
        kind = call.media_type()
        if kind == "text/plain":
            raw = mail.decode_mime_base64(call.body)
            parsed = mail.parse_mime(raw)
            self._check_recipients(mbx, parsed.to, parsed.cc, parsed.bcc)
            if not mbx.may_send_as(parsed.sender):
                raise mail.send_as_denied()
            delivery = Delivery(
                id=str(uuid.uuid4()),
                method="mime",
                mailbox=mbx.address,
                client_id=token.client_id,
                sender=parsed.sender or mbx.address,
                to=parsed.to,
                cc=parsed.cc,
                bcc=parsed.bcc,
                subject=parsed.subject,
                message_id=parsed.message_id,
                saved_to_sent_items=True,
                received_at=call.at,
                delivered_at=self._now(),
                mime=raw,
                delivered_mime=mail.strip_bcc(raw),
                attachments=parsed.attachments,
            )
        elif kind == "application/json":
            document = self._json_object(call)
            for name in document:
                if name not in ("message", "saveToSentItems"):
                    raise mail.body_read(
                        f"The parameter '{name}' in the request payload is not a "
                        "valid parameter for the operation 'sendMail'."
                    )
            if not isinstance(document.get("message"), dict):
                raise GraphError(
                    400, "ErrorInvalidParameter", "The value of the parameter 'Message' is empty."
                )
            fields = mail.message_fields(document["message"])
            save = mail.as_bool(document.get("saveToSentItems", True))
            delivery = self._delivery_from_fields(
                call, token, mbx, fields, "json", fields.get("attachments", []), save
            )
        else:
            raise GraphError(
                415,
                "UnsupportedMediaType",
                f"Content-Type '{call.header('content-type')}' is not supported: use "
                "application/json or text/plain.",
            )
        self._deliver(delivery)
        return Reply(202, b"", self._graph_headers(call))

    def _delivery_from_fields(
        self, call, token, mbx, fields, method, attachments, save, draft=None
    ):
        to = mail.addresses(fields.get("toRecipients"))
        cc = mail.addresses(fields.get("ccRecipients"))
        bcc = mail.addresses(fields.get("bccRecipients"))
        self._check_recipients(mbx, to, cc, bcc)
        sender = (fields.get("from") or {}).get("address")
        if not mbx.may_send_as(sender):
            raise mail.send_as_denied()
        return Delivery(
            id=str(uuid.uuid4()),
            method=method,
            mailbox=mbx.address,
            client_id=token.client_id,
            sender=sender or mbx.address,
            to=to,
            cc=cc,
            bcc=bcc,
            subject=fields.get("subject"),
            message_id=fields.get("internetMessageId"),
            saved_to_sent_items=save,
            received_at=call.at,
            delivered_at=self._now(),
            body=fields.get("body"),
            internet_message_headers=fields.get("internetMessageHeaders", []),
            attachments=list(attachments),
            # Exchange rebuilds a draft's MIME from the item (PATCHed recipients and all):
            # only what it was created from is known
            mime=draft.mime if draft else None,
            draft_id=draft.id if draft else None,
            draft_created_at=draft.created_at if draft else None,
        )

    # -- Graph: drafts ----------------------------------------------------------

    async def _create_message(self, call, request, mailbox):
        token, mbx = await self._enter_mailbox(call, request, mailbox, MAIL_READWRITE)
        now = self._now()
        if call.media_type() == "text/plain":
            raw = mail.decode_mime_base64(call.body)
            parsed = mail.parse_mime(raw)

            def listed(found):
                return [{"address": a, "name": None} for a in found]

            fields = {
                "toRecipients": listed(parsed.to),
                "ccRecipients": listed(parsed.cc),
                "bccRecipients": listed(parsed.bcc),
                "subject": parsed.subject,
                "internetMessageId": parsed.message_id,
            }
            if parsed.sender:
                fields["from"] = {"address": parsed.sender, "name": None}
            draft = Draft(
                _graph_id(),
                mbx,
                token.client_id,
                now,
                fields,
                mime=raw,
                attachments=parsed.attachments,
                modified_at=now,
            )
        else:
            fields = mail.message_fields(self._json_object(call))
            attachments = fields.pop("attachments", [])
            draft = Draft(
                _graph_id(),
                mbx,
                token.client_id,
                now,
                fields,
                attachments=attachments,
                modified_at=now,
            )
        for attachment in draft.attachments:
            attachment.id = _graph_id()
        if not fields.get("internetMessageId"):  # Exchange gives every item one
            fields["internetMessageId"] = f"<{uuid.uuid4().hex.upper()}@fake.prod.outlook.com>"
        self._drafts[draft.id] = draft
        return _json_reply(
            201, self._message_resource(call, draft), self._graph_headers(call), GRAPH_JSON
        )

    def _message_resource(self, call, draft):
        def wrap(recipient):
            if not recipient:
                return None
            return {
                "emailAddress": {
                    "name": recipient.get("name") or recipient["address"],
                    "address": recipient["address"],
                }
            }

        f = draft.fields
        body = f.get("body") or {"contentType": "text", "content": ""}
        return {
            "@odata.context": (
                f"{call.origin}/v1.0/$metadata#users('{quote(draft.mailbox.address)}')"
                "/messages/$entity"
            ),
            "@odata.etag": f'W/"CQAAABYAAAA{draft.change_key:08d}"',
            "id": draft.id,
            "createdDateTime": utc_iso(draft.created_at, 0),
            "lastModifiedDateTime": utc_iso(draft.modified_at, 0),
            "changeKey": f"CQAAABYAAAA{draft.change_key:08d}",
            "categories": [],
            "receivedDateTime": utc_iso(draft.created_at, 0),
            "sentDateTime": utc_iso(draft.created_at, 0),
            "hasAttachments": bool(draft.attachments),
            "internetMessageId": f.get("internetMessageId"),
            "subject": f.get("subject"),
            "bodyPreview": (body.get("content") or "")[:255],
            "importance": "normal",
            "parentFolderId": "AQMkADrafts",
            "conversationId": draft.conversation_id,
            "isDeliveryReceiptRequested": False,
            "isReadReceiptRequested": False,
            "isRead": True,
            "isDraft": True,
            "webLink": (
                f"https://outlook.office365.com/owa/?ItemID={quote(draft.id)}"
                "&exvsurl=1&viewmodel=ReadMessageItem"
            ),
            "inferenceClassification": "focused",
            "body": body,
            "sender": wrap(f.get("sender")),
            "from": wrap(f.get("from")),
            "toRecipients": [wrap(r) for r in f.get("toRecipients") or ()],
            "ccRecipients": [wrap(r) for r in f.get("ccRecipients") or ()],
            "bccRecipients": [wrap(r) for r in f.get("bccRecipients") or ()],
            "replyTo": [wrap(r) for r in f.get("replyTo") or ()],
            "flag": {"flagStatus": "notFlagged"},
        }

    async def _get_message(self, call, request, mailbox, message):
        _token, mbx = await self._enter_mailbox(
            call, request, mailbox, MAIL_READWRITE + ("Mail.Read",)
        )
        draft = self._draft(mbx, message)
        return _json_reply(
            200, self._message_resource(call, draft), self._graph_headers(call), GRAPH_JSON
        )

    async def _update_message(self, call, request, mailbox, message):
        _token, mbx = await self._enter_mailbox(call, request, mailbox, MAIL_READWRITE)
        draft = self._draft(mbx, message)
        changes = mail.message_fields(self._json_object(call), allow_attachments=False)
        draft.fields.update(changes)
        draft.change_key += 1
        draft.modified_at = self._now()
        return _json_reply(
            200, self._message_resource(call, draft), self._graph_headers(call), GRAPH_JSON
        )

    async def _delete_message(self, call, request, mailbox, message):
        token, mbx = await self._enter_mailbox(call, request, mailbox, MAIL_READWRITE)
        draft = self._draft(mbx, message)
        self._forget_draft(draft)
        self.deletions.append(
            {
                "id": draft.id,
                "mailbox": mbx.address,
                "client_id": token.client_id,
                "at": utc_iso(self._now(), 6),
                "subject": draft.fields.get("subject"),
            }
        )
        return Reply(204, b"", self._graph_headers(call))

    def _forget_draft(self, draft):
        self._drafts.pop(draft.id, None)
        for session_id in draft.sessions:
            self._sessions.pop(session_id, None)
        draft.sessions.clear()

    async def _add_attachment(self, call, request, mailbox, message):
        _token, mbx = await self._enter_mailbox(call, request, mailbox, MAIL_READWRITE)
        draft = self._draft(mbx, message)
        attachment = mail.file_attachment(self._json_object(call), "attachments")
        attachment.id = _graph_id()
        draft.attachments.append(attachment)
        draft.change_key += 1
        document = {
            "@odata.context": (
                f"{call.origin}/v1.0/$metadata#users('{quote(mbx.address)}')"
                f"/messages('{draft.id}')/attachments/$entity"
            ),
            **attachment.resource(),
        }
        return _json_reply(201, document, self._graph_headers(call), GRAPH_JSON)

    async def _create_upload_session(self, call, request, mailbox, message):
        token, mbx = await self._enter_mailbox(call, request, mailbox, MAIL_READWRITE)
        draft = self._draft(mbx, message)
        document = self._json_object(call)
        for name in document:
            if name != "AttachmentItem":
                raise mail.body_read(
                    f"The parameter '{name}' in the request payload is not a valid "
                    "parameter for the operation 'createUploadSession'."
                )
        item = document.get("AttachmentItem")
        if not isinstance(item, dict):
            raise GraphError(
                400,
                "ErrorInvalidParameter",
                "The value of the parameter 'AttachmentItem' is empty.",
            )
        for name in item:
            if name not in (
                "attachmentType",
                "name",
                "size",
                "contentType",
                "isInline",
                "contentId",
            ):
                raise mail.unknown_property(name, "microsoft.graph.attachmentItem")
        if str(item.get("attachmentType", "")).lower() != "file":
            raise GraphError(
                400, "ErrorInvalidParameter", "AttachmentItem.attachmentType must be 'file'."
            )
        size, name = item.get("size"), item.get("name")
        if not isinstance(name, str) or not name:
            raise GraphError(400, "ErrorInvalidParameter", "AttachmentItem.name is required.")
        if isinstance(size, bool) or not isinstance(size, int):
            raise GraphError(400, "ErrorInvalidParameter", "AttachmentItem.size is required.")
        if size < mail.UPLOAD_SESSION_MIN:
            raise GraphError(
                400,
                "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
                "Attachment size must be greater than the minimum size.",
            )
        if size > mail.UPLOAD_SESSION_MAX:
            raise GraphError(
                400,
                "ErrorAttachmentSizeShouldNotBeGreaterThanMaximumSize",
                "Attachment size must be less than the maximum size.",
            )
        session = UploadSession(
            id=_graph_id(),
            draft=draft,
            client_id=token.client_id,
            authtoken=secrets.token_urlsafe(96),
            name=name,
            size=size,
            content_type=item.get("contentType") or "application/octet-stream",
            is_inline=mail.as_bool(item.get("isInline", False)),
            content_id=item.get("contentId"),
            expires_at=self._now() + self.upload_session_lifetime,
            deadline=self._tick() + self.upload_session_lifetime,
        )
        self._sessions[session.id] = session
        draft.sessions[session.id] = session
        document = {
            "@odata.context": f"{call.origin}/v1.0/$metadata#microsoft.graph.uploadSession",
            "uploadUrl": f"{self._session_base(call, session)}?authtoken={session.authtoken}",
            "expirationDateTime": utc_iso(session.expires_at),
            "nextExpectedRanges": ["0-"],
        }
        return _json_reply(201, document, self._graph_headers(call), GRAPH_JSON)

    def _session_base(self, call, session):
        draft = session.draft
        tenant = draft.mailbox.tenant_id or self._apps[session.client_id.lower()].tenant_id
        return (
            f"{call.origin}/api/v2.0/Users('{draft.mailbox.id}@{tenant}')"
            f"/Messages('{draft.id}')/AttachmentSessions('{session.id}')"
        )

    def _upload_session(self, call, user, message, session_id):
        if call.header("authorization") is not None:
            raise GraphError(
                401,
                "InvalidAuthenticationToken",
                "The upload URL is pre-authenticated: a request to it must not carry "
                "an Authorization header.",
            )
        session = self._sessions.get(session_id)
        if session is None or session.draft.id != message:
            raise GraphError(
                404, "ErrorItemNotFound", "The specified object was not found in the store."
            )
        presented = call.arg("authtoken")
        if not presented or not hmac.compare_digest(presented, session.authtoken):
            raise GraphError(401, "InvalidAuthenticationToken", "Access token validation failure.")
        if self._tick() >= session.deadline:
            raise GraphError(
                401,
                "InvalidAuthenticationToken",
                "Lifetime validation failed, the token is expired.",
            )
        return session

    async def _upload(self, call, request, user, message, session):
        session = self._upload_session(call, user, message, session)
        self._admit(request, session.client_id, session.draft.mailbox)
        await self._sleep(self.latency)
        if self._sessions.get(session.id) is not session:  # deleted or sent meanwhile
            raise GraphError(
                404, "ErrorItemNotFound", "The specified object was not found in the store."
            )
        if call.media_type() != "application/octet-stream":
            raise GraphError(
                400,
                "ErrorInvalidRequest",
                "Content-Type must be application/octet-stream for an upload.",
            )
        match = re.fullmatch(
            r"bytes (\d+)-(\d+)/(\d+)", (call.header("content-range") or "").strip()
        )
        if match is None:
            raise GraphError(
                400,
                "ErrorInvalidContentRange",
                "The Content-Range header is missing or malformed: use 'bytes start-end/total'.",
            )
        start, end, total = (int(g) for g in match.groups())
        if total != session.size:
            raise GraphError(
                400,
                "ErrorInvalidContentRange",
                f"The total size {total} does not match the upload session's size {session.size}.",
            )
        if start > end or end >= total:
            raise GraphError(
                400, "ErrorInvalidContentRange", f"The range {start}-{end} is not valid."
            )
        expected = len(session.received)
        if start != expected:
            raise GraphError(
                416,
                "ErrorInvalidRange",
                f"The fragment starts at {start}; the next expected byte is {expected}. "
                "Upload the bytes of a file in order.",
            )
        if len(call.body) != end - start + 1:
            raise GraphError(
                400,
                "ErrorInvalidContentRange",
                f"The body has {len(call.body)} bytes; the Content-Range names {end - start + 1}.",
            )
        if len(call.body) > mail.REQUEST_LIMIT:
            raise GraphError(
                400, "ErrorInvalidRequest", "A fragment may carry at most 4 MB (4194304 bytes)."
            )
        last = end == total - 1
        if not last and len(call.body) % mail.UPLOAD_CHUNK_UNIT:
            raise GraphError(
                400,
                "ErrorInvalidRequest",
                "Every fragment but the last must be a multiple of 320 KiB (327680 bytes).",
            )
        session.received += call.body
        base = self._session_base(call, session)
        if not last:
            document = {
                "@odata.context": (
                    f"{call.origin}/api/v2.0/$metadata#Users('{user}')/Messages('{message}')"
                    "/AttachmentSessions/$entity"
                ),
                "ExpirationDateTime": utc_iso(session.expires_at),
                "nextExpectedRanges": [str(len(session.received))],
            }
            return _json_reply(200, document, self._graph_headers(call))
        draft = session.draft
        attachment = Attachment(
            name=session.name,
            content_type=session.content_type,
            content=bytes(session.received),
            is_inline=session.is_inline,
            content_id=session.content_id,
            source="upload",
            id=_graph_id(),
        )
        draft.attachments.append(attachment)
        draft.sessions.pop(session.id, None)
        self._sessions.pop(session.id, None)
        location = base.rsplit("/AttachmentSessions(", 1)[0] + f"/Attachments('{attachment.id}')"
        return Reply(201, b"", {**self._graph_headers(call), "Location": location})

    async def _cancel_upload(self, call, request, user, message, session):
        session = self._upload_session(call, user, message, session)
        await self._sleep(self.latency)
        session.draft.sessions.pop(session.id, None)
        self._sessions.pop(session.id, None)
        return Reply(204, b"", self._graph_headers(call))

    async def _send_draft(self, call, request, mailbox, message):
        token, mbx = await self._enter_mailbox(call, request, mailbox, MAIL_SEND)
        draft = self._draft(mbx, message)
        fields = draft.fields
        # a MIME draft's own attachments are inside its MIME already
        added = [a for a in draft.attachments if a.source != "mime"]
        if draft.mime is not None:
            size = len(draft.mime) + mail.encoded_size("", added)
        else:
            size = mail.encoded_size((fields.get("body") or {}).get("content"), added)
        if size > mbx.max_send_size:
            raise GraphError(
                400,
                "ErrorMessageSizeExceeded",
                "The message exceeds the maximum supported size., Cannot save changes "
                "made to an item to store.",
            )
        save = not mail.deletes_after_submit(fields)
        delivery = self._delivery_from_fields(
            call, token, mbx, fields, "draft", draft.attachments, save, draft=draft
        )
        self._forget_draft(draft)
        self._deliver(delivery)
        return Reply(202, b"", self._graph_headers(call))

    # -- Graph: directory -------------------------------------------------------

    async def _get_user(self, call, request, mailbox):
        token = self._authenticate(call)
        if not token.roles.intersection(USER_READ):
            raise GraphError(
                403,
                "Authorization_RequestDenied",
                "Insufficient privileges to complete the operation.",
            )
        await self._sleep(self.latency)
        found = self._find_mailbox(mailbox, token.tenant_id)
        if found is None:
            raise GraphError(
                404,
                "Request_ResourceNotFound",
                f"Resource '{mailbox}' does not exist or one of its queried "
                "reference-property objects are not present.",
            )
        document = {
            "businessPhones": [],
            "displayName": found.display_name,
            "givenName": None,
            "jobTitle": None,
            "mail": found.address,
            "mobilePhone": None,
            "officeLocation": None,
            "preferredLanguage": None,
            "surname": None,
            "userPrincipalName": found.upn,
            "id": found.id,
        }
        return self._selected(call, "users", document)

    async def _get_application(self, call, request, app_id=None, object_id=None):
        token = self._authenticate(call)
        if not token.roles.intersection(APPLICATION_READ):
            raise GraphError(
                403,
                "Authorization_RequestDenied",
                "Insufficient privileges to complete the operation.",
            )
        await self._sleep(self.latency)
        found = None
        for app in self._apps.values():
            if app.tenant_id == token.tenant_id and (
                (app_id is not None and app.client_id.lower() == app_id.lower())
                or (object_id is not None and app.object_id == object_id)
            ):
                found = app
        if found is None:
            raise GraphError(
                404,
                "Request_ResourceNotFound",
                f"Resource '{app_id or object_id}' does not exist or one of its queried "
                "reference-property objects are not present.",
            )
        return self._selected(call, "applications", found.resource())

    def _selected(self, call, entity_set, document):
        select = call.arg("$select")
        if select:
            names = [n.strip() for n in select.split(",") if n.strip()]
            for name in names:
                if name not in document:
                    raise GraphError(
                        400,
                        "BadRequest",
                        f"Could not find a property named '{name}' on type "
                        f"'microsoft.graph.{entity_set[:-1]}'.",
                    )
            document = {n: document[n] for n in names}
            context = f"{call.origin}/v1.0/$metadata#{entity_set}({','.join(names)})/$entity"
        else:
            context = f"{call.origin}/v1.0/$metadata#{entity_set}/$entity"
        return _json_reply(
            200, {"@odata.context": context, **document}, self._graph_headers(call), GRAPH_JSON
        )


def _basic_credentials(header):
    """(client_id, secret) from ``Authorization: Basic`` (client_secret_basic), else Nones."""
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None, None
    client_id, _, secret = decoded.partition(":")
    return unquote(client_id.replace("+", " ")), unquote(secret.replace("+", " "))


# ---------------------------------------------------------------- the control API over HTTP


class _Control:
    """``/_fake/...``: JSON in, JSON out, each a thin call to the FakeGraph."""

    def __init__(self, fake):
        self.fake = fake

    async def handle(self, call):
        try:
            return await self._handle(call)
        except (KeyError, ValueError, TypeError) as e:
            return _json_reply(400, {"error": f"{type(e).__name__}: {e}"})

    def _document(self, call):
        if not call.body.strip():
            return {}
        document = json.loads(call.body)
        if not isinstance(document, dict):
            raise ValueError("a JSON object is expected")
        return document

    async def _handle(self, call):
        fake, method, path = self.fake, call.method, call.segments[1:]
        doc = self._document(call)
        ok = {"ok": True}
        key = (method, *path[:1])
        if key == ("GET", "state"):
            return _json_reply(200, fake.state())
        if key == ("POST", "reset"):
            fake.reset(records_only=bool(doc.get("records_only")))
            return _json_reply(200, ok)
        if key == ("POST", "setup"):
            fake.setup(doc)
            return _json_reply(200, fake.state())
        if key == ("POST", "settings"):
            fake.configure(**doc)
            return _json_reply(200, fake.state()["settings"])
        if key == ("POST", "latency"):
            fake.configure(latency=float(doc["seconds"]))
            return _json_reply(200, ok)
        if key == ("POST", "tenants"):
            return _json_reply(200, fake.add_tenant(**doc).describe())
        if path[:1] == ["apps"]:
            if method == "POST" and len(path) == 1:
                return _json_reply(200, fake.add_app(**doc).describe())
            if method == "PATCH" and len(path) == 2:
                return _json_reply(200, fake.update_app(path[1], **doc).describe())
            if method == "POST" and len(path) == 3 and path[2] == "secrets":
                return _json_reply(200, fake.add_secret(path[1], **doc).describe())
            if method == "POST" and len(path) == 3 and path[2] == "certificates":
                return _json_reply(200, fake.add_certificate(path[1], **doc).describe())
            if method == "DELETE" and len(path) == 4 and path[2] == "credentials":
                fake.remove_credential(path[1], path[3])
                return _json_reply(200, ok)
        if path[:1] == ["mailboxes"]:
            if method == "POST" and len(path) == 1:
                return _json_reply(200, fake.add_mailbox(**doc).describe())
            if method == "PATCH" and len(path) == 2:
                return _json_reply(200, fake.update_mailbox(path[1], **doc).describe())
        if path[:1] == ["faults"]:
            if path[1:] == ["storm"] and method == "POST":
                fake.storm(**doc)
                return _json_reply(200, {"faults": fake.faults()})
            if len(path) == 1 and method == "GET":
                return _json_reply(200, {"faults": fake.faults()})
            if len(path) == 1 and method == "POST":
                return _json_reply(200, fake.add_fault(**doc).describe())
            if len(path) == 1 and method == "DELETE":
                fake.clear_faults()
                return _json_reply(200, ok)
        if key == ("POST", "refuse"):
            fake.refuse_connections(int(doc.get("connections", 1)))
            return _json_reply(200, ok)
        if path == ["tokens", "expire"] and method == "POST":
            fake.expire_tokens(doc.get("client_id"))
            return _json_reply(200, ok)
        if key == ("GET", "tokens"):
            return _json_reply(200, {"token_requests": fake.token_requests})
        if key == ("GET", "messages"):
            wait = int(call.arg("wait", "0"))
            if wait:
                timeout = float(call.arg("timeout", "10"))
                waiting = fake.wait_for_messages(wait)
                waiting.addTimeout(timeout, fake._reactor, onTimeoutCancel=lambda *_: None)
                try:
                    await waiting
                except defer.CancelledError:  # reset() or stop(): answer with what there is
                    pass
            with_content = call.arg("content", "1") not in ("0", "false") and fake.record_content
            mailbox = call.arg("mailbox")
            chosen = fake.messages_for(mailbox) if mailbox else fake.messages
            return _json_reply(
                200,
                {
                    "messages": [m.record(with_content) for m in chosen],
                    "delivered": fake._delivered,
                },
            )
        if key == ("GET", "drafts"):
            return _json_reply(200, {"drafts": [d.describe() for d in fake.drafts_left()]})
        if key == ("GET", "deletions"):
            return _json_reply(200, {"deletions": fake.deletions})
        if key == ("GET", "stats"):
            return _json_reply(200, fake.stats())
        if key == ("GET", "requests"):
            return _json_reply(200, {"requests": list(fake.request_log)})
        return _json_reply(404, {"error": f"no control endpoint {method} /_fake/{'/'.join(path)}"})


# ---------------------------------------------------------------- twisted.web plumbing


class _FakeResource(resource.Resource):
    isLeaf = True

    def __init__(self, fake):
        super().__init__()
        self._fake = fake

    def render(self, request):
        defer.ensureDeferred(self._fake._serve(request)).addErrback(
            lambda f: log.failure("serving {uri}", f, uri=request.uri)
        )
        return server.NOT_DONE_YET


class _QuietSite(server.Site):
    def log(self, request):
        pass


class _Refuse(Protocol):
    def connectionMade(self):
        self.transport.abortConnection()


@implementer(IProtocolNegotiationFactory)
class _Connections(WrappingFactory):
    """Keeps every connection (for stop()) and refuses the ones the fake was told to."""

    def __init__(self, site, fake):
        super().__init__(site)
        self._fake = fake

    def acceptableProtocols(self):
        # without this, a client offering ALPN (requests, urllib3) fails the handshake
        return self.wrappedFactory.acceptableProtocols()

    def buildProtocol(self, addr):
        if self._fake._refuse > 0:
            self._fake._refuse -= 1
            return _Refuse()
        return super().buildProtocol(addr)


def make_site(fake):
    """The factory serving ``fake`` (wrap it in TLS; ``FakeGraph.listen`` does)."""
    site = (server.Site if fake.verbose else _QuietSite)(fake.resource())
    site.displayTracebacks = False
    return _Connections(site, fake)


def listen(fake, ca, port=0, interface="127.0.0.1"):
    """``reactor.listenSSL`` for ``fake`` with the test CA's server certificate; the port."""
    return fake.listen(ca, port=port, interface=interface)


# ---------------------------------------------------------------- command line


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.graph",
        description="A fake of Microsoft Entra ID and Graph mail over HTTPS (see its docstring).",
    )
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--ca-dir", required=True, help="test CA folder (created if missing)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--token-lifetime", type=int, default=3599)
    parser.add_argument("--mailbox-concurrency", type=int, default=4)
    parser.add_argument("--throttle-retry-after", type=int, default=1)
    parser.add_argument("--setup", help="JSON file: tenants, apps, mailboxes, settings")
    parser.add_argument(
        "--no-content",
        action="store_true",
        help="keep sizes and hashes of messages, not their bytes (benchmarks)",
    )
    parser.add_argument(
        "--record-limit",
        type=int,
        default=None,
        help="keep only the last N messages (counters stay exact)",
    )
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="another name Graph answers to (besides localhost, 127.0.0.1, ::1)",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    if args.verbose:
        globalLogBeginner.beginLoggingTo(
            [textFileLogObserver(sys.stderr)], redirectStandardIO=False
        )
    else:
        globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)
    fake = FakeGraph(
        reactor,
        latency=args.latency,
        token_lifetime=args.token_lifetime,
        mailbox_concurrency=args.mailbox_concurrency,
        throttle_retry_after=args.throttle_retry_after,
        record_content=not args.no_content,
        record_limit=args.record_limit,
        hosts=args.host,
        verbose=args.verbose,
    )
    if args.setup:
        with open(args.setup) as f:
            fake.setup(json.load(f))
    port = fake.listen(args.ca_dir, port=args.port, interface=args.interface)
    sys.stdout.write(json.dumps({"port": port.getHost().port, "url": fake.url}) + "\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
