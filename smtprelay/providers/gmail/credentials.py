"""Google credentials of the gmail provider: google-auth on the token threads.

Owns the tokens of ``provider.type = "gmail"`` (``providers.md``, section gmail):

* A service account with domain-wide delegation gets one delegated credential per
  sending mailbox (scope ``gmail.send``), kept in a small LRU; user OAuth has one
  credential (a refresh token) for a single mailbox and sends as ``me``.
* google-auth is synchronous: refreshes run on the dedicated token threads
  (:class:`~smtprelay.providers._tokens.TokenThreads`) with a ``requests`` session
  of our own (system CAs plus ``ca_file``), one refresh at a time per credential,
  bounded by ``provider.timeout``; a token is reused until five minutes before it
  expires.
* ``provider.token_uri``, when written in the configuration, wins over the key
  file's ``token_uri`` (a proxy or a test endpoint is a decision of whoever runs
  the relay); otherwise the key file's.
* What is wrong with a credential (a key file or ``ca_file`` that cannot be used,
  a refused delegation, a revoked refresh token) is kept here, one line per
  credential, for the provider's warnings and credential status.

No token, key or secret reaches a problem text, a log line or an exception text.
"""

from __future__ import annotations

import collections
import datetime
import json
import ssl
import threading
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, cast

import attr
import requests
from google.auth import exceptions as google_exceptions
from google.auth.transport.requests import Request as GoogleRequest
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtprelay import __version__
from smtprelay.providers._tokens import TokenThreads
from smtprelay.providers.gmail import classify as rules

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from smtprelay.config import Config, Secret
    from smtprelay.config import GmailProvider as GmailSettings

log = Logger()

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
CACHE_SIZE = 500  # delegated credentials kept (one per sending mailbox)
REFRESH_MARGIN = 300.0  # refresh this long before a token expires
MAX_PROBLEMS = 100


class TokenProblem(Exception):
    """No token: carries the classified :class:`~classify.TokenFailure`."""

    def __init__(self, failure: rules.TokenFailure) -> None:
        super().__init__(failure.detail)
        self.failure = failure


# --- google-auth's transport ----------------------------------------------------------------


class _TrustAdapter(requests.adapters.HTTPAdapter):
    """HTTPS with the system's CAs plus ``ca_file`` (as :mod:`_http` does for treq)."""

    def __init__(self, context: ssl.SSLContext, **kwargs: Any) -> None:
        self._context = context
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["ssl_context"] = self._context
        return super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["ssl_context"] = self._context
        return super().proxy_manager_for(*args, **kwargs)


def _ssl_context(ca_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(ca_file)
    return context


class _BoundedRequest(GoogleRequest):
    """google-auth's transport with one deadline for all its attempts (it retries
    429/5xx of the token endpoint by itself, sleeping between tries), noting what
    the endpoint granted (the scopes, a refresh token's lifetime; never the token)."""

    def __init__(self, session: requests.Session, timeout: float) -> None:
        super().__init__(session)
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self.granted: dict[str, Any] = {}

    def __call__(self, url: str, method: str = "GET", body: Any = None,
                 headers: Any = None, timeout: float | None = None, **kwargs: Any) -> Any:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise google_exceptions.TransportError(
                TimeoutError(f"timed out: no token within {self._timeout:g}s"))
        response = super().__call__(url, method=method, body=body, headers=headers,
                                    timeout=min(left, self._timeout), **kwargs)
        if response.status == 200:
            try:
                data = json.loads(response.data)
            except (ValueError, TypeError):
                data = None
            if isinstance(data, dict):
                self.granted = {k: data[k] for k in ("scope", "refresh_token_expires_in")
                                if k in data}
        return response


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


@attr.frozen
class _Granted:
    token: str = attr.field(repr=False)
    lifetime: float
    scopes: tuple[str, ...]  # () when the endpoint did not say
    refresh_token_lifetime: float | None = None


class Credential:
    """One Google credential (a mailbox's delegation, or the OAuth user) and its token,
    with the rate-limit back-off of the mailbox it sends as."""

    def __init__(self, key: str, mailbox: str, google_credentials: Any) -> None:
        self.key = key
        self.mailbox = mailbox
        self.google = google_credentials  # touched on token threads only
        self.lock = defer.DeferredLock()
        self.token: str | None = None
        self.refresh_at = 0.0
        self.expires_at = 0.0
        self.scopes: tuple[str, ...] = ()
        self.backoff_level = -1  # rate limits in a row (-1: none)
        self.backoff_until = 0.0

    def __repr__(self) -> str:
        return f"<Credential {self.key}>"

    def fresh(self, now: float, stale: str | None = None) -> bool:
        return self.token is not None and self.token != stale and now < self.refresh_at


def _shield(d: defer.Deferred[str]) -> defer.Deferred[str]:
    """A Deferred following ``d`` whose cancellation leaves ``d`` alone (a refresh
    on a thread cannot be stopped; its lock must be held until it ends)."""
    out: defer.Deferred[str] = defer.Deferred()

    def relay(result: str | Failure) -> None:
        if out.called:
            return None  # the caller went away; the result is nobody's
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)
        return None

    d.addBoth(relay)
    return out


# --- the credentials of one provider -----------------------------------------------------------


class GmailTokens:
    """The credentials of one gmail provider, their tokens and what is wrong with them."""

    def __init__(self, config: Config, reactor: IReactorTime) -> None:
        p = cast("GmailSettings", config.provider)
        self._reactor = reactor
        self.timeout = float(p.timeout)
        self.service_account = bool(p.service_account_file)
        self._problems: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._cache: collections.OrderedDict[str, Credential] = collections.OrderedDict()
        self.setup_problem: str | None = None  # a key file or ca_file that cannot be used
        self.refresh_token_expires: datetime.date | None = None  # user OAuth
        self.refresh_token_dead: datetime.date | None = None  # invalid_grant first seen
        self._threads = TokenThreads(reactor, size=4, name="smtprelay-gmail-tokens")
        self._sessions: list[requests.Session] = []
        self._local = threading.local()
        self._sessions_lock = threading.Lock()
        ca_file = p.ca_file or ""
        try:
            self._context = _ssl_context(ca_file)
        except (OSError, ssl.SSLError) as e:
            self._context = ssl.create_default_context()
            reason = getattr(e, "reason", None) or e.strerror or type(e).__name__
            self.setup_problem = f"provider.ca_file {ca_file} cannot be used: {reason}"
        explicit = _explicit_token_uri(config)
        self._base: Any = None
        self._oauth: tuple[str, Secret | None, Secret | None] | None = None
        if self.service_account:
            self.token_uri = explicit or GOOGLE_TOKEN_URI
            try:
                self._base, key_uri = _load_service_account(p.service_account_file, explicit)
                self.token_uri = explicit or key_uri or GOOGLE_TOKEN_URI
            except Exception as e:  # a broken key file: defer mail and say why
                self.setup_problem = (f"the service account key file "
                                      f"{p.service_account_file} cannot be used: "
                                      f"{_key_error(e)}")
        else:
            self.token_uri = p.token_uri or GOOGLE_TOKEN_URI
            self._oauth = (p.client_id, p.client_secret, p.refresh_token)

    # -- credentials -------------------------------------------------------------------------

    def credential(self, mailbox: str) -> Credential:
        """The credential that sends as ``mailbox`` (user OAuth: the one there is)."""
        key = mailbox.lower() if self.service_account else "me"
        cred = self._cache.get(key)
        if cred is not None:
            self._cache.move_to_end(key)
            return cred
        cred = self._cache[key] = Credential(key, mailbox, self._google_credentials(mailbox))
        self._evict()
        return cred

    def _google_credentials(self, mailbox: str) -> Any:
        if self.service_account:
            # without a usable key there is no credential; token() says why
            return self._base.with_subject(mailbox) if self._base is not None else None
        # not from_authorized_user_info: it ignores token_uri
        assert self._oauth is not None
        client_id, secret, refresh = self._oauth
        assert secret is not None and refresh is not None  # the configuration requires them
        return user_credentials.Credentials(
            None, refresh_token=refresh.reveal(), client_id=client_id,
            client_secret=secret.reveal(), token_uri=self.token_uri)

    def _evict(self) -> None:
        while len(self._cache) > CACHE_SIZE:
            for key, cred in self._cache.items():
                if not cred.lock.locked:
                    del self._cache[key]
                    break
            else:
                return  # every one is refreshing right now: evict later

    # -- tokens ------------------------------------------------------------------------------

    def token(self, cred: Credential, stale: str | None = None) -> defer.Deferred[str]:
        """The token of ``cred`` (not ``stale``) -> Deferred[str]; :class:`TokenProblem`
        when there is none."""
        if self.setup_problem:
            return defer.fail(TokenProblem(rules.TokenFailure("credential", self.setup_problem)))
        if cred.fresh(self._reactor.seconds(), stale) and cred.token is not None:
            return defer.succeed(cred.token)
        return _shield(cred.lock.run(self._refresh_locked, cred, stale))

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.mount("https://", _TrustAdapter(self._context))
            session.headers["User-Agent"] = f"smtprelay/{__version__}"
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _refresh_blocking(self, google: Any) -> _Granted:
        """On a token thread: refresh ``google`` -> _Granted.  Raises google-auth's errors."""
        request = _BoundedRequest(self._session(), self.timeout)
        google.refresh(request)
        lifetime = ((google.expiry - _utcnow()).total_seconds() if google.expiry is not None
                    else 3600.0)
        scope = request.granted.get("scope")
        scopes = tuple(scope.split()) if isinstance(scope, str) else ()
        rt = request.granted.get("refresh_token_expires_in")
        return _Granted(google.token, max(lifetime, 0.0), scopes,
                        float(rt) if isinstance(rt, (int, float)) else None)

    def _refresh_locked(self, cred: Credential, stale: str | None) -> defer.Deferred[str]:
        if cred.fresh(self._reactor.seconds(), stale) and cred.token is not None:
            return defer.succeed(cred.token)  # refreshed by the caller we waited for
        d: defer.Deferred[_Granted] = self._threads.run(self._refresh_blocking, cred.google)
        # google-auth is bounded by our deadline; this is the backstop if it is not
        d.addTimeout(self.timeout * 2 + 10, self._reactor)

        def got(granted: _Granted) -> str:
            self._granted(cred, granted)
            return granted.token

        def failed(f: Failure) -> str:
            problem = classify_refresh_failure(f, cred.mailbox, self.service_account,
                                               self.token_uri, self.timeout * 2 + 10)
            if problem is None:
                log.failure("unexpected error getting a Google token for {key}", f,
                            key=cred.key)
                problem = rules.TokenFailure(
                    "temporary", f"cannot get a token: {type(f.value).__name__}")
            if problem.kind == "credential":
                self.set_problem(cred.key, problem.detail)
            if problem.expired and self.refresh_token_dead is None:
                # user OAuth: a revoked or expired refresh token is an expiry, too
                self.refresh_token_dead = datetime.date.today()
            raise TokenProblem(problem)

        return d.addCallbacks(got, failed)

    def _granted(self, cred: Credential, granted: _Granted) -> None:
        now = self._reactor.seconds()
        cred.token = granted.token
        cred.expires_at = now + granted.lifetime
        cred.refresh_at = now + max(granted.lifetime - REFRESH_MARGIN, granted.lifetime / 2)
        cred.scopes = granted.scopes or ((rules.GMAIL_SEND,) if self.service_account
                                         else cred.scopes)
        if granted.refresh_token_lifetime is not None:
            self.refresh_token_expires = (
                datetime.datetime.now(datetime.UTC)
                + datetime.timedelta(seconds=granted.refresh_token_lifetime)).date()
        self.refresh_token_dead = None
        self.clear_problem(cred.key)

    # -- problems ----------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """What is wrong now: the set-up, then one line per credential, oldest first."""
        return ([self.setup_problem] if self.setup_problem else []) + list(
            self._problems.values())

    def set_problem(self, key: str, text: str) -> None:
        if self._problems.get(key) != text:
            log.warn("gmail credential problem: {problem}", problem=text)
        self._problems[key] = text
        self._problems.move_to_end(key)
        while len(self._problems) > MAX_PROBLEMS:
            self._problems.popitem(last=False)

    def clear_problem(self, key: str) -> None:
        if self._problems.pop(key, None) is not None:
            log.info("gmail credential for {key} works again", key=key.split("#")[0])

    # -- life --------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def stop(self) -> Generator[defer.Deferred[Any], Any, None]:
        """Stop the token threads and close their sessions -> Deferred[None]."""
        yield self._threads.stop()
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()


def classify_refresh_failure(f: Failure, mailbox: str, service_account: bool,
                             token_uri: str, waited: float) -> rules.TokenFailure | None:
    """What a failed refresh means; None for an error nobody foresaw (the caller
    logs it, and it is temporary)."""
    e = f.value
    if isinstance(e, google_exceptions.RefreshError):
        return _refresh_error(e, mailbox, service_account)
    if isinstance(e, google_exceptions.TransportError):
        return rules.TokenFailure(
            "temporary", f"the token endpoint {token_uri} is unreachable: "
            + rules.describe_transport_error(e))
    if isinstance(e, defer.TimeoutError):
        return rules.TokenFailure("temporary", f"no token from {token_uri} within {waited:g}s")
    if isinstance(e, (ValueError, TypeError)) and service_account:
        return rules.TokenFailure("credential", "cannot sign with the service account "
                                                f"key: {type(e).__name__}")
    return None


def _refresh_error(e: Any, mailbox: str, service_account: bool) -> rules.TokenFailure:
    """google-auth's RefreshError: the token endpoint's error answer, or its own words."""
    data = e.args[1] if len(e.args) > 1 and isinstance(e.args[1], dict) else None
    if data is not None:
        error, description = data.get("error"), data.get("error_description")
        return rules.classify_token_error(
            error if isinstance(error, str) else None,
            description if isinstance(description, str) else None,
            e.retryable, mailbox, service_account)
    if e.retryable:
        return rules.TokenFailure("temporary", "the token endpoint is unavailable")
    # google-auth's own complaints ("No access token in response.") and bodies
    # that were not JSON (a proxy's page): the first line, scrubbed
    text = str(e.args[0]) if e.args else type(e).__name__
    return rules.TokenFailure(
        "temporary", "the token endpoint gave an unexpected answer: "
        + rules.one_line(text, 160))


def _explicit_token_uri(config: Config) -> str | None:
    """provider.token_uri if it is written in the configuration, else None."""
    document = getattr(config, "document", None) or {}
    provider = document.get("provider") if isinstance(document, dict) else None
    token_uri = cast("GmailSettings", config.provider).token_uri
    if isinstance(provider, dict) and provider.get("token_uri"):
        return token_uri
    if token_uri and token_uri != GOOGLE_TOKEN_URI:
        return token_uri  # set without a document (tests, embedding)
    return None


def _load_service_account(path: str, token_uri: str | None) -> tuple[Any, str | None]:
    """(google credentials without a subject, the key file's token_uri)."""
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise ValueError('not a service account key (its "type" is not "service_account")')
    key_uri = info.get("token_uri") or None
    if token_uri:
        info = dict(info, token_uri=token_uri)
    elif not key_uri:
        info = dict(info, token_uri=GOOGLE_TOKEN_URI)
    creds = service_account.Credentials.from_service_account_info(info, scopes=[rules.GMAIL_SEND])
    return creds, key_uri


def _key_error(e: Exception) -> str:
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    if isinstance(e, ValueError) and "JSON" in type(e).__name__:
        return "not JSON"
    if isinstance(e, (KeyError,)):
        return f"missing field {e}"
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    # never echo key material
    return type(e).__name__ if "PRIVATE KEY" in text else rules.one_line(text, 160)
