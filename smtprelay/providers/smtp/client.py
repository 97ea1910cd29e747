"""One connection to the upstream SMTP server: commands in, replies out, as Deferreds.

This module owns the client protocol on the wire: reply lines read and
checked, a deadline on every reply (and on each step of the body, for a server
that stops reading), pipelined commands answered in order, the body streamed
through :class:`~smtprelay.dotstuff.OutboundEncoder` by a pull producer (the
transport asks for more only when it has room, so a message is never held in
memory whole), and the connection ended at once when the server says something
out of turn.  Nothing here logs a command line: AUTH lines (base64
credentials) exist only on the wire.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, cast

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IHandshakeListener, ITransport
from twisted.logger import Logger
from twisted.mail import smtp as twisted_smtp
from twisted.protocols import basic
from twisted.python.failure import Failure
from zope.interface import implementer

from smtprelay.dotstuff import OutboundEncoder
from smtprelay.providers.smtp import replies
from smtprelay.providers.smtp.errors import (
    BodyStalled,
    ConnectionClosed,
    ConnectionFailed,
    PrematureReply,
    ProtocolViolation,
    ReplyTimeout,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from smtprelay.providers.smtp.pool import Slot

# The namespace of the module this came from: log observers keep their filters.
log = Logger(namespace="smtprelay.providers.smtp")

# QUIT is a courtesy: do not let a silent server hold up shutdown for long.
QUIT_SECONDS = 5.0


def _no_delay(transport: ITransport | None) -> None:
    """Send small writes at once (TCP_NODELAY).  With Nagle's algorithm the
    end of data, written after the body, waits for the server's delayed ACK
    of the body (40 ms on Linux): per message, on every reused connection."""
    try:
        transport.setTcpNoDelay(True)  # type: ignore[union-attr]
    except (AttributeError, OSError):
        pass  # not a TCP transport (a test's loopback)


class _Pending:
    """A command (or the body) awaiting its reply."""

    __slots__ = ("deferred", "streaming", "what")

    def __init__(self, deferred: defer.Deferred[replies.Reply], what: str,
                 streaming: bool = False) -> None:
        self.deferred = deferred
        self.what = what
        self.streaming = streaming  # the body is still being written: no reply is due


class _BodySender(basic.FileSender):
    # Larger reads than FileSender's 16 KiB: fewer writes; the encoder does not
    # care where chunks end (that is the bug it exists to avoid).

    def __init__(self, on_read_error: Callable[[Exception], None]) -> None:
        self._on_read_error = on_read_error

    def resumeProducing(self) -> None:
        # FileSender lets a read error escape into the transport, which would
        # report it as a network failure
        try:
            super().resumeProducing()
        except Exception as e:
            self._on_read_error(e)


@implementer(IHandshakeListener)
class UpstreamProtocol(twisted_smtp.SMTPClient):
    """One connection to the upstream: commands in, replies out, as Deferreds.

    Built on ``SMTPClient`` for its line handling, but with its own state
    handling: ``command()`` returns a Deferred of the :class:`Reply`
    (pipelined commands queue in order), ``send_body()`` streams a message
    and returns the Deferred of the reply to its end of data.  A pending
    command fails with a :class:`ConnectionFailed` when the connection ends,
    when the server falls silent for ``reply_timeout`` seconds, or when it
    says something out of turn.
    """

    # SMTPClient's LineLog would keep every command, AUTH lines included.
    debug = False
    # Replies end in CRLF; a bare LF is tolerated (as Postfix's client does).
    delimiter = b"\n"
    MAX_LENGTH = 8192
    MAX_REPLY_LINES = 200

    def __init__(self, identity: bytes, reactor: IReactorTime, reply_timeout: float,
                 on_lost: Callable[[UpstreamProtocol], None] | None = None) -> None:
        twisted_smtp.SMTPClient.__init__(self, identity)
        self._reactor = reactor
        self.reply_timeout = reply_timeout
        self._on_lost = on_lost
        self._pending: collections.deque[_Pending] = collections.deque()
        self._lines: list[str] = []
        self._timer: IDelayedCall | None = None
        self._failure: ConnectionFailed | None = None  # why the connection ended (or is ending)
        self._closed_waiters: list[defer.Deferred[None]] = []
        self.open = False
        self.greeting: defer.Deferred[replies.Reply] = defer.Deferred(self._cancelled)
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.server_closing = False  # a 421 was received: the server is leaving
        self.data_sent = False  # the DATA command went out in this transaction
        self.in_transaction = False  # MAIL was sent and no end of data ended it yet
        self.dot_sent = False  # the end of data went out in this transaction
        self.transactions = 0
        self.slot: Slot | None = None
        self.notes: dict[str, str] = {}
        self._body_sender: _BodySender | None = None

    # -- connection life --------------------------------------------------------------

    def connectionMade(self) -> None:
        self.open = True
        _no_delay(self.transport)
        self._pending.append(_Pending(self.greeting, "the greeting"))
        self._arm()

    def handshakeCompleted(self) -> None:
        self.tls = True

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.open = False
        self._cancel_timer()
        if self._failure is None:
            entry = self._pending[0] if self._pending else None
            # a Failure always holds its exception
            self._failure = ConnectionClosed(cast(BaseException, reason.value),
                                             entry.what if entry else None,
                                             bool(entry and entry.streaming))
        self._fail_pending()
        if self._on_lost is not None:
            on_lost, self._on_lost = self._on_lost, None
            on_lost(self)
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(None)

    def when_closed(self) -> defer.Deferred[None]:
        if not self.open:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._closed_waiters.append(d)
        return d

    @property
    def usable(self) -> bool:
        """Idle, connected and in a known state: fit for another transaction."""
        return (self.open and self._failure is None and not self._pending
                and not self.server_closing)

    @property
    def failure(self) -> ConnectionFailed | None:
        """Why the connection ended (or is ending); None while it is sound."""
        return self._failure

    def abort(self, exc: ConnectionFailed | None = None) -> None:
        """End the connection now; pending commands fail with ``exc``."""
        if self._failure is None:
            self._failure = exc or ConnectionFailed("the connection was closed by the relay")
        self._cancel_timer()
        self._fail_pending()
        sender, self._body_sender = self._body_sender, None
        if sender is not None and sender.deferred is not None:
            # not one more octet of the body: it could be read as commands
            sender.file = None
            sender.stopProducing()
        if self.open and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def quit(self) -> defer.Deferred[None]:
        """End politely (QUIT, then close) when idle; abort otherwise."""
        if not self.open:
            return defer.succeed(None)
        if not self.usable:
            self.abort()
            return self.when_closed()
        self.reply_timeout = min(self.reply_timeout, QUIT_SECONDS)
        d = self.command(b"QUIT", "QUIT")

        def close(_: object) -> None:
            if self.open:
                self.transport.loseConnection()  # type: ignore[union-attr]

        d.addBoth(close)
        return self.when_closed()

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, collections.deque()
        for entry in pending:
            if not entry.deferred.called:
                entry.deferred.errback(self._failure)

    def _cancelled(self, d: defer.Deferred[Any]) -> None:
        # The caller gave up (the queue's cap, or shutdown).  The exchange
        # cannot be resumed: drop this command (it fails with CancelledError)
        # and the connection.
        self._pending = collections.deque(e for e in self._pending if e.deferred is not d)
        self.abort(ConnectionFailed("the attempt was cancelled"))

    # -- timers -----------------------------------------------------------------------

    def _arm(self) -> None:
        """(Re)start the deadline while something is awaited; stop it otherwise."""
        if self._pending and self.open and self._failure is None:
            if self._timer is not None and self._timer.active():
                self._timer.reset(self.reply_timeout)
            else:
                self._timer = self._reactor.callLater(self.reply_timeout, self._timed_out)
        else:
            self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        entry = self._pending[0] if self._pending else None
        if entry is not None and entry.streaming:
            self.abort(BodyStalled(self.reply_timeout))
        else:
            self.abort(ReplyTimeout(self.reply_timeout, entry.what if entry else "a command"))

    # -- replies ----------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self._failure is not None:
            return
        reply = self._collect(line)
        if reply is None:
            return
        if reply.code == 421:
            self.server_closing = True
        if not self._pending:
            # Nothing was asked: a 421 before an idle connection is closed, or a
            # server out of step with us.  Either way this connection is done.
            if reply.code != 421:
                log.warn("upstream sent an unexpected reply: {reply}", reply=str(reply))
            self.abort(ProtocolViolation(f"unexpected reply {reply}"))
            return
        self._answer(reply)

    def _collect(self, line: bytes) -> replies.Reply | None:
        """The reply ``line`` completes, or None (more lines follow, or it was refused)."""
        try:
            code, final, text = replies.parse_reply_line(line)
        except replies.MalformedReply as e:
            self.abort(ProtocolViolation(str(e)))
            return None
        self._lines.append(text)
        if len(self._lines) > self.MAX_REPLY_LINES:
            self.abort(ProtocolViolation(f"a reply of more than {self.MAX_REPLY_LINES} lines"))
            return None
        if not final:
            return None
        reply = replies.Reply(code, tuple(self._lines))
        self._lines = []
        return reply

    def _answer(self, reply: replies.Reply) -> None:
        """Hand ``reply`` to the oldest pending command, if it may have it."""
        entry = self._pending[0]
        if entry.streaming:
            # The server ended DATA before we did: what we still send would be
            # read as commands.  Stop now.
            self.abort(PrematureReply(reply))
            return
        if entry.what == "STARTTLS" and self._buffer:
            # Bytes after the 220 arrived in plaintext but would be read as the
            # server's first words under TLS: a reply injection (CVE-2011-0411
            # class).  Nothing sent in clear may count once TLS is up.
            self.abort(ProtocolViolation("the server sent more after its STARTTLS reply "
                                         "(plaintext injected into the TLS session?)"))
            return
        self._pending.popleft()
        self._arm()
        entry.deferred.callback(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.abort(ProtocolViolation(f"a reply line longer than {self.MAX_LENGTH} octets"))

    # -- commands ---------------------------------------------------------------------

    def sendLine(self, line: bytes) -> None:
        # LineReceiver would end it with our (LF) delimiter; commands end in CRLF.
        # No logging here, ever: AUTH lines carry credentials.
        self.transport.write(line + b"\r\n")  # type: ignore[union-attr]

    def command(self, line: bytes, what: str) -> defer.Deferred[replies.Reply]:
        """Send one command line -> Deferred[Reply]; ``what`` names it in errors."""
        if self._failure is not None or not self.open:
            return defer.fail(self._failure or ConnectionClosed(error.ConnectionDone(), what))
        d: defer.Deferred[replies.Reply] = defer.Deferred(self._cancelled)
        self._pending.append(_Pending(d, what))
        self.sendLine(line)
        self._arm()
        return d

    def send_body(self, body: IO[bytes]) -> defer.Deferred[replies.Reply]:
        """Stream ``body`` (a seekable binary file) after a 354 -> Deferred[Reply]
        to the end of data."""
        if self._failure is not None or not self.open:
            return defer.fail(self._failure or ConnectionClosed(error.ConnectionDone(), "DATA"))
        entry = _Pending(defer.Deferred(self._cancelled), "the end of data", streaming=True)
        self._pending.append(entry)
        self._arm()
        encoder = OutboundEncoder()

        def transform(chunk: bytes) -> bytes:
            # progress: the transport took the previous chunk
            self._arm()
            return encoder.feed(chunk)

        def unreadable(e: Exception) -> None:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
            self.abort(ConnectionFailed(f"cannot read the stored message: {reason}"))

        body.seek(0)
        self._body_sender = _BodySender(unreadable)
        done = self._body_sender.beginFileTransfer(body, self.transport, transform)

        def finished(_: object) -> None:
            self._body_sender = None
            if self._failure is not None or not self.open or entry.deferred.called:
                return
            self.transport.write(encoder.finish())  # type: ignore[union-attr]
            self.dot_sent = True
            entry.streaming = False
            self._arm()

        def failed(_: Failure) -> None:
            # The transport stopped us (FileSender's only failure): the
            # connection is going, and connectionLost tells the pending reply
            # why.  Should it not, the body's deadline still runs.
            self._body_sender = None

        done.addCallbacks(finished, failed)
        return entry.deferred


class OneShotFactory(protocol.Factory):
    """``connectProtocol``'s factory without its "Starting factory" log lines,
    one pair per upstream connection."""

    noisy = False

    def __init__(self, proto: UpstreamProtocol) -> None:
        self._proto = proto

    def buildProtocol(self, addr: object) -> UpstreamProtocol:
        return self._proto
