"""The SMTP provider: relay each stored message to one upstream mail server.

This module owns the client side of SMTP towards the configured upstream
(Exchange, Postfix, a hosted SMTP service): the connection and its security
(STARTTLS required, TLS from the first byte, or plaintext), AUTH, one mail
transaction per stored message, the body on the wire, and a small pool of
authenticated connections reused across queued messages.  What the replies
*mean* is decided in :mod:`smtprelay.providers._smtp_replies` (pure).

Why not Twisted's ``ESMTPSender``: it dot-stuffs each 16 KiB chunk on its
own (a line starting with "." at a chunk boundary is not stuffed, so a stored
``.\\r\\n`` there ends DATA early and the rest is read as commands: a forged
second message), it turns CRLF into CR CR LF, ``sendmail()`` retries five
times by itself (duplicates after a dropped connection), it has no reply
timeout, and it will AUTH over a plaintext connection.  Here:

- one attempt per ``send()``: the queue owns retries;
- every reply has a deadline (``provider.timeout``), as has each step of
  the body (a server that stops reading);
- the body is streamed from storage through
  :class:`~smtprelay.smtp.data.OutboundEncoder` (canonical CRLF, dot-stuffing
  line by line, lines over 998 octets folded) by a pull producer: the
  transport asks for more only when it has room, so a message is never held
  in memory whole;
- a reply that arrives while the body is still being sent ends the
  connection at once: whatever we sent after it would be read as commands;
- ``security = "starttls"`` refuses to go on when STARTTLS is not offered;
  AUTH happens only on an encrypted connection (unless ``security = "none"``),
  and a configured username with no AUTH offered is a failure, never an
  unauthenticated send;
- nothing logs a command line: AUTH lines (base64 credentials) exist only
  on the wire.
"""

import base64
import collections
import socket

from OpenSSL import SSL
from twisted.internet import defer, endpoints, error, protocol
from twisted.internet import ssl as tls
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.mail import smtp as twisted_smtp
from twisted.protocols import basic
from zope.interface import implementer

from smtprelay.model import Outcome, Result
from smtprelay.providers import _smtp_replies as replies
from smtprelay.providers._http import SystemAndFileTrust
from smtprelay.providers.base import CheckResult, IProvider, ProviderBase, Step
from smtprelay.smtp.data import OutboundEncoder

log = Logger()

# How long an authenticated connection waits, idle, for the next queued message.
IDLE_SECONDS = 5.0
# QUIT is a courtesy: do not let a silent server hold up shutdown for long.
QUIT_SECONDS = 5.0


# ---------------------------------------------------------------------------
# what can go wrong on a connection, besides a reply


class ConnectionFailed(Exception):
    """Base of the failures a pending command sees instead of a reply."""


class ReplyTimeout(ConnectionFailed):
    def __init__(self, seconds, waiting_for):
        super().__init__(f"no reply to {waiting_for} within {seconds:g}s")
        self.seconds = seconds
        self.waiting_for = waiting_for


class BodyStalled(ConnectionFailed):
    def __init__(self, seconds):
        super().__init__(f"the server stopped reading the message for {seconds:g}s")
        self.seconds = seconds


class ConnectionClosed(ConnectionFailed):
    def __init__(self, reason, waiting_for=None, streaming=False):
        super().__init__(f"connection lost: {reason!r}")
        self.reason = reason  # the exception Twisted reported
        self.waiting_for = waiting_for
        self.streaming = streaming  # lost while the body was still being written


class ProtocolViolation(ConnectionFailed):
    """The server said something SMTP does not allow here."""


class PrematureReply(ConnectionFailed):
    """A reply arrived while the body was still being sent."""

    def __init__(self, reply):
        super().__init__(f"the server replied before the end of the message: {reply}")
        self.reply = reply


class UpstreamFailure(Exception):
    """A session could not be set up; ``stage`` is "connect", "tls" or "auth".

    ``notes`` holds what the steps before it achieved (for ``check()``).
    """

    def __init__(self, detail, stage, notes=None):
        super().__init__(detail)
        self.detail = detail
        self.stage = stage
        self.notes = dict(notes or {})


# ---------------------------------------------------------------------------
# TLS


@implementer(IOpenSSLClientConnectionCreator)
class _RecordingCreator:
    """Wraps a connection creator to keep the OpenSSL connection it made, so
    that a failed handshake can say why the chain was refused and a
    successful one which protocol it negotiated.  One per connection."""

    def __init__(self, inner):
        self._inner = inner
        self.connection = None

    def clientConnectionForTLS(self, tlsProtocol):
        self.connection = self._inner.clientConnectionForTLS(tlsProtocol)
        return self.connection

    def verify_error(self):
        """OpenSSL's reason for refusing the chain ("unable to get local issuer
        certificate"), or None.  pyOpenSSL has no public accessor for it;
        the detail is best effort, the refusal itself does not depend on it."""
        try:
            from OpenSSL._util import ffi, lib

            code = lib.SSL_get_verify_result(self.connection._ssl)
            if code:
                text = ffi.string(lib.X509_verify_cert_error_string(code))
                return text.decode("ascii", "replace")
        except Exception:
            pass
        return None

    def description(self):
        try:
            c = self.connection
            return f"{c.get_protocol_version_name()} {c.get_cipher_name()}"
        except Exception:
            return "TLS"


def _check_ca_file(ca_file):
    """None, or why ``ca_file`` cannot serve as a trust anchor (said once, at start)."""
    if not ca_file:
        return None
    try:
        SSL.Context(SSL.TLS_CLIENT_METHOD).load_verify_locations(ca_file.encode())
    except SSL.Error as e:
        reasons = replies._ssl_reasons(e)
        return f"TLS: cannot use provider.ca_file {ca_file}: {', '.join(reasons) or 'unreadable'}"
    return None


# ---------------------------------------------------------------------------
# the protocol


def _no_delay(transport):
    """Send small writes at once (TCP_NODELAY).  With Nagle's algorithm the
    end of data, written after the body, waits for the server's delayed ACK
    of the body (40 ms on Linux): per message, on every reused connection."""
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError):
        pass  # not a TCP transport (a test's loopback)


class _Pending:
    """A command (or the body) awaiting its reply."""

    __slots__ = ("deferred", "what", "streaming")

    def __init__(self, deferred, what, streaming=False):
        self.deferred = deferred
        self.what = what
        self.streaming = streaming  # the body is still being written: no reply is due


class _BodySender(basic.FileSender):
    # Larger reads than FileSender's 16 KiB: fewer writes; the encoder does not
    # care where chunks end (that is the bug it exists to avoid).

    def __init__(self, on_read_error):
        self._on_read_error = on_read_error

    def resumeProducing(self):
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

    def __init__(self, identity, reactor, reply_timeout, on_lost=None):
        twisted_smtp.SMTPClient.__init__(self, identity)
        self._reactor = reactor
        self.reply_timeout = reply_timeout
        self._on_lost = on_lost
        self._pending = collections.deque()
        self._lines = []
        self._timer = None
        self._failure = None  # why the connection ended (or is ending)
        self._closed_waiters = []
        self.open = False
        self.greeting = defer.Deferred(self._cancelled)
        self.extensions = {}
        self.tls = False
        self.server_closing = False  # a 421 was received: the server is leaving
        self.data_sent = False  # the DATA command went out in this transaction
        self.in_transaction = False  # MAIL was sent and no end of data ended it yet
        self.dot_sent = False  # the end of data went out in this transaction
        self.transactions = 0
        self.slot = None
        self.notes = {}
        self._body_sender = None

    # -- connection life --------------------------------------------------------------

    def connectionMade(self):
        self.open = True
        _no_delay(self.transport)
        self._pending.append(_Pending(self.greeting, "the greeting"))
        self._arm()

    def handshakeCompleted(self):
        self.tls = True

    def connectionLost(self, reason=error.ConnectionDone()):
        self.open = False
        self._cancel_timer()
        if self._failure is None:
            entry = self._pending[0] if self._pending else None
            self._failure = ConnectionClosed(reason.value, entry and entry.what,
                                             bool(entry and entry.streaming))
        self._fail_pending()
        if self._on_lost is not None:
            on_lost, self._on_lost = self._on_lost, None
            on_lost(self)
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(None)

    def when_closed(self):
        if not self.open:
            return defer.succeed(None)
        d = defer.Deferred()
        self._closed_waiters.append(d)
        return d

    @property
    def usable(self):
        """Idle, connected and in a known state: fit for another transaction."""
        return (self.open and self._failure is None and not self._pending
                and not self.server_closing)

    def abort(self, exc=None):
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
            self.transport.abortConnection()

    def quit(self):
        """End politely (QUIT, then close) when idle; abort otherwise."""
        if not self.open:
            return defer.succeed(None)
        if not self.usable:
            self.abort()
            return self.when_closed()
        self.reply_timeout = min(self.reply_timeout, QUIT_SECONDS)
        d = self.command(b"QUIT", "QUIT")

        def close(_):
            if self.open:
                self.transport.loseConnection()

        d.addBoth(close)
        return self.when_closed()

    def _fail_pending(self):
        pending, self._pending = self._pending, collections.deque()
        for entry in pending:
            if not entry.deferred.called:
                entry.deferred.errback(self._failure)

    def _cancelled(self, d):
        # The caller gave up (the queue's cap, or shutdown).  The exchange
        # cannot be resumed: drop this command (it fails with CancelledError)
        # and the connection.
        self._pending = collections.deque(e for e in self._pending if e.deferred is not d)
        self.abort(ConnectionFailed("the attempt was cancelled"))

    # -- timers -----------------------------------------------------------------------

    def _arm(self):
        """(Re)start the deadline while something is awaited; stop it otherwise."""
        if self._pending and self.open and self._failure is None:
            if self._timer is not None and self._timer.active():
                self._timer.reset(self.reply_timeout)
            else:
                self._timer = self._reactor.callLater(self.reply_timeout, self._timed_out)
        else:
            self._cancel_timer()

    def _cancel_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self):
        self._timer = None
        entry = self._pending[0] if self._pending else None
        if entry is not None and entry.streaming:
            self.abort(BodyStalled(self.reply_timeout))
        else:
            self.abort(ReplyTimeout(self.reply_timeout, entry.what if entry else "a command"))

    # -- replies ----------------------------------------------------------------------

    def lineReceived(self, line):
        if self._failure is not None:
            return
        try:
            code, final, text = replies.parse_reply_line(line)
        except replies.MalformedReply as e:
            self.abort(ProtocolViolation(str(e)))
            return
        self._lines.append(text)
        if len(self._lines) > self.MAX_REPLY_LINES:
            self.abort(ProtocolViolation(f"a reply of more than {self.MAX_REPLY_LINES} lines"))
            return
        if not final:
            return
        reply = replies.Reply(code, tuple(self._lines))
        self._lines = []
        if code == 421:
            self.server_closing = True
        if not self._pending:
            # Nothing was asked: a 421 before an idle connection is closed, or a
            # server out of step with us.  Either way this connection is done.
            if code != 421:
                log.warn("upstream sent an unexpected reply: {reply}", reply=str(reply))
            self.abort(ProtocolViolation(f"unexpected reply {reply}"))
            return
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

    def lineLengthExceeded(self, line):
        self.abort(ProtocolViolation(f"a reply line longer than {self.MAX_LENGTH} octets"))

    # -- commands ---------------------------------------------------------------------

    def sendLine(self, line):
        # LineReceiver would end it with our (LF) delimiter; commands end in CRLF.
        # No logging here, ever: AUTH lines carry credentials.
        self.transport.write(line + b"\r\n")

    def command(self, line, what):
        """Send one command line -> Deferred[Reply]; ``what`` names it in errors."""
        if self._failure is not None or not self.open:
            return defer.fail(self._failure or ConnectionClosed(error.ConnectionDone(), what))
        d = defer.Deferred(self._cancelled)
        self._pending.append(_Pending(d, what))
        self.sendLine(line)
        self._arm()
        return d

    def send_body(self, body):
        """Stream ``body`` (a seekable binary file) after a 354 -> Deferred[Reply]
        to the end of data."""
        if self._failure is not None or not self.open:
            return defer.fail(self._failure or ConnectionClosed(error.ConnectionDone(), "DATA"))
        entry = _Pending(defer.Deferred(self._cancelled), "the end of data", streaming=True)
        self._pending.append(entry)
        self._arm()
        encoder = OutboundEncoder()

        def transform(chunk):
            # progress: the transport took the previous chunk
            self._arm()
            return encoder.feed(chunk)

        def unreadable(e):
            reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
            self.abort(ConnectionFailed(f"cannot read the stored message: {reason}"))

        body.seek(0)
        self._body_sender = _BodySender(unreadable)
        done = self._body_sender.beginFileTransfer(body, self.transport, transform)

        def finished(_):
            self._body_sender = None
            if self._failure is not None or not self.open or entry.deferred.called:
                return
            self.transport.write(encoder.finish())
            self.dot_sent = True
            entry.streaming = False
            self._arm()

        def failed(_):
            # The transport stopped us (FileSender's only failure): the
            # connection is going, and connectionLost tells the pending reply
            # why.  Should it not, the body's deadline still runs.
            self._body_sender = None

        done.addCallbacks(finished, failed)
        return entry.deferred


class _OneShotFactory(protocol.Factory):
    """``connectProtocol``'s factory without its "Starting factory" log lines,
    one pair per upstream connection."""

    noisy = False

    def __init__(self, proto):
        self._proto = proto

    def buildProtocol(self, addr):
        return self._proto


# ---------------------------------------------------------------------------
# the connection pool


class _Slot:
    """One of the pool's ``limit`` connections (connecting, busy or idle)."""

    def __init__(self, pool):
        self._pool = pool
        self.held = True

    def release(self):
        if self.held:
            self.held = False
            self._pool._slot_freed()


class PoolClosed(Exception):
    pass


class _Pool:
    """At most ``limit`` upstream connections; idle ones kept ``idle_seconds``.

    ``take()`` gives an idle connection, or None with a slot reserved for a
    new one, or waits until one of the two is possible.
    """

    def __init__(self, reactor, limit, idle_seconds):
        self._reactor = reactor
        self.limit = max(1, limit)
        self.idle_seconds = idle_seconds
        self._count = 0  # slots held
        self._idle = []  # [(protocol, DelayedCall)], most recently used last
        self._waiters = []
        self.closing = False

    def take(self, fresh=False):
        """-> Deferred[UpstreamProtocol | _Slot]."""
        if self.closing:
            return defer.fail(PoolClosed("the provider is stopping"))
        if fresh:
            # a reused connection just failed: the other idle ones are suspect too
            self.close_idle()
        while self._idle:
            proto, timer = self._idle.pop()
            if timer.active():
                timer.cancel()
            if proto.usable:
                return defer.succeed(proto)
            proto.abort()
        if self._count < self.limit:
            self._count += 1
            return defer.succeed(_Slot(self))

        def cancel(d):
            if d in self._waiters:
                self._waiters.remove(d)

        d = defer.Deferred(cancel)
        self._waiters.append(d)
        return d

    def give_back(self, proto):
        """A connection whose transaction is over and that may be reused."""
        if self.closing or not proto.usable:
            proto.quit()
            return
        if self._waiters:
            self._waiters.pop(0).callback(proto)
            return
        if self.idle_seconds <= 0:
            proto.quit()
            return
        timer = self._reactor.callLater(self.idle_seconds, self._expire, proto)
        self._idle.append((proto, timer))

    def forget(self, proto):
        """``proto`` is closed: drop it from the idle list (its slot is released separately)."""
        for i, (p, timer) in enumerate(self._idle):
            if p is proto:
                if timer.active():
                    timer.cancel()
                del self._idle[i]
                return

    def _expire(self, proto):
        self.forget(proto)
        proto.quit()

    def _slot_freed(self):
        if self._waiters and not self.closing:
            # hand the slot straight to the first waiter
            self._waiters.pop(0).callback(_Slot(self))
        else:
            self._count -= 1

    def close_idle(self):
        idle, self._idle = self._idle, []
        closing = []
        for proto, timer in idle:
            if timer.active():
                timer.cancel()
            closing.append(proto.quit())
        return closing

    def close(self):
        self.closing = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(PoolClosed("the provider is stopping"))
        return defer.DeferredList(self.close_idle(), consumeErrors=True)

    @property
    def idle(self):
        return len(self._idle)

    @property
    def open_connections(self):
        return self._count


# ---------------------------------------------------------------------------
# the provider


def _path(address):
    """``<address>`` for MAIL FROM / RCPT TO, or ValueError when it cannot go on the wire."""
    if any(c in address for c in "\r\n\x00<>") or not address.isascii():
        raise ValueError(f"{replies.one_line(repr(address), 100)} cannot be sent over SMTP")
    return b"<" + address.encode("ascii") + b">"


@implementer(IProvider)
class SMTPProvider(ProviderBase):
    """``provider.type = "smtp"``: see the module docstring."""

    type = "smtp"

    def __init__(self, config, reactor, idle_seconds=IDLE_SECONDS):
        p = config.provider
        self.host = p.host
        self.port = p.port
        self.security = p.security
        self.username = p.username
        self._password = p.password
        self.verify_certificate = p.verify_certificate
        self.ca_file = p.ca_file
        # the queue bounds a whole call by a multiple of this
        self.timeout = p.timeout
        hostname = config.smtp.hostname or socket.getfqdn()
        self._identity = hostname.encode("ascii", "ignore") or b"localhost"
        self._reactor = reactor
        self._pool = _Pool(reactor, config.delivery.concurrency, idle_seconds)
        self._tls_problem = _check_ca_file(self.ca_file) if self.security != "none" else None
        self._tls_options = None
        self._connections = set()  # every protocol not yet closed, pooled or not

    @property
    def where(self):
        return f"{self.host}:{self.port}"

    def warnings(self):
        return [self._tls_problem] if self._tls_problem else []

    def stop(self):
        """Close idle connections politely; any other still open is aborted.
        (The queue has finished or cancelled its calls before this.)"""
        self._pool.close()
        for proto in list(self._connections):
            if not proto.usable:
                proto.abort()
        closed = [proto.when_closed() for proto in self._connections]
        d = defer.DeferredList(closed, consumeErrors=True)
        d.addTimeout(QUIT_SECONDS + 1, self._reactor)
        d.addErrback(lambda _: [proto.abort() for proto in list(self._connections)])
        return d.addCallback(lambda _: None)

    # -- TLS ----------------------------------------------------------------------------

    def _tls_creator(self):
        if self._tls_options is None:
            minimum = {"raiseMinimumTo": tls.TLSVersion.TLSv1_2}
            if self.verify_certificate:
                self._tls_options = tls.optionsForClientTLS(
                    self.host, trustRoot=SystemAndFileTrust(self.ca_file),
                    extraCertificateOptions=minimum)
            else:
                self._tls_options = tls.CertificateOptions(verify=False, **minimum)
        return _RecordingCreator(self._tls_options)

    def _tls_note(self, creator):
        checked = (f"certificate verified for {self.host}" if self.verify_certificate
                   else "certificate NOT verified (verify_certificate = false)")
        how = "STARTTLS" if self.security == "starttls" else "TLS from the first byte"
        return f"{how}, {creator.description()}, {checked}"

    # -- failures -----------------------------------------------------------------------

    def _describe(self, exc, creator=None, handshaking=False):
        """One line for a failure without a usable reply.

        ``handshaking``: a TLS handshake had begun and not finished, so a
        connection closed now was closed on the handshake (a server refusing
        our TLS versions often just drops the connection).
        """
        if isinstance(exc, ConnectionClosed):
            if replies.is_tls_failure(exc.reason):
                reason = creator.verify_error() if creator is not None else None
                return replies.describe_tls_failure(exc.reason, self.host, reason)
            text = replies.describe_connection_failure(exc.reason, self.host, self.port,
                                                       self.timeout)
            if handshaking:
                return f"TLS: handshake failed ({text})"
            if exc.streaming:
                return f"{text} while the message was being sent (not delivered)"
            if exc.waiting_for:
                text += f" (waiting for the reply to {exc.waiting_for})"
            return text
        if isinstance(exc, PrematureReply):
            return f"{exc.reply} (before the end of the message)"
        if isinstance(exc, ConnectionFailed):
            return replies.one_line(f"{self.where}: {exc}")
        return replies.describe_connection_failure(exc, self.host, self.port, self.timeout)

    # -- setting up a session -------------------------------------------------------------

    async def _open(self, slot=None):
        """Connect, greet, secure, authenticate -> a ready UpstreamProtocol.

        Raises :class:`UpstreamFailure` (its ``notes`` say what succeeded).
        The protocol owns ``slot`` once connected: it releases it when closed.
        """
        notes = {}
        creator = self._tls_creator() if self.security != "none" else None

        def on_lost(proto):
            self._connections.discard(proto)
            self._pool.forget(proto)
            if proto.slot is not None:
                proto.slot.release()

        proto = UpstreamProtocol(self._identity, self._reactor, self.timeout, on_lost=on_lost)
        proto.slot = slot
        self._connections.add(proto)
        endpoint = endpoints.HostnameEndpoint(self._reactor, self.host, self.port,
                                              timeout=self.timeout)
        if self.security == "tls":
            endpoint = endpoints.wrapClientTLS(creator, endpoint)
        try:
            connecting = endpoint.connect(_OneShotFactory(proto))
            # HostnameEndpoint's timeout is per address; this bounds DNS as well
            connecting.addTimeout(self.timeout, self._reactor)
            await connecting
        except BaseException as e:
            self._connections.discard(proto)  # never connected: connectionLost will not come
            if isinstance(e, Exception) and not isinstance(e, defer.CancelledError):
                raise UpstreamFailure(self._describe(e), "connect", notes) from None
            raise
        notes["connect"] = f"connected to {self.where}"
        stage = "tls" if self.security == "tls" else "connect"
        try:
            greeting = await proto.greeting
            if self.security == "tls":
                notes["tls"] = self._tls_note(creator)
                stage = "connect"
            if greeting.code != 220:
                raise UpstreamFailure(f"{self.where} refused the session: {greeting}",
                                      "connect", notes)
            notes["connect"] = f"{self.where}: {greeting}"
            await self._ehlo(proto, notes)
            if self.security == "starttls":
                stage = "tls"
                await self._starttls(proto, creator, notes)
                notes["tls"] = self._tls_note(creator)
            elif self.security == "none":
                notes["tls"] = 'not used (security = "none")'
            stage = "auth"
            notes["auth"] = await self._authenticate(proto, notes)
        except UpstreamFailure as e:
            e.notes.update(notes)
            proto.quit()
            raise
        except ConnectionFailed as e:
            proto.abort()
            handshaking = creator is not None and creator.connection is not None and not proto.tls
            if handshaking or replies.is_tls_failure(getattr(e, "reason", None)):
                stage = "tls"
            elif stage == "tls" and self.security == "tls":
                stage = "connect"  # the handshake was done: the greeting is what failed
            raise UpstreamFailure(self._describe(e, creator, handshaking), stage, notes) from None
        except BaseException:
            proto.abort()
            raise
        proto.notes = notes
        return proto

    async def _ehlo(self, proto, notes):
        reply = await proto.command(b"EHLO " + proto.identity, "EHLO")
        if reply.positive:
            proto.extensions = replies.parse_ehlo(reply)
            return
        if self.security == "none" and not self.username and reply.code >= 500:
            # a server from before ESMTP; nothing we need depends on extensions
            reply = await proto.command(b"HELO " + proto.identity, "HELO")
            if reply.positive:
                proto.extensions = {}
                return
        raise UpstreamFailure(f"EHLO refused by {self.where}: {reply}", "connect", notes)

    async def _starttls(self, proto, creator, notes):
        if "STARTTLS" not in proto.extensions:
            raise UpstreamFailure(
                f'{self.where} does not offer STARTTLS and security = "starttls": '
                "nothing was sent (no downgrade to plaintext)", "tls", notes)
        reply = await proto.command(b"STARTTLS", "STARTTLS")
        if reply.code != 220:
            raise UpstreamFailure(f"STARTTLS refused by {self.where}: {reply}", "tls", notes)
        try:
            proto.transport.startTLS(creator)
        except Exception as e:
            detail = replies.one_line(f"TLS: cannot start: {e}")
            raise UpstreamFailure(detail, "tls", notes) from None
        # What the server offered before TLS is forgotten (RFC 3207): ask again.
        proto.extensions = {}
        reply = await proto.command(b"EHLO " + proto.identity, "EHLO after STARTTLS")
        if not reply.positive:
            raise UpstreamFailure(f"EHLO after STARTTLS refused by {self.where}: {reply}",
                                  "tls", notes)
        proto.extensions = replies.parse_ehlo(reply)

    async def _authenticate(self, proto, notes):
        if not self.username:
            return "not used (no provider.username)"
        if self.security != "none" and not proto.tls:
            # by construction unreachable; the credentials must never go out in clear
            raise UpstreamFailure("refusing to authenticate over a plaintext connection",
                                  "auth", notes)
        mechanism = replies.choose_auth(proto.extensions)
        if mechanism is None:
            offered = " ".join(sorted(replies.auth_mechanisms(proto.extensions)))
            if offered:
                why = f"offers AUTH {offered} but neither PLAIN nor LOGIN"
            else:
                why = "offers no AUTH"
            raise UpstreamFailure(
                f"{self.where} {why}; provider.username is set, so nothing is sent "
                "unauthenticated", "auth", notes)
        user = self.username.encode("utf-8")
        password = self._password.bytes() if self._password is not None else b""
        if mechanism == "PLAIN":
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            reply = await proto.command(b"AUTH PLAIN " + token, "AUTH PLAIN")
            if reply.code == 334:
                # a server that wants the response after an empty challenge
                reply = await proto.command(token, "AUTH PLAIN")
        else:
            reply = await proto.command(b"AUTH LOGIN", "AUTH LOGIN")
            for answer in (user, password):
                if reply.code != 334:
                    break
                reply = await proto.command(base64.b64encode(answer), "AUTH LOGIN")
            if reply.code == 334:
                # a third challenge is not LOGIN as we know it: cancel (RFC 4954)
                reply = await proto.command(b"*", "AUTH LOGIN")
        if reply.code != 235:
            raise UpstreamFailure(f"authentication as {self.username} failed: {reply}",
                                  "auth", notes)
        return f"AUTH {mechanism} as {self.username}: {reply}"

    # -- sending ------------------------------------------------------------------------

    def send(self, message):
        return defer.Deferred.fromCoroutine(self._send(message))

    async def _send(self, message):
        if self._tls_problem:
            return Outcome.temporary(self._tls_problem)
        for attempt in (1, 2):
            try:
                proto = await self._acquire(fresh=attempt > 1)
            except UpstreamFailure as e:
                return Outcome.temporary(e.detail)
            except PoolClosed as e:
                return Outcome.temporary(str(e))
            reused = proto.transactions > 0
            proto.data_sent = proto.dot_sent = False
            try:
                outcome, failed_before_data = await self._transaction(proto, message, reused)
            except BaseException:
                # cancelled, or a bug: the exchange is in an unknown state
                proto.abort()
                raise
            proto.transactions += 1
            if failed_before_data and reused and attempt == 1:
                # The connection had been idle: the server may have closed it
                # meanwhile.  That is not this message's attempt; try a new one.
                log.info("reused connection to {where} failed ({detail}); retrying {id} "
                         "on a new connection", where=self.where, detail=outcome.detail,
                         id=message.id)
                proto.abort()
                continue
            if proto.usable:
                self._pool.give_back(proto)
            else:
                proto.abort()
            return outcome

    async def _acquire(self, fresh):
        waiting = self._pool.take(fresh)
        waiting.addTimeout(self.timeout, self._reactor)
        try:
            got = await waiting
        except defer.TimeoutError:
            raise UpstreamFailure(
                f"all {self._pool.limit} connections to {self.where} stayed busy for "
                f"{self.timeout:g}s (delivery.concurrency)", "connect") from None
        if isinstance(got, UpstreamProtocol):
            return got
        try:
            return await self._open(slot=got)
        except BaseException:
            # if a connection was made its protocol released the slot already
            got.release()
            raise

    @staticmethod
    def _check_rset(proto, reply):
        if not reply.positive:
            proto.abort(ProtocolViolation(f"RSET refused: {reply}"))
            raise proto._failure

    async def _transaction(self, proto, message, reused):
        """One mail transaction -> (Outcome, failed_before_data).

        ``failed_before_data`` is True when the connection failed (not a
        reply) before the DATA command went out: nothing can have been
        delivered, and a reused connection may simply have gone stale.
        """
        results = {}
        recipients = list(dict.fromkeys(message.recipients))

        def finish(ambiguous=False, provider_id=None):
            merged = {r: results[r] for r in recipients}
            result, detail = replies.combine(merged)
            return Outcome(result, detail, recipients=merged, ambiguous=ambiguous and
                           result is not Result.SENT, provider_id=provider_id)

        try:
            sender = _path(message.sender)
        except ValueError as e:
            for r in recipients:
                results[r] = (Result.PERMANENT, f"envelope sender {e}")
            return finish(), False
        paths = []
        for r in recipients:
            try:
                paths.append((r, _path(r)))
            except ValueError as e:
                results[r] = (Result.PERMANENT, f"recipient {e}")
        if not paths:
            return finish(), False
        extensions = proto.extensions
        limit = replies.size_limit(extensions)
        if limit is not None and message.size > limit:
            detail = (f"message of {message.size} bytes exceeds the {limit} bytes {self.where} "
                      "accepts (its SIZE)")
            for r, _ in paths:
                results[r] = (Result.PERMANENT, detail)
            return finish(), False

        accepted = []
        try:
            mail = b"MAIL FROM:" + sender
            if "SIZE" in extensions:
                mail += b" SIZE=%d" % message.size
            if "8BITMIME" in extensions:
                # stored messages may hold 8-bit text; declare it where we can
                mail += b" BODY=8BITMIME"
            # A transaction that ended with the reply to its end of data leaves
            # the session clean (RFC 5321 4.1.1.4): the next MAIL needs no RSET.
            # One that stopped earlier (every recipient refused) is reset first.
            reset = reused and proto.in_transaction
            if "PIPELINING" in extensions:
                # RFC 2920: RSET, MAIL and every RCPT in one go, the replies in order
                sent = [proto.command(b"RSET", "RSET")] if reset else []
                sent.append(proto.command(mail, "MAIL FROM"))
                proto.in_transaction = True
                sent += [proto.command(b"RCPT TO:" + p, "RCPT TO") for _, p in paths]
                answers = await defer.DeferredList(sent, consumeErrors=True)
                for ok, value in answers:
                    if not ok:
                        value.raiseException()
                if reset:
                    self._check_rset(proto, answers.pop(0)[1])
                mail_reply = answers[0][1]
                rcpt_replies = [value for _, value in answers[1:]]
            else:
                if reset:
                    self._check_rset(proto, await proto.command(b"RSET", "RSET"))
                mail_reply = await proto.command(mail, "MAIL FROM")
                proto.in_transaction = True
                rcpt_replies = []
                if mail_reply.positive:
                    for _, p in paths:
                        rcpt_replies.append(await proto.command(b"RCPT TO:" + p, "RCPT TO"))
            if reused and mail_reply.code == 421:
                # the server was closing the idle connection as we spoke: a stale
                # connection, not an answer about this message
                proto.abort(ConnectionFailed(f"{self.where} is closing the connection: "
                                             f"{mail_reply}"))
                raise proto._failure
            if not mail_reply.positive:
                result = replies.classify(mail_reply, "mail")
                if result is Result.SENT:  # 2xx other than what MAIL should get
                    result = Result.TEMPORARY
                detail = f"sender <{message.sender}> refused: {mail_reply}"
                for r, _ in paths:
                    results[r] = (result, detail)
                return finish(), False
            for (r, _), reply in zip(paths, rcpt_replies):
                if reply.positive:
                    accepted.append(r)
                else:
                    results[r] = (replies.classify(reply, "rcpt"), str(reply))
            if not accepted:
                # nothing to send; the next reuse starts with RSET
                return finish(), False
            proto.data_sent = True
            reply = await proto.command(b"DATA", "DATA")
            if reply.code != 354:
                result = replies.classify(reply, "data") if reply.code >= 400 else Result.TEMPORARY
                for r in accepted:
                    results[r] = (result, f"DATA refused: {reply}")
                return finish(), False
            reply = await proto.send_body(message.body)
        except defer.CancelledError:
            raise
        except ConnectionFailed as e:
            proto.abort(e)
            if isinstance(e, PrematureReply):
                result = replies.classify(e.reply, "dot")
                if result is Result.SENT:
                    result = Result.TEMPORARY
                for r in accepted:
                    results[r] = (result, self._describe(e))
                return finish(), False
            detail = self._describe(e)
            ambiguous = proto.dot_sent
            if ambiguous:
                detail += ("; the message may have been delivered (it will be sent again: "
                           "at-least-once)")
            for r, _ in paths:
                if r not in results or r in accepted:
                    results[r] = (Result.TEMPORARY, detail)
            return finish(ambiguous=ambiguous), not proto.data_sent
        proto.in_transaction = False  # the reply to the end of data ends it
        if reply.positive:
            for r in accepted:
                results[r] = (Result.SENT, str(reply))
            return finish(provider_id=replies.queue_id(reply)), False
        result = replies.classify(reply, "dot")
        for r in accepted:
            results[r] = (result, str(reply))
        return finish(), False

    # -- the connection test ----------------------------------------------------------------

    def check(self):
        return defer.Deferred.fromCoroutine(self._check())

    async def _check(self):
        if self._tls_problem:
            return CheckResult((Step("connect", False, "not attempted"),
                                Step("tls", False, self._tls_problem),
                                Step("auth", False, "not attempted")))
        try:
            proto = await self._open()
        except UpstreamFailure as e:
            steps = []
            for name in ("connect", "tls", "auth"):
                if name == e.stage:
                    steps.append(Step(name, False, e.detail))
                elif name in e.notes:
                    steps.append(Step(name, True, e.notes[name]))
                else:
                    steps.append(Step(name, False, f"not attempted ({e.stage} failed)"))
            return CheckResult(tuple(steps))
        steps = tuple(Step(name, True, proto.notes.get(name, ""))
                      for name in ("connect", "tls", "auth"))
        await proto.quit()
        return CheckResult(steps)
