"""One request to Microsoft Graph, as the m365 provider makes them all.

:class:`GraphClient` owns the provider's treq connection pool (persistent,
trusting the system store plus ``ca_file``) and the per-mailbox request slots
(never more than ``min(delivery.concurrency, 4)`` requests in flight for one
mailbox, whatever calls them).  :meth:`GraphClient.request` adds the bearer
token (or none, for upload URLs), renews a refused token once, bounds the
request *and* its body by ``provider.timeout``, and turns what happened into
either an :class:`Answer` (any HTTP status) or :class:`Unanswered` (no
answer: connection, TLS, timeout), telling whether Graph may have acted on
it.  A cancellation from outside (the queue giving up, shutdown) stays a
``CancelledError``.  What an answer means is for
:mod:`~smtprelay.providers.m365.classify` to say.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import treq
from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web import client as web_client
from twisted.web.http_headers import Headers

from smtprelay.providers._http import (
    describe_failure,
    handshake_failed,
    json_error,
    make_client,
    retry_after,
)
from smtprelay.providers.m365 import classify as errors
from smtprelay.slots import MailboxSlots

if TYPE_CHECKING:
    from smtprelay.providers.m365.credentials import GraphTokens

GRAPH_MAILBOX_CONCURRENCY = 4  # Graph throttles a fifth request in flight per mailbox
MAX_RESPONSE = 1 << 20  # success bodies (a draft's resource) are a few KB


class Unanswered(Exception):
    """A request that got no HTTP answer; ``maybe_sent``: Graph may have processed it."""

    def __init__(self, detail: str, maybe_sent: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.maybe_sent = maybe_sent


class Answer:
    """An HTTP answer: status, headers, body (capped), Graph's error code and message."""

    def __init__(self, status: int, headers: Headers, body: bytes, now: float) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.now = now
        self.code: str | None
        self.message: str | None
        self.code, self.message, extra = json_error(body) if status >= 400 else (None, None, None)
        rid = headers.getRawHeaders(b"request-id")
        inner = extra.get("innerError") if isinstance(extra, dict) else None
        self.request_id: str | None
        if rid:
            self.request_id = rid[0].decode("latin-1")
        elif isinstance(inner, dict):
            self.request_id = inner.get("request-id")
        else:
            self.request_id = None

    def json(self) -> dict[str, Any]:
        try:
            document = json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return {}
        return document if isinstance(document, dict) else {}

    def retry_after(self) -> float | None:
        return retry_after(self.headers, self.now)

    def verdict(self, operation: str) -> errors.Verdict:
        """What this answer means (the token was already renewed once if it had to be)."""
        return errors.classify(self.status, self.code, self.message, self.request_id,
                               self.retry_after(), self.now, operation, refreshed=True)


class GraphClient:
    """The provider's requests to Graph: one pool, slots per mailbox, one timeout."""

    # reactor: IReactorTime and what an HTTPConnectionPool needs
    def __init__(self, reactor: Any, tokens: GraphTokens, ca_file: str = "",
                 timeout: float = 60.0, concurrency: int = 4) -> None:
        self._reactor = reactor
        self._tokens = tokens
        self.timeout = float(timeout)
        self.concurrency = max(1, min(int(concurrency), GRAPH_MAILBOX_CONCURRENCY))
        self._http, self._pool = make_client(reactor, ca_file, max_per_host=16)
        self._slots = MailboxSlots(self.concurrency)  # requests in flight per mailbox

    def close(self) -> Deferred[None]:
        return self._pool.closeCachedConnections()

    def in_flight(self, mailbox: str) -> int:
        return self._slots.in_flight(mailbox)

    # -- requests --------------------------------------------------------------------------

    @defer.inlineCallbacks
    def request(self, method: str, url: str, operation: str, mailbox: str | None = None,
                data: bytes | None = None, json_body: dict[str, Any] | None = None,
                headers: dict[str, str] | None = None, auth: bool = True,
                commit: bool = False) -> Generator[Deferred[Any], Any, Answer]:
        """-> :class:`Answer`; raises ``TokenFailed``, :class:`Unanswered` or CancelledError.

        ``mailbox``: the request counts against that mailbox's slots.
        ``auth=False`` for pre-authorized URLs (upload sessions).  ``commit``:
        the request may send a message, so a lost answer is ambiguous.
        """
        if mailbox is not None:
            yield self._slots.acquire(mailbox)
        try:
            for attempt in (1, 2):
                token = (yield self._tokens.token()) if auth else None
                answer = yield self._exchange(method, url, operation, data, json_body,
                                              headers, token, commit)
                if answer.status == 401 and auth and attempt == 1:
                    self._tokens.refused(token)
                    continue
                return answer
            raise AssertionError("unreachable: the second attempt returns")
        finally:
            if mailbox is not None:
                self._slots.release(mailbox)

    @defer.inlineCallbacks
    def _exchange(self, method: str, url: str, operation: str, data: bytes | None,
                  json_body: dict[str, Any] | None, headers: dict[str, str] | None,
                  token: str | None, commit: bool) -> Generator[Deferred[Any], Any, Answer]:
        kwargs = _request_kwargs(data, json_body, headers, token)
        timed_out: list[bool] = []
        waiting: list[Deferred[Any]] = []
        response = None

        def expire() -> None:
            timed_out.append(True)
            if response is not None:  # stalled in the body: drop the connection
                transport = getattr(getattr(response, "original", None), "_transport", None)
                if transport is not None:
                    transport.abortConnection()
            waiting[-1].cancel()

        timer = self._reactor.callLater(self.timeout, expire)
        try:
            waiting.append(self._http.request(method, url, **kwargs))
            response = yield waiting[-1]
            waiting.append(self._collect(response))
            body = yield waiting[-1]
        except Exception as e:
            raise self._unanswered(Failure(e), bool(timed_out), operation, commit) from None
        finally:
            if timer.active():
                timer.cancel()
        return Answer(response.code, response.headers, body, self._reactor.seconds())

    def _unanswered(self, failure: Failure, timed_out: bool, operation: str,
                    commit: bool) -> Exception:
        """What to raise for a request that failed: CancelledError when it was cancelled
        from outside, else :class:`Unanswered`."""
        if not timed_out and _cancelled(failure):
            return defer.CancelledError()
        what = errors.operation_text(operation)
        if timed_out:
            return Unanswered(f"{what}: no answer from Graph within {self.timeout:g}s", commit)
        return Unanswered(f"{what}: {errors.one_line(describe_failure(failure))}",
                          commit and _maybe_sent(failure))

    @staticmethod
    def _collect(response: Any) -> Deferred[bytes]:
        """The body of ``response``, capped (the request's timeout still runs)."""
        chunks: list[bytes] = []
        size = [0]

        def collect(data: bytes) -> None:
            if size[0] < MAX_RESPONSE:
                chunks.append(data[: MAX_RESPONSE - size[0]])
            size[0] += len(data)

        return treq.collect(response, collect).addCallback(lambda _: b"".join(chunks))


def _request_kwargs(data: bytes | None, json_body: dict[str, Any] | None,
                    headers: dict[str, str] | None, token: str | None) -> dict[str, Any]:
    """treq's arguments for one request: our headers, the token, the body."""
    sent_headers = {"client-request-id": str(uuid.uuid4()),
                    "return-client-request-id": "true"}
    sent_headers.update(headers or {})
    if token is not None:
        sent_headers["Authorization"] = f"Bearer {token}"
    kwargs: dict[str, Any] = {"headers": sent_headers, "allow_redirects": False,
                              "unbuffered": True}
    if json_body is not None:
        kwargs["data"] = json.dumps(json_body).encode("utf-8")
        sent_headers["Content-Type"] = "application/json"
    elif data is not None:
        kwargs["data"] = data
    return kwargs


def _cancelled(failure: Failure) -> bool:
    """Was this request cancelled from outside (not by its own timeout)?"""
    if failure.check(defer.CancelledError):
        return True
    reasons = getattr(failure.value, "reasons", None) or ()
    return any(r.check(defer.CancelledError) for r in reasons)


def _maybe_sent(failure: Failure) -> bool:
    """Could Graph have processed a request that got no answer?"""
    if failure.check(web_client.RequestTransmissionFailed, web_client.RequestNotSent,
                     net_error.ConnectError, net_error.DNSLookupError):
        return False
    # the TLS handshake failed: nothing was sent
    return not handshake_failed(failure)
