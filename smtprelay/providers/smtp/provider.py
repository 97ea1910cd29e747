"""The SMTP provider: relay each stored message to one upstream mail server.

This module owns ``SMTPProvider`` (``provider.type = "smtp"``): setting up a
session with the configured upstream (Exchange, Postfix, a hosted SMTP
service), i.e. connect, greet, secure (STARTTLS required, TLS from the first
byte, or plaintext) and AUTH; taking connections from the pool and giving
them back; the outcome of each ``send()``; and ``check()``.  The wire is
:mod:`.client`, the reuse of connections :mod:`.pool`, the mail transaction
:mod:`.transaction`, TLS options :mod:`.tls`, and what the replies *mean*
:mod:`.replies` (pure).

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
  :class:`~smtprelay.dotstuff.OutboundEncoder` (canonical CRLF, dot-stuffing
  line by line, lines over 998 octets folded);
- a reply that arrives while the body is still being sent ends the
  connection at once: whatever we sent after it would be read as commands;
- ``security = "starttls"`` refuses to go on when STARTTLS is not offered;
  AUTH happens only on an encrypted connection (unless ``security = "none"``),
  and a configured username with no AUTH offered is a failure, never an
  unauthenticated send;
- nothing logs a command line: AUTH lines (base64 credentials) exist only
  on the wire.
"""

from __future__ import annotations

import base64
import socket
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, endpoints
from twisted.logger import Logger
from zope.interface import implementer

from smtprelay.model import Outcome
from smtprelay.providers.base import CheckResult, IProvider, ProviderBase, Step
from smtprelay.providers.smtp import replies, tls
from smtprelay.providers.smtp.client import QUIT_SECONDS, OneShotFactory, UpstreamProtocol
from smtprelay.providers.smtp.errors import (
    ConnectionClosed,
    ConnectionFailed,
    PrematureReply,
    UpstreamFailure,
)
from smtprelay.providers.smtp.pool import Pool, PoolClosed, Slot
from smtprelay.providers.smtp.transaction import MailTransaction

if TYPE_CHECKING:
    from twisted.internet.interfaces import IStreamClientEndpoint
    from twisted.python.failure import Failure

    from smtprelay.providers.base import OutgoingMessage

# The namespace of the module this came from: log observers keep their filters.
log = Logger(namespace="smtprelay.providers.smtp")

# How long an authenticated connection waits, idle, for the next queued message.
IDLE_SECONDS = 5.0

_STEPS = ("connect", "tls", "auth")


class _Stage:
    """Which ``check()`` step a connection failure during set-up belongs to."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


@implementer(IProvider)
class SMTPProvider(ProviderBase):
    """``provider.type = "smtp"``: see the module docstring."""

    type = "smtp"

    def __init__(self, config: Any, reactor: Any, idle_seconds: float = IDLE_SECONDS) -> None:
        p = config.provider
        self.host: str = p.host
        self.port: int = p.port
        self.security: str = p.security
        self.username: str = p.username
        self._password = p.password
        self.verify_certificate: bool = p.verify_certificate
        self.ca_file: str = p.ca_file
        # the queue bounds a whole call by a multiple of this
        self.timeout: float = p.timeout
        hostname = config.smtp.hostname or socket.getfqdn()
        self._identity = hostname.encode("ascii", "ignore") or b"localhost"
        self._reactor = reactor
        self._pool = Pool(reactor, config.delivery.concurrency, idle_seconds)
        self._tls_problem = tls.check_ca_file(self.ca_file) if self.security != "none" else None
        self._tls_options: Any = None
        # every protocol not yet closed, pooled or not
        self._connections: set[UpstreamProtocol] = set()

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def warnings(self) -> list[str]:
        return [self._tls_problem] if self._tls_problem else []

    def stop(self) -> defer.Deferred[None]:
        """Close idle connections politely; any other still open is aborted.
        (The queue has finished or cancelled its calls before this.)"""
        self._pool.close()
        for proto in list(self._connections):
            if not proto.usable:
                proto.abort()
        closed = [proto.when_closed() for proto in self._connections]
        d: defer.Deferred[Any] = defer.DeferredList(closed, consumeErrors=True)
        d.addTimeout(QUIT_SECONDS + 1, self._reactor)

        def abort_all(_: Failure) -> None:
            for proto in list(self._connections):
                proto.abort()

        d.addErrback(abort_all)
        return d.addCallback(lambda _: None)

    # -- TLS ----------------------------------------------------------------------------

    def _tls_creator(self) -> tls.RecordingCreator:
        if self._tls_options is None:
            self._tls_options = tls.client_options(self.host, self.verify_certificate,
                                                   self.ca_file)
        return tls.RecordingCreator(self._tls_options)

    def _tls_note(self, creator: tls.RecordingCreator | None) -> str:
        assert creator is not None  # only asked for when security is not "none"
        return tls.note(self.host, self.security, self.verify_certificate, creator)

    # -- failures -----------------------------------------------------------------------

    def _describe(self, exc: BaseException, creator: tls.RecordingCreator | None = None,
                  handshaking: bool = False) -> str:
        """One line for a failure without a usable reply.

        ``handshaking``: a TLS handshake had begun and not finished, so a
        connection closed now was closed on the handshake (a server refusing
        our TLS versions often just drops the connection).
        """
        if isinstance(exc, ConnectionClosed):
            return self._describe_closed(exc, creator, handshaking)
        if isinstance(exc, PrematureReply):
            return f"{exc.reply} (before the end of the message)"
        if isinstance(exc, ConnectionFailed):
            return replies.one_line(f"{self.where}: {exc}")
        return replies.describe_connection_failure(exc, self.host, self.port, self.timeout)

    def _describe_closed(self, exc: ConnectionClosed, creator: tls.RecordingCreator | None,
                         handshaking: bool) -> str:
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

    # -- setting up a session -------------------------------------------------------------

    async def _open(self, slot: Slot | None = None) -> UpstreamProtocol:
        """Connect, greet, secure, authenticate -> a ready UpstreamProtocol.

        Raises :class:`UpstreamFailure` (its ``notes`` say what succeeded).
        The protocol owns ``slot`` once connected: it releases it when closed.
        """
        notes: dict[str, str] = {}
        creator = self._tls_creator() if self.security != "none" else None
        proto = UpstreamProtocol(self._identity, self._reactor, self.timeout,
                                 on_lost=self._closed)
        proto.slot = slot
        self._connections.add(proto)
        await self._connect(proto, creator, notes)
        notes["connect"] = f"connected to {self.where}"
        await self._set_up(proto, creator, notes)
        proto.notes = notes
        return proto

    def _closed(self, proto: UpstreamProtocol) -> None:
        self._connections.discard(proto)
        self._pool.forget(proto)
        if proto.slot is not None:
            proto.slot.release()

    async def _connect(self, proto: UpstreamProtocol, creator: tls.RecordingCreator | None,
                       notes: dict[str, str]) -> None:
        endpoint: IStreamClientEndpoint = endpoints.HostnameEndpoint(
            self._reactor, self.host, self.port, timeout=self.timeout)
        if self.security == "tls":
            assert creator is not None
            endpoint = endpoints.wrapClientTLS(creator, endpoint)
        try:
            connecting = endpoint.connect(OneShotFactory(proto))
            # HostnameEndpoint's timeout is per address; this bounds DNS as well
            connecting.addTimeout(self.timeout, self._reactor)
            await connecting
        except BaseException as e:
            self._connections.discard(proto)  # never connected: connectionLost will not come
            if isinstance(e, Exception) and not isinstance(e, defer.CancelledError):
                raise UpstreamFailure(self._describe(e), "connect", notes) from None
            raise

    async def _set_up(self, proto: UpstreamProtocol, creator: tls.RecordingCreator | None,
                      notes: dict[str, str]) -> None:
        """Greet, secure and authenticate on a connected ``proto``; on failure it is closed."""
        stage = _Stage("tls" if self.security == "tls" else "connect")
        try:
            await self._session(proto, creator, notes, stage)
        except UpstreamFailure as e:
            e.notes.update(notes)
            proto.quit()
            raise
        except ConnectionFailed as e:
            proto.abort()
            raise self._set_up_failure(e, proto, creator, stage.name, notes) from None
        except BaseException:
            proto.abort()
            raise

    async def _session(self, proto: UpstreamProtocol, creator: tls.RecordingCreator | None,
                       notes: dict[str, str], stage: _Stage) -> None:
        greeting = await proto.greeting
        if self.security == "tls":
            notes["tls"] = self._tls_note(creator)
            stage.name = "connect"
        if greeting.code != 220:
            raise UpstreamFailure(f"{self.where} refused the session: {greeting}",
                                  "connect", notes)
        notes["connect"] = f"{self.where}: {greeting}"
        await self._ehlo(proto, notes)
        if self.security == "starttls":
            stage.name = "tls"
            await self._starttls(proto, creator, notes)
            notes["tls"] = self._tls_note(creator)
        elif self.security == "none":
            notes["tls"] = 'not used (security = "none")'
        stage.name = "auth"
        notes["auth"] = await self._authenticate(proto, notes)

    def _set_up_failure(self, e: ConnectionFailed, proto: UpstreamProtocol,
                        creator: tls.RecordingCreator | None, stage: str,
                        notes: dict[str, str]) -> UpstreamFailure:
        handshaking = creator is not None and creator.connection is not None and not proto.tls
        if handshaking or replies.is_tls_failure(getattr(e, "reason", None)):
            stage = "tls"
        elif stage == "tls" and self.security == "tls":
            stage = "connect"  # the handshake was done: the greeting is what failed
        return UpstreamFailure(self._describe(e, creator, handshaking), stage, notes)

    async def _ehlo(self, proto: UpstreamProtocol, notes: dict[str, str]) -> None:
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

    async def _starttls(self, proto: UpstreamProtocol, creator: tls.RecordingCreator | None,
                        notes: dict[str, str]) -> None:
        if "STARTTLS" not in proto.extensions:
            raise UpstreamFailure(
                f'{self.where} does not offer STARTTLS and security = "starttls": '
                "nothing was sent (no downgrade to plaintext)", "tls", notes)
        reply = await proto.command(b"STARTTLS", "STARTTLS")
        if reply.code != 220:
            raise UpstreamFailure(f"STARTTLS refused by {self.where}: {reply}", "tls", notes)
        try:
            proto.transport.startTLS(creator)  # type: ignore[union-attr]
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

    async def _authenticate(self, proto: UpstreamProtocol, notes: dict[str, str]) -> str:
        if not self.username:
            return "not used (no provider.username)"
        if self.security != "none" and not proto.tls:
            # by construction unreachable; the credentials must never go out in clear
            raise UpstreamFailure("refusing to authenticate over a plaintext connection",
                                  "auth", notes)
        mechanism = self._auth_mechanism(proto, notes)
        user = self.username.encode("utf-8")
        password = self._password.bytes() if self._password is not None else b""
        if mechanism == "PLAIN":
            reply = await self._auth_plain(proto, user, password)
        else:
            reply = await self._auth_login(proto, user, password)
        if reply.code != 235:
            raise UpstreamFailure(f"authentication as {self.username} failed: {reply}",
                                  "auth", notes)
        return f"AUTH {mechanism} as {self.username}: {reply}"

    def _auth_mechanism(self, proto: UpstreamProtocol, notes: dict[str, str]) -> str:
        mechanism = replies.choose_auth(proto.extensions)
        if mechanism is not None:
            return mechanism
        offered = " ".join(sorted(replies.auth_mechanisms(proto.extensions)))
        if offered:
            why = f"offers AUTH {offered} but neither PLAIN nor LOGIN"
        else:
            why = "offers no AUTH"
        raise UpstreamFailure(
            f"{self.where} {why}; provider.username is set, so nothing is sent "
            "unauthenticated", "auth", notes)

    @staticmethod
    async def _auth_plain(proto: UpstreamProtocol, user: bytes,
                          password: bytes) -> replies.Reply:
        token = base64.b64encode(b"\0" + user + b"\0" + password)
        reply = await proto.command(b"AUTH PLAIN " + token, "AUTH PLAIN")
        if reply.code == 334:
            # a server that wants the response after an empty challenge
            reply = await proto.command(token, "AUTH PLAIN")
        return reply

    @staticmethod
    async def _auth_login(proto: UpstreamProtocol, user: bytes,
                          password: bytes) -> replies.Reply:
        reply = await proto.command(b"AUTH LOGIN", "AUTH LOGIN")
        for answer in (user, password):
            if reply.code != 334:
                break
            reply = await proto.command(base64.b64encode(answer), "AUTH LOGIN")
        if reply.code == 334:
            # a third challenge is not LOGIN as we know it: cancel (RFC 4954)
            reply = await proto.command(b"*", "AUTH LOGIN")
        return reply

    # -- sending ------------------------------------------------------------------------

    def send(self, message: OutgoingMessage) -> defer.Deferred[Outcome]:
        return defer.Deferred.fromCoroutine(self._send(message))

    async def _send(self, message: OutgoingMessage) -> Outcome:
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
                outcome, failed_before_data = await MailTransaction(
                    proto, message, reused, self.where, self._describe).run()
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
        raise AssertionError("unreachable: the second attempt always returns")

    async def _acquire(self, fresh: bool) -> UpstreamProtocol:
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

    # -- the connection test ----------------------------------------------------------------

    def check(self) -> defer.Deferred[CheckResult]:
        return defer.Deferred.fromCoroutine(self._check())

    async def _check(self) -> CheckResult:
        if self._tls_problem:
            return CheckResult((Step("connect", False, "not attempted"),
                                Step("tls", False, self._tls_problem),
                                Step("auth", False, "not attempted")))
        try:
            proto = await self._open()
        except UpstreamFailure as e:
            return CheckResult(tuple(self._failed_step(name, e) for name in _STEPS))
        steps = tuple(Step(name, True, proto.notes.get(name, "")) for name in _STEPS)
        await proto.quit()
        return CheckResult(steps)

    @staticmethod
    def _failed_step(name: str, e: UpstreamFailure) -> Step:
        if name == e.stage:
            return Step(name, False, e.detail)
        if name in e.notes:
            return Step(name, True, e.notes[name])
        return Step(name, False, f"not attempted ({e.stage} failed)")
