"""The Microsoft 365 credential: tokens from Entra ID, and how long the credential lives.

:class:`GraphTokens` owns the one msal ``ConfidentialClientApplication`` of a
provider (client secret, or certificate + key in the SHA-256 form msal signs
as PS256 with ``x5t#S256``).  msal is synchronous, and even its constructor
fetches the authority's OpenID configuration, so it only ever runs on the
:class:`~smtprelay.providers._tokens.TokenThreads` pool, one refresh at a
time.  The token is kept on the reactor side until five minutes before it
expires (msal's own cache refreshes at that point too), so most requests
never leave the reactor thread for it; after Graph refuses a token, the next
call removes it from msal's cache and fetches a new one.

msal speaks HTTPS through a ``requests.Session`` that trusts the system store
plus ``ca_file``, whatever ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` say, and
keeps to ``provider.timeout``.  msal's logger is silenced: answers are
classified and reported by :mod:`~smtprelay.providers.m365.classify`.

The pure helpers at the end pick the secret's expiry among the app's
``passwordCredentials`` and word the warnings an administrator sees.
"""

from __future__ import annotations

import datetime
import logging
import re
import ssl
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import attr
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from smtprelay.providers.m365 import classify

if TYPE_CHECKING:
    from smtprelay.config import M365Provider
    from smtprelay.providers._tokens import TokenThreads

KNOWN_AUTHORITY_HOSTS = frozenset({
    "login.microsoftonline.com", "login.microsoft.com", "login.windows.net",
    "login.microsoftonline.us", "login-us.microsoftonline.com", "login.chinacloudapi.cn",
    "login.partner.microsoftonline.cn", "login.microsoftonline.de",
})
EARLY_REFRESH = 300.0  # seconds before expiry a token is renewed (msal does the same)
_LOCK = "m365-token"


class TokenFailed(Exception):
    """No token: ``verdict`` (always temporary) says why."""

    def __init__(self, verdict: classify.Verdict) -> None:
        super().__init__(verdict.detail)
        self.verdict = verdict


def quiet_msal() -> None:
    """msal logs token responses on errors; the relay reports them itself."""
    logging.getLogger("msal").setLevel(logging.CRITICAL)


def _session(ca_file: str, timeout: float) -> Any:
    """A requests.Session trusting the system store plus ``ca_file``, with a timeout."""
    import requests
    from requests.adapters import HTTPAdapter

    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(ca_file)

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> Any:
            kwargs["ssl_context"] = context
            return super().init_poolmanager(*args, **kwargs)

    class Session(requests.Session):
        def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any,
                                       cert: Any) -> Any:
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            # REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE must not replace our trust
            settings["verify"] = True
            return settings

        # only the timeout's default differs: the rest of the signature is requests'
        def request(self, method: str, url: str, **kwargs: Any) -> Any:  # type: ignore[override]
            kwargs.setdefault("timeout", timeout)
            return super().request(method, url, **kwargs)

    session = Session()
    adapter = Adapter(max_retries=1)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


class GraphTokens:
    """Tokens for ``{graph_endpoint}/.default`` with the provider's credential."""

    def __init__(self, reactor: IReactorTime, provider: M365Provider,
                 threads: TokenThreads) -> None:
        self._reactor = reactor
        self._provider = provider
        self._threads = threads
        self.authority = f"{provider.authority.rstrip('/')}/{provider.tenant_id}"
        self.scope = f"{provider.graph_endpoint.rstrip('/')}/.default"
        host = (urlsplit(provider.authority).hostname or "").lower()
        self.instance_discovery = host in KNOWN_AUTHORITY_HOSTS
        self._app: Any = None  # msal.ConfidentialClientApplication, on the token thread
        self._session: Any = None  # its requests.Session
        self._token: tuple[str, float] | None = None  # (value, good until: reactor seconds)
        self._stale: str | None = None  # a token Graph refused: drop it from msal's cache
        # what is wrong with the credential (None once a token came)
        self.problem: str | None = None

    # -- on the token thread -------------------------------------------------------

    def _build(self) -> tuple[Any, Any]:
        import msal

        p = self._provider
        credential: str | dict[str, str]
        if p.client_secret is not None:
            credential = p.client_secret.reveal()
        else:
            # no thumbprint: msal signs PS256 with x5t#S256 (SHA-256), as Entra prefers
            credential = {"private_key": _read(p.certificate_key),
                          "public_certificate": _read(p.certificate)}
        session = _session(p.ca_file, p.timeout)
        kwargs: dict[str, Any] = {}
        if not self.instance_discovery:
            kwargs["instance_discovery"] = False
        try:
            app = msal.ConfidentialClientApplication(
                p.client_id, authority=self.authority, client_credential=credential,
                http_client=session, **kwargs)
        except BaseException:
            session.close()
            raise
        return app, session

    def _acquire(self, drop: bool) -> Any:
        if self._app is None:
            self._app, self._session = self._build()
        if drop:
            self._app.remove_tokens_for_client()
        return self._app.acquire_token_for_client([self.scope])

    # -- on the reactor ----------------------------------------------------------------

    def cached(self) -> str | None:
        if self._token is not None and self._reactor.seconds() < self._token[1]:
            return self._token[0]
        return None

    def token(self) -> Deferred[str]:
        """Deferred[str] of a valid access token, or failing with :class:`TokenFailed`."""
        value = self.cached()
        if value is not None and value != self._stale:
            return defer.succeed(value)
        return self._threads.lock(_LOCK).run(self._locked)

    def refused(self, value: str | None) -> None:
        """Graph answered 401 to ``value``: the next token() fetches a new one."""
        if self._token is not None and self._token[0] == value:
            self._stale = value
            self._token = None

    def _locked(self) -> Deferred[str]:
        value = self.cached()
        if value is not None:  # fetched while we waited for the lock
            return defer.succeed(value)
        drop, self._stale = self._stale is not None, None
        d = self._threads.run(self._acquire, drop)
        d.addCallbacks(self._got, self._raised)
        return d

    def _got(self, result: Any) -> str:
        if not isinstance(result, dict) or "access_token" not in result:
            verdict = classify.classify_token(result if isinstance(result, dict) else {})
            if verdict.credential_problem:
                self.problem = verdict.credential_problem
            raise TokenFailed(verdict)
        lifetime = float(result.get("expires_in") or 3600)
        margin = EARLY_REFRESH if lifetime > 2 * EARLY_REFRESH else lifetime / 2
        now = self._reactor.seconds()
        self._token = (result["access_token"], now + lifetime - margin)
        self.problem = None
        return result["access_token"]

    def _raised(self, failure: Failure) -> NoReturn:
        failure.trap(Exception)
        e = failure.value
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is None:
            m = re.search(r"HTTP Error: (\d{3})", str(e))
            status = int(m.group(1)) if m else None
        verdict = classify.classify_token_exception(type(e).__name__, str(e), status)
        raise TokenFailed(verdict)

    def close(self) -> Deferred[None]:
        """Close msal's connections (on the token thread)."""
        session, self._session, self._app = self._session, None, None
        if session is None:
            return defer.succeed(None)
        return self._threads.run(session.close)


# ---------------------------------------------------------------- expiry (pure)


@attr.frozen
class Expiry:
    date: datetime.date | None
    source: str  # "configured" | "graph" | "certificate" | ""
    kind: str  # "client secret" | "certificate"


def parse_graph_date(text: object) -> datetime.datetime | None:
    """A Graph ``endDateTime`` (``2027-06-30T10:00:00Z``, 7 fractional digits) -> datetime."""
    if not isinstance(text, str):
        return None
    m = re.match(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.\d+)?(Z|[+-]\d{2}:\d{2})?$",
                 text.strip())
    if not m:
        return None
    zone = m.group(2) or "Z"
    try:
        return datetime.datetime.fromisoformat(m.group(1) + ("+00:00" if zone == "Z" else zone))
    except ValueError:
        return None


def pick_secret_expiry(credentials: Iterable[Any] | None, secret: str | None,
                       now: datetime.datetime) -> datetime.date | None:
    """The end date of the secret the relay uses, among an app's ``passwordCredentials``.

    Graph reports each secret's first three characters as ``hint``: the ones
    whose hint matches ours are candidates; if none does (or ``hint`` is
    missing), every secret is.  Among the candidates still valid at ``now``
    (ours works, so it is one of them) the latest ``endDateTime`` wins: when an
    admin rotates a secret, the new one ends last.  None when nothing is usable.
    """
    dated = []
    for c in credentials or ():
        if not isinstance(c, dict):
            continue
        end = parse_graph_date(c.get("endDateTime"))
        if end is not None:
            dated.append((end, c.get("hint")))
    if not dated:
        return None
    prefix = (secret or "")[:3]
    matching = [d for d in dated if prefix and d[1] == prefix] or dated
    live = [d for d in matching if d[0] > now] or matching
    return max(live)[0].date()


def expiry_warnings(expiry: Expiry | None, today: datetime.date,
                    warning_days: int) -> list[str]:
    """What an administrator must be told about ``expiry`` today ([] when nothing)."""
    if expiry is None or expiry.date is None:
        return []
    days = (expiry.date - today).days
    label = f"the {expiry.kind}"
    when = expiry.date.isoformat()
    if days < 0:
        return [f"{label} expired on {when}: messages are deferred until it is renewed"]
    if days == 0:
        return [f"{label} expires today ({when})"]
    if days <= warning_days:
        unit = "day" if days == 1 else "days"
        return [f"{label} expires in {days} {unit} ({when})"]
    return []


def expired_note(expiry: Expiry | None, today: datetime.date) -> str | None:
    """The words added to every failure once the credential has expired, or None."""
    if expiry is None or expiry.date is None or expiry.date >= today:
        return None
    return f"the {expiry.kind} expired on {expiry.date.isoformat()}"
