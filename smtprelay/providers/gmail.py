"""The gmail provider: stored messages sent through the Gmail API (Google Workspace).

Owns the I/O of ``provider.type = "gmail"`` (``providers.md``, section gmail):

* **Tokens.** A service account with domain-wide delegation gets one delegated
  credential per sending mailbox (scope ``gmail.send``), kept in a small LRU; user
  OAuth has one credential (a refresh token) for a single mailbox and sends as
  ``me``.  google-auth is synchronous: refreshes run on the dedicated token
  threads (:class:`~smtprelay.providers._tokens.TokenThreads`) with a
  ``requests`` session of our own (system CAs plus ``ca_file``), one refresh at a
  time per credential, bounded by ``provider.timeout``; a token is reused until
  five minutes before it expires.  ``provider.token_uri``, when written in the
  configuration, wins over the key file's ``token_uri`` (a proxy or a test
  endpoint is a decision of whoever runs the relay); otherwise the key file's.
* **Sending.** The media upload ``POST {api}/upload/gmail/v1/users/{mailbox|me}/
  messages/send?uploadType=media`` with ``Content-Type: message/rfc822`` through
  treq's persistent pool; the raw bytes stream from the stored file (the header
  block, reconciled with the envelope by :mod:`smtprelay.reconcile`, then the
  rest as it is).  Up to 35 MiB.  Gmail's message id becomes the delivery's
  provider id.
* **Errors** are classified by :mod:`smtprelay.providers.gmail_rules`; here they
  become outcomes, the per-mailbox back-off of rate limits, and the credential
  warnings of :meth:`GmailProvider.warnings` / :meth:`credential_status`.

No token, key or secret reaches a detail, a log line or an exception text.
"""

import collections
import datetime
import json
import ssl
import threading
import time
from urllib.parse import quote

import attr
import requests
from google.auth import exceptions as google_exceptions
from google.auth.transport.requests import Request as GoogleRequest
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from smtprelay import __version__
from smtprelay.message import summarize
from smtprelay.model import Outcome
from smtprelay.providers import gmail_rules as rules
from smtprelay.providers._http import (
    describe_failure,
    handshake_failed,
    make_client,
    read_body,
    retry_after,
)
from smtprelay.providers._tokens import TokenThreads
from smtprelay.providers.base import (
    CheckResult,
    CredentialStatus,
    IProvider,
    ProviderBase,
    Step,
)
from smtprelay.reconcile import reconcile

log = Logger()

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
CACHE_SIZE = 500  # delegated credentials kept (one per sending mailbox)
REFRESH_MARGIN = 300.0  # refresh this long before a token expires
MAX_HEADER_BLOCK = 1 << 20
CHUNK = 1 << 16
MIN_UPLOAD_RATE = 200_000  # bytes/s a send is allowed on top of provider.timeout
MAX_PROBLEMS = 100


class _TokenProblem(Exception):
    """No token: carries the classified :class:`~gmail_rules.TokenFailure`."""

    def __init__(self, failure):
        super().__init__(failure.detail)
        self.failure = failure


# --- google-auth on the token threads -----------------------------------------------------


class _TrustAdapter(requests.adapters.HTTPAdapter):
    """HTTPS with the system's CAs plus ``ca_file`` (as :mod:`_http` does for treq)."""

    def __init__(self, context, **kwargs):
        self._context = context
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        kwargs["ssl_context"] = self._context
        return super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, *args, **kwargs):
        kwargs["ssl_context"] = self._context
        return super().proxy_manager_for(*args, **kwargs)


def _ssl_context(ca_file):
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(ca_file)
    return context


class _BoundedRequest(GoogleRequest):
    """google-auth's transport with one deadline for all its attempts (it retries
    429/5xx of the token endpoint by itself, sleeping between tries), noting what
    the endpoint granted (the scopes, a refresh token's lifetime; never the token)."""

    def __init__(self, session, timeout):
        super().__init__(session)
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self.granted = {}

    def __call__(self, url, method="GET", body=None, headers=None, timeout=None, **kwargs):
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


def _utcnow():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


@attr.frozen
class _Granted:
    token: str = attr.field(repr=False)
    lifetime: float
    scopes: tuple  # () when the endpoint did not say
    refresh_token_lifetime: float | None = None


class _Credential:
    """One Google credential (a mailbox's delegation, or the OAuth user) and its token."""

    def __init__(self, key, mailbox, google_credentials):
        self.key = key
        self.mailbox = mailbox
        self.google = google_credentials  # touched on token threads only
        self.lock = defer.DeferredLock()
        self.token = None
        self.refresh_at = 0.0
        self.expires_at = 0.0
        self.scopes = ()
        self.backoff_level = -1  # rate limits in a row (-1: none)
        self.backoff_until = 0.0

    def __repr__(self):
        return f"<Credential {self.key}>"

    def fresh(self, now, stale=None):
        return self.token is not None and self.token != stale and now < self.refresh_at


def _shield(d):
    """A Deferred following ``d`` whose cancellation leaves ``d`` alone (a refresh
    on a thread cannot be stopped; its lock must be held until it ends)."""
    out = defer.Deferred()

    def relay(result):
        if out.called:
            return None  # the caller went away; the result is nobody's
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)
        return None

    d.addBoth(relay)
    return out


# --- the request body -------------------------------------------------------------------


@implementer(IBodyProducer)
class _MessageProducer:
    """The upload: the reconciled header block, then the stored file from ``offset``,
    in 64 KiB writes that follow the transport's pause and resume."""

    def __init__(self, head, body, offset, length, cooperate):
        self._head = head
        self._body = body
        self._offset = offset
        self.length = length
        self._cooperate = cooperate
        self._task = None
        self.finished = False  # every byte handed to the transport

    def _chunks(self, consumer):
        consumer.write(self._head)
        yield None
        self._body.seek(self._offset)
        left = self.length - len(self._head)
        while left > 0:
            chunk = self._body.read(min(CHUNK, left))
            if not chunk:
                raise OSError("the stored message is shorter than its size")
            left -= len(chunk)
            consumer.write(chunk)
            yield None

    def startProducing(self, consumer):
        self._task = self._cooperate(self._chunks(consumer))
        d = self._task.whenDone()

        def done(_):
            self.finished = True

        def stopped(reason):
            reason.trap(task.TaskStopped)
            return defer.Deferred()  # the request was abandoned: nothing to report

        return d.addCallbacks(done, stopped)

    def pauseProducing(self):
        self._task.pause()

    def resumeProducing(self):
        self._task.resume()

    def stopProducing(self):
        try:
            self._task.stop()
        except (task.TaskFinished, AttributeError):
            pass


def read_head(body):
    """(header block, its length, the whole length) of a stored message; the block
    is None when no blank line ends it within the first MiB.  A message without a
    blank line at all is all header."""
    body.seek(0)
    buf = b""
    while True:
        chunk = body.read(CHUNK)
        if not chunk:
            return buf, len(buf), len(buf)
        start = max(0, len(buf) - 3)
        buf += chunk
        i = buf.find(b"\r\n\r\n", start)
        if i >= 0:
            end = i + 4
            body.seek(0, 2)
            return buf[:end], end, body.tell()
        if len(buf) > MAX_HEADER_BLOCK:
            body.seek(0, 2)
            return None, 0, body.tell()


# --- the provider -----------------------------------------------------------------------


@implementer(IProvider)
class GmailProvider(ProviderBase):
    type = "gmail"

    def __init__(self, config, reactor):
        p = config.provider
        self._reactor = reactor
        self._default = config.sender.default
        self.timeout = float(p.timeout)
        self._api = p.api_endpoint.rstrip("/")
        self._ca_file = p.ca_file or ""
        self._warning_days = config.monitoring.secret_warning_days
        self.service_account = bool(p.service_account_file)
        explicit = _explicit_token_uri(config)
        self._problems = collections.OrderedDict()  # key -> one line
        self._cache = collections.OrderedDict()  # key -> _Credential
        self._setup_problem = None  # a key file or ca_file that cannot be used
        self._refresh_token_expires = None  # datetime.date, user OAuth
        self._refresh_token_dead = None  # the date invalid_grant was first seen
        self._threads = TokenThreads(reactor, size=4, name="smtprelay-gmail-tokens")
        self._sessions = []
        self._local = threading.local()
        self._sessions_lock = threading.Lock()
        try:
            self._context = _ssl_context(self._ca_file)
        except (OSError, ssl.SSLError) as e:
            self._context = ssl.create_default_context()
            reason = getattr(e, "reason", None) or e.strerror or type(e).__name__
            self._setup_problem = f"provider.ca_file {self._ca_file} cannot be used: {reason}"
        self._http, self._pool = make_client(reactor, self._ca_file,
                                             max_per_host=max(8, config.delivery.concurrency * 2))
        self._cooperator = task.Cooperator(scheduler=lambda f: reactor.callLater(0, f))
        self._background = None
        if self.service_account:
            self._base = None
            self.token_uri = explicit or GOOGLE_TOKEN_URI
            try:
                self._base, key_uri = _load_service_account(p.service_account_file, explicit)
                self.token_uri = explicit or key_uri or GOOGLE_TOKEN_URI
            except Exception as e:  # a broken key file: defer mail and say why
                self._setup_problem = (f"the service account key file "
                                       f"{p.service_account_file} cannot be used: "
                                       f"{_key_error(e)}")
        else:
            self.token_uri = p.token_uri or GOOGLE_TOKEN_URI
            self._oauth = (p.client_id, p.client_secret, p.refresh_token)

    # -- credentials --------------------------------------------------------------------------

    def _key(self, mailbox):
        return mailbox.lower() if self.service_account else "me"

    def _credential(self, mailbox):
        key = self._key(mailbox)
        cred = self._cache.get(key)
        if cred is not None:
            self._cache.move_to_end(key)
            return cred
        if self.service_account:
            # without a usable key there is no credential; _token says why
            google = self._base.with_subject(mailbox) if self._base is not None else None
        else:
            # not from_authorized_user_info: it ignores token_uri
            client_id, secret, refresh = self._oauth
            google = user_credentials.Credentials(
                None, refresh_token=refresh.reveal(), client_id=client_id,
                client_secret=secret.reveal(), token_uri=self.token_uri)
        cred = self._cache[key] = _Credential(key, mailbox, google)
        self._evict()
        return cred

    def _evict(self):
        while len(self._cache) > CACHE_SIZE:
            for key, cred in self._cache.items():
                if not cred.lock.locked:
                    del self._cache[key]
                    break
            else:
                return  # every one is refreshing right now: evict later

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.mount("https://", _TrustAdapter(self._context))
            session.headers["User-Agent"] = f"smtprelay/{__version__}"
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _refresh_blocking(self, google):
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

    def _token(self, cred, stale=None):
        """The token of ``cred`` -> Deferred[str]; _TokenProblem when there is none."""
        if self._setup_problem:
            return defer.fail(_TokenProblem(rules.TokenFailure("credential", self._setup_problem)))
        if cred.fresh(self._reactor.seconds(), stale):
            return defer.succeed(cred.token)
        return _shield(cred.lock.run(self._refresh_locked, cred, stale))

    def _refresh_locked(self, cred, stale):
        if cred.fresh(self._reactor.seconds(), stale):
            return cred.token  # refreshed by the caller we waited for
        d = self._threads.run(self._refresh_blocking, cred.google)
        # google-auth is bounded by our deadline; this is the backstop if it is not
        d.addTimeout(self.timeout * 2 + 10, self._reactor)

        def got(granted):
            now = self._reactor.seconds()
            cred.token = granted.token
            cred.expires_at = now + granted.lifetime
            cred.refresh_at = now + max(granted.lifetime - REFRESH_MARGIN, granted.lifetime / 2)
            cred.scopes = granted.scopes or ((rules.GMAIL_SEND,) if self.service_account
                                             else cred.scopes)
            if granted.refresh_token_lifetime is not None:
                self._refresh_token_expires = (
                    datetime.datetime.now(datetime.timezone.utc)
                    + datetime.timedelta(seconds=granted.refresh_token_lifetime)).date()
            self._refresh_token_dead = None
            self._clear_problem(cred.key)
            return cred.token

        def failed(f):
            problem = self._classify_refresh_failure(f, cred)
            if problem.kind == "credential":
                self._set_problem(cred.key, problem.detail)
            if problem.expired and self._refresh_token_dead is None:
                # user OAuth: a revoked or expired refresh token is an expiry, too
                self._refresh_token_dead = datetime.date.today()
            raise _TokenProblem(problem)

        return d.addCallbacks(got, failed)

    def _classify_refresh_failure(self, f, cred):
        exceptions = google_exceptions
        e = f.value
        if isinstance(e, exceptions.RefreshError):
            data = e.args[1] if len(e.args) > 1 and isinstance(e.args[1], dict) else None
            if data is not None:
                return rules.classify_token_error(
                    data.get("error") if isinstance(data.get("error"), str) else None,
                    data.get("error_description") if isinstance(
                        data.get("error_description"), str) else None,
                    e.retryable, cred.mailbox, self.service_account)
            if e.retryable:
                return rules.TokenFailure("temporary", "the token endpoint is unavailable")
            # google-auth's own complaints ("No access token in response.") and bodies
            # that were not JSON (a proxy's page): the first line, scrubbed
            text = str(e.args[0]) if e.args else type(e).__name__
            return rules.TokenFailure(
                "temporary", "the token endpoint gave an unexpected answer: "
                + rules.one_line(text, 160))
        if isinstance(e, exceptions.TransportError):
            return rules.TokenFailure(
                "temporary", f"the token endpoint {self.token_uri} is unreachable: "
                + rules.describe_transport_error(e))
        if isinstance(e, defer.TimeoutError):
            return rules.TokenFailure("temporary", f"no token from {self.token_uri} within "
                                                   f"{self.timeout * 2 + 10:g}s")
        if isinstance(e, (ValueError, TypeError)) and self.service_account:
            return rules.TokenFailure("credential", "cannot sign with the service account "
                                                    f"key: {type(e).__name__}")
        log.failure("unexpected error getting a Google token for {key}", f, key=cred.key)
        return rules.TokenFailure("temporary", f"cannot get a token: {type(e).__name__}")

    def _set_problem(self, key, text):
        if self._problems.get(key) != text:
            log.warn("gmail credential problem: {problem}", problem=text)
        self._problems[key] = text
        self._problems.move_to_end(key)
        while len(self._problems) > MAX_PROBLEMS:
            self._problems.popitem(last=False)

    def _clear_problem(self, key):
        if self._problems.pop(key, None) is not None:
            log.info("gmail credential for {key} works again", key=key.split("#")[0])

    # -- sending --------------------------------------------------------------------------------

    def _url(self, mailbox, path):
        user = quote(mailbox, safe="@") if self.service_account else "me"
        return f"{self._api}{path.format(user=user)}"

    def _authenticated(self, mailbox):
        """The mailbox Gmail sends as (user OAuth: assumed to be sender.default)."""
        return mailbox if self.service_account else self._default

    @defer.inlineCallbacks
    def send(self, message):
        mailbox = message.mailbox or self._default
        try:
            head, offset, total = read_head(message.body)
        except OSError as e:
            return Outcome.temporary(f"cannot read the stored message: {e.strerror or e}")
        if head is None:
            return Outcome.permanent(
                "the header section is larger than 1 MiB or has no end: cannot reconcile "
                "its recipients with the envelope for the Gmail API")
        reconciled = reconcile(head, message.recipients)
        size = len(reconciled.block) + total - offset
        if size > rules.MAX_MESSAGE_BYTES:
            return Outcome.permanent(
                f"{size:,} bytes is too large for the Gmail API (at most "
                f"{rules.MAX_MESSAGE_BYTES:,} bytes, 35 MiB)")
        self._note_changes(message, mailbox, reconciled)
        cred = self._credential(mailbox)
        try:
            token = yield self._token(cred)
        except _TokenProblem as p:
            return self._token_outcome(p.failure)
        answer = yield self._post(message, cred, token, reconciled.block, offset, size)
        if answer.kind == "unauthorized":
            # the token was revoked or expired early: one fresh token, one more try
            try:
                token = yield self._token(cred, stale=token)
            except _TokenProblem as p:
                return self._token_outcome(p.failure)
            answer = yield self._post(message, cred, token, reconciled.block, offset, size)
            if answer.kind == "unauthorized":
                answer = attr.evolve(answer, kind="temporary",
                                     detail=answer.detail + " (again with a fresh token)")
        return self._outcome(cred, answer)

    def _note_changes(self, message, mailbox, reconciled):
        if reconciled.visible_changed:
            log.warn("{id}: the visible recipient headers changed so that Gmail delivers "
                     "only to the envelope recipients: {what}", id=message.id,
                     what=reconciled.describe())
        elif reconciled.changed:
            log.info("{id}: recipient headers reconciled with the envelope: {what}",
                     id=message.id, what=reconciled.describe())
        if not self.service_account and mailbox.lower() != self._default.lower():
            log.warn("{id}: sent as the OAuth user's mailbox ({default}), not as {mailbox}: "
                     "user OAuth sends from one mailbox only", id=message.id,
                     default=self._default, mailbox=mailbox)
        authenticated = self._authenticated(mailbox)
        senders = summarize(reconciled.block).from_addresses
        if senders and senders[0] != authenticated.lower():
            log.warn("{id}: From {sender} is not the mailbox {mailbox} the message is sent "
                     "as: Gmail keeps it only if it is a verified send-as alias of {mailbox}, "
                     "else it rewrites From to the mailbox's primary address",
                     id=message.id, sender=senders[0], mailbox=authenticated)

    def _token_outcome(self, failure):
        if failure.kind == "permanent":
            return Outcome.permanent(failure.detail)
        return Outcome.temporary(failure.detail)

    def _budget(self, size):
        return self.timeout + size / MIN_UPLOAD_RATE

    @defer.inlineCallbacks
    def _post(self, message, cred, token, head, offset, size):
        """One upload -> gmail_rules.Answer (connection failures included)."""
        url = self._url(cred.mailbox, "/upload/gmail/v1/users/{user}/messages/send")
        producer = _MessageProducer(head, message.body, offset, size, self._cooperator.cooperate)
        headers = {"Authorization": f"Bearer {token}",
                   "Content-Type": "message/rfc822",
                   "Accept": "application/json",
                   "User-Agent": f"smtprelay/{__version__}"}
        state = {"timed_out": False, "current": None}
        budget = self._budget(size)

        def expire():
            state["timed_out"] = True
            if state["current"] is not None:
                state["current"].cancel()

        timer = self._reactor.callLater(budget, expire)
        try:
            state["current"] = self._http.post(
                url, params={"uploadType": "media"}, data=producer, headers=headers,
                allow_redirects=False, unbuffered=True, reactor=self._reactor)
            response = yield state["current"]
            state["current"] = read_body(response)
            body = yield state["current"]
        except Exception:
            f = Failure()
            if not state["timed_out"] and _cancelled(f):
                # the queue gave up on this call (its cap, or shutdown): not an outcome
                raise defer.CancelledError()
            what = (f"no answer from the Gmail API within {budget:.0f}s" if state["timed_out"]
                    else describe_failure(f))
            if producer.finished and not handshake_failed(f):
                return rules.Answer("ambiguous", rules.one_line(
                    f"{what} after the whole message was sent: it may have been delivered"))
            return rules.Answer("temporary", rules.one_line(
                f"{what} (before the whole message was sent: not delivered)"))
        finally:
            if timer.active():
                timer.cancel()
        now = self._reactor.seconds()
        answer = rules.classify_send(response.code, body, now)
        if answer.kind in ("rate_limit", "temporary"):
            # Retry-After (seconds or a date) holds back the whole mailbox (rule 4)
            header_at = retry_after(response.headers, now)
            if header_at is not None:
                answer = attr.evolve(answer, retry_at=header_at)
        return attr.evolve(answer, detail=self._scrub(answer.detail, token))

    @staticmethod
    def _scrub(text, token):
        return text.replace(token, "[redacted]") if token and token in text else text

    def _outcome(self, cred, answer):
        if answer.kind == "sent":
            cred.backoff_level, cred.backoff_until = -1, 0.0
            self._clear_problem(cred.key + "#scope")
            return Outcome.sent(answer.detail, provider_id=answer.provider_id)
        if answer.kind == "ambiguous":
            return Outcome.temporary(answer.detail, ambiguous=True)
        if answer.kind == "rate_limit":
            now = self._reactor.seconds()
            until = answer.retry_at
            if until is None:
                if cred.backoff_until > now:
                    until = cred.backoff_until  # another call of this mailbox got here first
                else:
                    cred.backoff_level += 1
                    until = now + rules.backoff_delay(cred.backoff_level, answer.daily)
            cred.backoff_until = max(until, cred.backoff_until)
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until))
            return Outcome.temporary(
                f"{answer.detail}; sending as {cred.mailbox} paused until {when}",
                not_before=until, mailbox_wide=True)
        if answer.kind == "permanent":
            if answer.reason == "insufficientPermissions":
                self._set_problem(cred.key + "#scope",
                                  f"the token for {cred.mailbox} has no scope that allows "
                                  f"sending: {answer.detail}")
            return Outcome.permanent(answer.detail)
        if answer.retry_at is not None and answer.retry_at > self._reactor.seconds():
            return Outcome.temporary(answer.detail, not_before=answer.retry_at,
                                     mailbox_wide=True)
        return Outcome.temporary(answer.detail)

    # -- the connection test ------------------------------------------------------------------

    @defer.inlineCallbacks
    def check(self):
        mailbox = self._default
        cred = self._credential(mailbox)
        try:
            token = yield self._token(cred, stale=cred.token)  # a fresh one: a real test
        except _TokenProblem as p:
            return CheckResult((
                Step("token", False, f"for {mailbox} from {self.token_uri}: {p.failure.detail}"),
                Step("send permission", False, "unknown without a token"),
            ))
        minutes = max(0, int((cred.expires_at - self._reactor.seconds()) / 60))
        scopes = ", ".join(rules.short_scope(s) for s in cred.scopes) or "none named"
        how = (" (requested; Google grants a service account all of them or none)"
               if self.service_account else "")
        steps = [Step("token", True, f"for {mailbox} from {self.token_uri}, valid for "
                                     f"{minutes} min; scopes: {scopes}{how}")]
        if rules.can_send(cred.scopes):
            scope = next(s for s in cred.scopes if s in rules.SEND_SCOPES)
            steps.append(Step("send permission", True,
                              f"{rules.short_scope(scope)} allows users.messages.send"))
        else:
            steps.append(Step("send permission", False,
                              f"no scope that allows sending (needs {rules.GMAIL_SEND})"))
        steps.append((yield self._check_api(cred, token)))
        return CheckResult(tuple(steps))

    @defer.inlineCallbacks
    def _check_api(self, cred, token):
        """Reach the Gmail API without sending: getProfile answers 200, or 403 for a
        gmail.send-only token, which still proves the endpoint and the token good."""
        url = self._url(cred.mailbox, "/gmail/v1/users/{user}/profile")
        try:
            d = self._http.get(url, headers={"Authorization": f"Bearer {token}"},
                               allow_redirects=False, unbuffered=True, reactor=self._reactor)
            d.addTimeout(self.timeout, self._reactor)
            response = yield d
            body = yield read_body(response)
        except Exception:
            return Step("api", False, f"{self._api}: {describe_failure(Failure())}")
        answer = rules.classify_send(response.code, body, self._reactor.seconds())
        detail = self._scrub(answer.detail, token)
        if response.code == 200:
            return Step("api", True, f"{self._api} answers for {cred.mailbox}")
        if response.code == 403 and answer.reason == "insufficientPermissions":
            return Step("api", True, f"{self._api} accepts the token (reading the profile "
                                     "needs more than gmail.send, as expected)")
        return Step("api", False, f"{self._api}: {detail}")

    # -- what an administrator should know ----------------------------------------------------

    def warnings(self):
        out = []
        if self._setup_problem:
            out.append(self._setup_problem)
        out.extend(self._problems.values())
        expires = self._refresh_token_expires
        if expires is not None:
            days = (expires - datetime.date.today()).days
            if days <= self._warning_days:
                out.append(f"the OAuth refresh token expires on {expires.isoformat()} "
                           f"({max(days, 0)} days)")
        return out

    def credential_status(self):
        problems = ([self._setup_problem] if self._setup_problem else []) + list(
            self._problems.values())
        problem = None
        if problems:
            problem = problems[-1] + (f" (and {len(problems) - 1} more)"
                                      if len(problems) > 1 else "")
        if self.service_account:
            return CredentialStatus(None, "service account key", problem)
        if self._refresh_token_dead is not None:
            return CredentialStatus(self._refresh_token_dead, "token endpoint (invalid_grant)",
                                    problem)
        return CredentialStatus(self._refresh_token_expires,
                                "token endpoint" if self._refresh_token_expires else "",
                                problem)

    # -- life -------------------------------------------------------------------------------------

    def start(self):
        if self._setup_problem:
            log.error("gmail: {problem}", problem=self._setup_problem)
            return None
        if self._default:
            # learn early whether the default sender's credential works (logged, not fatal)
            d = self._token(self._credential(self._default))
            d.addErrback(lambda f: f.trap(_TokenProblem, defer.CancelledError) and None)
            d.addErrback(lambda f: log.failure("gmail: token prefetch failed", f))
            self._background = d
        return None

    @defer.inlineCallbacks
    def stop(self):
        if self._background is not None and not self._background.called:
            self._background.cancel()
        yield self._pool.closeCachedConnections()
        try:
            self._cooperator.stop()
        except Exception:
            pass
        yield self._threads.stop()
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()


def _cancelled(f):
    """Whether ``f`` is a cancellation (twisted.web wraps it in ResponseNeverReceived)."""
    if f.check(defer.CancelledError):
        return True
    return any(isinstance(r, Failure) and r.check(defer.CancelledError)
               for r in getattr(f.value, "reasons", None) or ())


def _explicit_token_uri(config):
    """provider.token_uri if it is written in the configuration, else None."""
    document = getattr(config, "document", None) or {}
    provider = document.get("provider") if isinstance(document, dict) else None
    if isinstance(provider, dict) and provider.get("token_uri"):
        return config.provider.token_uri
    if config.provider.token_uri and config.provider.token_uri != GOOGLE_TOKEN_URI:
        return config.provider.token_uri  # set without a document (tests, embedding)
    return None


def _load_service_account(path, token_uri):
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


def _key_error(e):
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    if isinstance(e, ValueError) and "JSON" in type(e).__name__:
        return "not JSON"
    if isinstance(e, (KeyError,)):
        return f"missing field {e}"
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    # never echo key material
    return type(e).__name__ if "PRIVATE KEY" in text else rules.one_line(text, 160)
