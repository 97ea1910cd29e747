"""The Gmail API over HTTP: the upload of a stored message, and the profile probe.

Owns the requests of ``provider.type = "gmail"`` (``providers.md``, section gmail):
the media upload ``POST {api}/upload/gmail/v1/users/{mailbox|me}/messages/send?
uploadType=media`` with ``Content-Type: message/rfc822`` through treq's persistent
pool (:func:`~smtprelay.providers._http.make_client`), its raw bytes streamed from
the stored file by :class:`MessageProducer` (the header block, reconciled with the
envelope by the provider, then the rest as it is), with one time budget for the
whole call; and ``GET .../profile`` for the connection test.  An upload's answer is
classified by :mod:`smtprelay.providers.gmail.classify`, connection failures
included (ambiguous when the whole message went out and no answer came back).

The bearer token never reaches a detail: it is scrubbed from every answer.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote

import attr
from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from smtprelay import __version__
from smtprelay.providers._http import (
    describe_failure,
    handshake_failed,
    make_client,
    read_body,
    retry_after,
)
from smtprelay.providers.gmail import classify as rules
from smtprelay.scrub import redact

if TYPE_CHECKING:
    from twisted.internet.interfaces import IConsumer

MAX_HEADER_BLOCK = 1 << 20
CHUNK = 1 << 16
MIN_UPLOAD_RATE = 200_000  # bytes/s a send is allowed on top of provider.timeout


@implementer(IBodyProducer)
class MessageProducer:
    """The upload: the reconciled header block, then the stored file from ``offset``,
    in 64 KiB writes that follow the transport's pause and resume."""

    def __init__(self, head: bytes, body: IO[bytes], offset: int, length: int,
                 cooperate: Callable[[Iterator[None]], task.CooperativeTask]) -> None:
        self._head = head
        self._body = body
        self._offset = offset
        self.length = length
        self._cooperate = cooperate
        self._task: task.CooperativeTask | None = None
        self.finished = False  # every byte handed to the transport

    def _chunks(self, consumer: IConsumer) -> Iterator[None]:
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

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        self._task = self._cooperate(self._chunks(consumer))
        d = self._task.whenDone()

        def done(_: object) -> None:
            self.finished = True

        def stopped(reason: Failure) -> defer.Deferred[None]:
            reason.trap(task.TaskStopped)
            return defer.Deferred()  # the request was abandoned: nothing to report

        return d.addCallbacks(done, stopped)

    def pauseProducing(self) -> None:
        assert self._task is not None
        self._task.pause()

    def resumeProducing(self) -> None:
        assert self._task is not None
        self._task.resume()

    def stopProducing(self) -> None:
        try:
            self._task.stop()  # type: ignore[union-attr]
        except (task.TaskFinished, AttributeError):
            pass


def read_head(body: IO[bytes]) -> tuple[bytes | None, int, int]:
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


class GmailRequests:
    """The Gmail API of one provider: its endpoint, HTTP client and connection pool."""

    # the reactor: treq's (TCP, time, name resolution), which no single interface names
    def __init__(self, reactor: Any, api_endpoint: str, ca_file: str, timeout: float,
                 service_account: bool, max_per_host: int) -> None:
        self._reactor = reactor
        self.api = api_endpoint.rstrip("/")
        self.timeout = timeout
        self._service_account = service_account
        self._http, self.pool = make_client(reactor, ca_file, max_per_host=max_per_host)
        self._cooperator = task.Cooperator(scheduler=lambda f: reactor.callLater(0, f))

    def url(self, mailbox: str, path: str) -> str:
        """``path`` under the API, for ``mailbox`` (user OAuth: ``me``)."""
        user = quote(mailbox, safe="@") if self._service_account else "me"
        return f"{self.api}{path.format(user=user)}"

    def budget(self, size: int) -> float:
        """The time an upload of ``size`` bytes may take, answer included."""
        return self.timeout + size / MIN_UPLOAD_RATE

    @defer.inlineCallbacks
    def upload(self, mailbox: str, token: str, head: bytes, body: IO[bytes], offset: int,
               size: int) -> Generator[defer.Deferred[Any], Any, rules.Answer]:
        """One ``messages.send`` as ``mailbox`` -> Deferred[classify.Answer] (connection
        failures included); CancelledError when the caller gave up on it."""
        url = self.url(mailbox, "/upload/gmail/v1/users/{user}/messages/send")
        producer = MessageProducer(head, body, offset, size, self._cooperator.cooperate)
        headers: dict[bytes | str, bytes | str] = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "message/rfc822",
            "Accept": "application/json",
            "User-Agent": f"smtprelay/{__version__}"}
        state: dict[str, Any] = {"timed_out": False, "current": None}
        budget = self.budget(size)

        def expire() -> None:
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
            answer_body = yield state["current"]
        except Exception:
            return _unanswered(Failure(), state["timed_out"], budget, producer.finished)
        finally:
            if timer.active():
                timer.cancel()
        now = self._reactor.seconds()
        answer = rules.classify_send(response.code, answer_body, now)
        if answer.kind in ("rate_limit", "temporary"):
            # Retry-After (seconds or a date) holds back the whole mailbox (rule 4)
            header_at = retry_after(response.headers, now)
            if header_at is not None:
                answer = attr.evolve(answer, retry_at=header_at)
        return attr.evolve(answer, detail=without_token(answer.detail, token))

    @defer.inlineCallbacks
    def profile(self, mailbox: str, token: str) -> Generator[defer.Deferred[Any], Any,
                                                             tuple[int, bytes]]:
        """``GET .../profile`` as ``mailbox`` -> Deferred[(status, body)]; a connection
        failure or no answer within ``timeout`` is raised."""
        url = self.url(mailbox, "/gmail/v1/users/{user}/profile")
        headers: dict[bytes | str, bytes | str] = {"Authorization": f"Bearer {token}"}
        d = self._http.get(url, headers=headers, allow_redirects=False, unbuffered=True,
                           reactor=self._reactor)
        d.addTimeout(self.timeout, self._reactor)
        response = yield d
        body = yield read_body(response)
        return response.code, body

    @defer.inlineCallbacks
    def stop(self) -> Generator[defer.Deferred[Any], Any, None]:
        """Close the pooled connections and stop the upload cooperator."""
        yield self.pool.closeCachedConnections()
        try:
            self._cooperator.stop()
        except Exception:
            pass


def without_token(text: str, token: str | None) -> str:
    """``text`` without the bearer ``token`` (a server may quote the request back)."""
    return redact(text, (token,))


def _unanswered(f: Failure, timed_out: bool, budget: float, finished: bool) -> rules.Answer:
    """The answer of an upload that got none: ambiguous once the whole message went out."""
    if not timed_out and _cancelled(f):
        # the queue gave up on this call (its cap, or shutdown): not an outcome
        raise defer.CancelledError()
    what = (f"no answer from the Gmail API within {budget:.0f}s" if timed_out
            else describe_failure(f))
    if finished and not handshake_failed(f):
        return rules.Answer("ambiguous", rules.one_line(
            f"{what} after the whole message was sent: it may have been delivered"))
    return rules.Answer("temporary", rules.one_line(
        f"{what} (before the whole message was sent: not delivered)"))


def _cancelled(f: Failure) -> bool:
    """Whether ``f`` is a cancellation (twisted.web wraps it in ResponseNeverReceived)."""
    if f.check(defer.CancelledError):
        return True
    return any(isinstance(r, Failure) and r.check(defer.CancelledError)
               for r in getattr(f.value, "reasons", None) or ())
