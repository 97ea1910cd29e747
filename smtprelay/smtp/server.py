"""The SMTP front door: Twisted's ESMTP, hardened.

``RelaySMTP`` subclasses :class:`twisted.mail.smtp.ESMTP` and keeps its shape
(``do_*`` / ``ext_*`` verbs, a cred portal, ``startTLS``), but replaces the
parts that an attacker uses against Twisted 26:

- framing: our own ``dataReceived``.  Commands end at LF; the body goes
  through :class:`~smtprelay.smtp.data.DataReader`, for which only
  ``CRLF.CRLF`` ends DATA (no bare-LF/CR smuggling) and an over-long line
  never drops the session back into command mode mid-body;
- ordering: while a reply waits on something asynchronous (AUTH check, store
  commit, provider in direct mode) input is held and not parsed, so pipelined
  replies are always in order and PIPELINING is advertised honestly;
- STARTTLS: whatever was pipelined behind it is discarded and the session
  starts anew (no HELO, sender, recipients or AUTH carried into TLS);
- AUTH: a bare ``AUTH``, bad base64, a malformed PLAIN payload or ``*``
  get a 501, never a traceback or a dropped connection; AUTH is offered only
  under TLS unless the client is on loopback or ``allow_plaintext``;
  failures count towards a per-address lockout;
- MAIL FROM: the sender policy (and the user's own list) applies; ``SIZE=``
  is enforced; every reply carries an enhanced status code;
- end of data: the session hands the transaction's facts and the spooled
  body to the :class:`~smtprelay.intake.Intake` and writes back its reply;
  any failure becomes a clear reply (451), never a silent 550 or no reply.

The session only speaks SMTP: what happens to an accepted message is the
intake's.  Every reply comes from the table in :mod:`smtprelay.replies`.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from typing import TYPE_CHECKING, Any

from twisted.cred import credentials
from twisted.cred import error as cred_error
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.mail.smtp import ESMTP
from twisted.python.failure import Failure

from smtprelay import message as msg
from smtprelay import policy, replies
from smtprelay.intake import AuthUser, Intake, Transaction, printable
from smtprelay.replies import Lines, Reply
from smtprelay.smtp.auth import IRelayUser
from smtprelay.smtp.data import DataReader
from smtprelay.smtp.spool import MessageSpool

if TYPE_CHECKING:
    from twisted.cred.portal import Portal
    from twisted.internet.interfaces import IReactorTime

    from smtprelay.config import Config
    from smtprelay.metrics import Metrics
    from smtprelay.queue import QueueRunner
    from smtprelay.smtp.auth import AuthenticatedUser, Lockout
    from smtprelay.store.interface import IStore
    from smtprelay.tls import ServerContextFactory

log = Logger()

MAX_COMMAND_LINE = 4096  # RFC 5321 says 512; AUTH lines may carry long base64
MAX_AUTH_LINE = 12288  # RFC 4954
MAX_HELD_INPUT = 1 << 20  # bytes read while a reply is pending, before pausing

_B64 = re.compile(rb"^[A-Za-z0-9+/]*={0,2}$")


def _b64decode(data: bytes) -> bytes:
    if data == b"=":
        return b""
    if not _B64.match(data) or len(data) % 4:
        raise ValueError("bad base64")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("bad base64") from None


class _Transaction:
    """One mail transaction: MAIL, RCPTs, DATA."""

    def __init__(self, original_sender: str, decision: policy.SenderDecision,
                 size_hint: int) -> None:
        self.original_sender = original_sender
        self.decision = decision
        self.size_hint = size_hint
        self.recipients: list[str] = []
        self._seen: set[str] = set()

    def add(self, address: str) -> None:
        key = address.lower()
        if key not in self._seen:
            self._seen.add(key)
            self.recipients.append(address)


class RelaySMTP(ESMTP):
    """One SMTP session.  ``door`` is the shared :class:`FrontDoor`."""

    # a TCP transport that may start TLS (or a test's loopback)
    transport: Any

    def __init__(self, door: FrontDoor, implicit_tls: bool = False) -> None:
        ESMTP.__init__(self, chal={}, contextFactory=door.tls_context)
        self.door = door
        self.config = door.config
        # the portal of the configuration the session started with
        self._portal = door.portal
        self.host = door.config.smtp.hostname.encode("idna")
        self.implicit_tls = implicit_tls
        self.startedTLS = implicit_tls
        # Twisted's LineReceiver keeps its own ``_buffer``; this is ours (see _process)
        self._input = bytearray()
        self._skipping_line = False
        self._busy = 0
        self._paused = False
        self._closing = False
        self._errors = 0
        self._spool_error: OSError | None = None
        self._reset_session()

    # -- state -------------------------------------------------------------------

    def _reset_session(self) -> None:
        """Forget everything a client said (connect, and after STARTTLS)."""
        self.helo: str | None = None
        self.esmtp = False
        self.user: AuthenticatedUser | None = None
        self.authenticated = False
        self._auth: dict[str, Any] | None = None
        self._transaction: _Transaction | None = None
        self._reader: DataReader | None = None
        self._spool: MessageSpool | None = None

    def _reset_transaction(self) -> None:
        self._transaction = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self._reader = None

    @property
    def peer_host(self) -> str:
        return getattr(self.transport.getPeer(), "host", "unknown")

    @property
    def tls_active(self) -> bool:
        return bool(self.startedTLS)

    # -- connection ---------------------------------------------------------------

    def connectionMade(self) -> None:
        try:
            # replies go out as written: a pipelining client must not wait
            # for Nagle's algorithm and its peer's delayed ACK
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass  # not a TCP transport (a test's loopback)
        self.canStartTLS = self.door.tls_context is not None and hasattr(self.transport, "startTLS")
        refusal = self._refusal(self.peer_host)
        if refusal:
            self._closing = True
            self.reply(refusal)
            self.transport.loseConnection()
            return
        self.door.open_session(self)
        self.reply(replies.GREETING.format(hostname=self.door.hostname))
        self.progress()

    def _refusal(self, host: str) -> Reply | None:
        """Why a new session from ``host`` is refused at once, or None."""
        door = self.door
        smtp = self.config.smtp
        hostname = door.hostname
        if not policy.network_allowed(host, smtp.allowed_networks):
            log.warn("refused {host}: outside smtp.allowed_networks", host=host)
            return replies.NETWORK_REFUSED.format(host=host)
        if not door.accepting:
            return replies.NOT_ACCEPTING.format(hostname=hostname)
        if door.lockout.locked(host):
            log.warn("refused {host}: locked out after failed AUTH", host=host)
            return replies.LOCKED_OUT_AT_CONNECT.format(hostname=hostname)
        if len(door.sessions) >= smtp.max_connections:
            log.warn("refused {host}: smtp.max_connections ({n}) reached", host=host,
                     n=smtp.max_connections)
            return replies.TOO_MANY_CONNECTIONS.format(hostname=hostname)
        if door.per_address.get(host, 0) >= smtp.max_connections_per_address:
            log.warn("refused {host}: smtp.max_connections_per_address ({n}) reached",
                     host=host, n=smtp.max_connections_per_address)
            return replies.TOO_MANY_FROM_ADDRESS.format(hostname=hostname)
        return None

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.door.close_session(self)
        self.setTimeout(None)
        self._reset_transaction()

    def progress(self) -> None:
        """The client completed something (a line): restart the idle timer.

        Only whole lines count, not bytes, so that a client sending a byte a
        second (slowloris) cannot hold a session; when the relay is nearly
        full the timer is the short ``smtp.stress_timeout``."""
        self.setTimeout(self.door.session_timeout())

    def timeoutConnection(self) -> None:
        if self._busy:
            # the client waits on us (a commit, a direct-mode delivery), not we on it
            self.progress()
            return
        log.info("idle timeout for {host}", host=self.peer_host)
        self.reply(replies.TIMEOUT.format(hostname=self.door.hostname))
        self._close()

    def _close(self) -> None:
        self._closing = True
        self._input.clear()
        self.transport.loseConnection()

    def shutdown(self) -> None:
        """The relay is stopping: close now if idle, else after this message."""
        if self._transaction is None and not self._busy and self._reader is None:
            self.reply(replies.SHUTTING_DOWN.format(hostname=self.door.hostname))
            self._close()

    def force_shutdown(self) -> None:
        if not self._closing:
            self.reply(replies.SHUTTING_DOWN.format(hostname=self.door.hostname))
            self._close()

    # -- output --------------------------------------------------------------------

    def reply(self, reply: Reply) -> None:
        """One reply line; a 5xx counts towards ``smtp.max_errors``."""
        self.transport.write(str(reply).encode("utf-8", "replace") + b"\r\n")
        if reply.code >= 500 and not self._closing:
            self._errors += 1

    def reply_lines(self, reply: Lines) -> None:
        code, lines = reply.code, reply.lines
        out = [f"{code}-{line}" for line in lines[:-1]] + [f"{code} {lines[-1]}"]
        self.transport.write(("\r\n".join(out) + "\r\n").encode("utf-8", "replace"))

    def sendCode(self, code: int, message: bytes | str = b"") -> None:
        """Twisted's reply path, kept working for inherited code; ours is reply()."""
        text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
        self.reply(Reply(code, None, text))

    # -- input framing ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._input += data
        self._process()

    def _process(self) -> None:
        while self._input and not self._busy and not self._closing:
            if self._reader is not None:
                self._feed_data()
                continue
            limit = MAX_AUTH_LINE if self._auth is not None else MAX_COMMAND_LINE
            nl = self._input.find(b"\n")
            if nl < 0:
                if len(self._input) > limit:
                    self._input.clear()
                    if not self._skipping_line:
                        self._skipping_line = True
                        self.reply(replies.LINE_TOO_LONG)
                        self._check_errors()
                break
            line = bytes(self._input[:nl])
            del self._input[: nl + 1]
            if self._skipping_line:
                # the tail of an over-long line, already answered
                self._skipping_line = False
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            self.progress()
            if len(line) > limit:
                self.reply(replies.LINE_TOO_LONG)
            elif self._auth is not None:
                self._auth_line(line)
            else:
                self._command(line)
            self._check_errors()
        self._flow()

    def _flow(self) -> None:
        """Hold the client back while a reply is pending and input piles up."""
        want_pause = bool(self._busy) and len(self._input) > MAX_HELD_INPUT
        if want_pause and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        elif not want_pause and self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def _check_errors(self) -> None:
        if self._errors >= self.config.smtp.max_errors and not self._closing:
            log.warn("closing {host}: too many errors", host=self.peer_host)
            self._closing = True
            self.reply(replies.TOO_MANY_ERRORS)
            self._input.clear()
            self.transport.loseConnection()

    def _hold(self) -> None:
        self._busy += 1

    def _release(self, result: object = None) -> object:
        self._busy -= 1
        if not self._busy and not self._closing:
            if not self.door.accepting and self._transaction is None and self._reader is None:
                self.shutdown()
                return result
            self._process()
        return result

    def _command(self, line: bytes) -> None:
        if b"\x00" in line:
            self.reply(replies.INVALID_CHARACTERS)
            return
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            self.reply(replies.INVALID_CHARACTERS_8BIT)
            return
        text = text.strip()
        if not text:
            self.reply(replies.BAD_SYNTAX)
            return
        verb, _, rest = text.partition(" ")
        handler = getattr(self, "smtp_" + verb.upper(), None) if verb.isalpha() else None
        if handler is None:
            self.reply(replies.NOT_RECOGNIZED)
            return
        try:
            handler(rest.strip())
        except Exception:
            log.failure("error handling {verb} from {host}", verb=verb.upper(), host=self.peer_host)
            self.reply(replies.INTERNAL_ERROR)

    # -- session verbs -----------------------------------------------------------------

    def _greet(self, rest: str, esmtp: bool) -> None:
        if not rest or " " in rest:
            self.reply(replies.GREET_SYNTAX.format(verb="EHLO" if esmtp else "HELO"))
            return
        self._reset_transaction()
        self.helo = rest
        self.esmtp = esmtp
        hello = replies.HELLO.format(hostname=self.door.hostname, helo=printable(rest, 64),
                                     host=self.peer_host)
        if not esmtp:
            self.reply(hello)
            return
        self.reply_lines(Lines(hello.code, (hello.text, *self.extensions_list())))

    def extensions_list(self) -> list[str]:
        smtp = self.config.smtp
        out = [f"SIZE {smtp.max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES", "PIPELINING"]
        if self.canStartTLS and not self.tls_active:
            out.append("STARTTLS")
        if self._auth_offered() and not self.authenticated:
            out.append("AUTH PLAIN LOGIN")
        out.append("HELP")
        return out

    def smtp_HELO(self, rest: str) -> None:
        self._greet(rest, esmtp=False)

    def smtp_EHLO(self, rest: str) -> None:
        self._greet(rest, esmtp=True)

    def smtp_NOOP(self, rest: str) -> None:
        self.reply(replies.OK)

    def smtp_RSET(self, rest: str) -> None:
        if rest:
            self.reply(replies.RSET_SYNTAX)
            return
        self._reset_transaction()
        self.reply(replies.OK)

    def smtp_QUIT(self, rest: str) -> None:
        self.reply(replies.BYE)
        self._close()

    def smtp_VRFY(self, rest: str) -> None:
        if not rest:
            self.reply(replies.VRFY_SYNTAX)
            return
        self.reply(replies.CANNOT_VRFY)

    def smtp_EXPN(self, rest: str) -> None:
        self.reply(replies.NOT_IMPLEMENTED)

    smtp_ETRN = smtp_TURN = smtp_BDAT = smtp_EXPN

    def smtp_HELP(self, rest: str) -> None:
        self.reply_lines(replies.HELP)

    # -- STARTTLS ---------------------------------------------------------------------------

    def smtp_STARTTLS(self, rest: str) -> None:
        if rest:
            self.reply(replies.STARTTLS_SYNTAX)
        elif self.tls_active:
            self.reply(replies.TLS_ALREADY_ACTIVE)
        elif not self.canStartTLS:
            self.reply(replies.TLS_NOT_AVAILABLE)
        else:
            self.reply(replies.READY_FOR_TLS)
            # CVE-2011-0411: nothing sent in plaintext after STARTTLS may be executed
            self._input.clear()
            self._reset_transaction()
            self._reset_session()
            self.transport.startTLS(self.door.tls_context)
            self.startedTLS = True

    # -- AUTH -------------------------------------------------------------------------------------

    def _auth_offered(self) -> bool:
        auth = self.config.smtp.auth
        if not auth.users:
            return False
        return self.tls_active or auth.allow_plaintext or policy.is_loopback(self.peer_host)

    def _auth_refused(self) -> bool:
        """AUTH may not start now -> True after answering (421 and closing when locked out)."""
        refusal = None
        if not self.config.smtp.auth.users:
            refusal = replies.AUTH_NOT_ENABLED
        elif not self._auth_offered():
            refusal = replies.ENCRYPTION_REQUIRED
        elif self.authenticated:
            refusal = replies.ALREADY_AUTHENTICATED
        elif self._locked_out():
            return True
        elif self._transaction is not None:
            refusal = replies.AUTH_IN_TRANSACTION
        if refusal is None:
            return False
        self.reply(refusal)
        return True

    def smtp_AUTH(self, rest: str) -> None:
        if self._auth_refused():
            return
        mechanism, _, initial = rest.partition(" ")
        mechanism = mechanism.upper()
        initial = initial.strip()
        if not mechanism:
            self.reply(replies.AUTH_SYNTAX)
            return
        if mechanism not in ("PLAIN", "LOGIN"):
            self.reply(replies.AUTH_MECHANISM_UNKNOWN)
            return
        self._auth = {"mechanism": mechanism, "username": None}
        if initial:
            self._auth_line(initial.encode("ascii"))
        elif mechanism == "PLAIN":
            self.reply(replies.AUTH_CONTINUE)
        else:
            self.reply(replies.AUTH_USERNAME)

    def _auth_line(self, line: bytes) -> None:
        state = self._auth
        assert state is not None
        if line.strip() == b"*":
            self._auth = None
            self.reply(replies.AUTH_CANCELLED)
            return
        try:
            decoded = _b64decode(line.strip())
        except ValueError:
            self._auth = None
            self.reply(replies.AUTH_BAD_BASE64)
            return
        if state["mechanism"] == "PLAIN":
            self._auth = None
            self._auth_plain(decoded)
        elif state["username"] is None:
            state["username"] = decoded
            self.reply(replies.AUTH_PASSWORD)
        else:
            self._auth = None
            self._login(state["username"], decoded)

    def _auth_plain(self, decoded: bytes) -> None:
        parts = decoded.split(b"\x00")
        if len(parts) != 3 or not parts[1]:
            self.reply(replies.AUTH_BAD_PLAIN)
            return
        authzid, username, password = parts
        if authzid and authzid != username:
            self._auth_failed(username, "authorization identity differs")
            return
        self._login(username, password)

    def _login(self, username: bytes, password: bytes) -> None:
        self._hold()
        d = self._portal.login(credentials.UsernamePassword(username, password), None, IRelayUser)

        def ok(result: tuple[Any, AuthenticatedUser, Any]) -> None:
            _, avatar, _ = result
            if self._locked_out():
                return  # locked while this check ran (from a parallel session)
            self.user = avatar
            self.authenticated = True
            log.info("AUTH ok for {user} from {host}", user=avatar.name, host=self.peer_host)
            self.reply(replies.AUTH_OK)

        def bad(failure: Failure) -> None:
            if failure.check(cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials):
                self._auth_failed(username, "wrong user name or password")
            else:
                log.failure("AUTH check failed", failure)
                self.reply(replies.AUTH_TEMPORARY_FAILURE)

        d.addCallbacks(ok, bad)
        d.addErrback(lambda f: log.failure("AUTH reply failed", f))
        d.addBoth(self._release)

    def _locked_out(self) -> bool:
        """A session opened before its address was locked out gets no more tries:
        -> True after answering 421 and closing."""
        if not self.door.lockout.locked(self.peer_host):
            return False
        log.warn("AUTH refused for {host}: locked out after failed AUTH", host=self.peer_host)
        self.reply(replies.AUTH_LOCKED_OUT)
        self._close()
        return True

    def _auth_failed(self, username: bytes, why: str) -> None:
        host = self.peer_host
        log.warn("AUTH failed for user {user} from {host}: {why}",
                 user=self._loggable_user(username), host=host, why=why)
        if self._locked_out():
            return
        if self.door.lockout.failure(host):
            log.warn("locking out {host} for {s:.0f}s after {n} failed AUTH attempts",
                     host=host, s=self.door.lockout.window, n=self.door.lockout.max_failures)
            self.reply(replies.AUTH_LOCKED_OUT)
            self._close()
            return
        self.reply(replies.AUTH_INVALID)

    _USER_NAME = re.compile(rb"[A-Za-z0-9._@+=-]{1,64}")

    def _loggable_user(self, username: bytes) -> str:
        """The user name for the log: clients type passwords into it, or send a
        whole PLAIN payload as a LOGIN name; only a configured name, or one
        that looks like a name, is written as sent."""
        try:
            text = username.decode("utf-8")
        except UnicodeDecodeError:
            return "(unprintable user name)"
        if text in self.config.smtp.auth.users:
            return text
        if self._USER_NAME.fullmatch(username):
            return f"{text} (unknown)"
        return "(unprintable user name)"

    # -- the envelope -----------------------------------------------------------------------------

    def smtp_MAIL(self, rest: str) -> None:
        if self._transaction is not None:
            self.reply(replies.NESTED_MAIL)
            return
        if self.config.smtp.auth.required and not self.authenticated:
            self.reply(replies.AUTH_REQUIRED)
            return
        parsed = _parse_path(rest, "FROM")
        if parsed is None:
            self.reply(replies.MAIL_SYNTAX)
            return
        address, params = parsed
        if address and not policy.is_mailbox(address):
            self.reply(replies.BAD_SENDER_SYNTAX)
            return
        if any(ord(c) > 127 for c in address):
            self.reply(replies.NON_ASCII_ADDRESS)
            return
        size_hint = self._mail_parameters(params)
        if isinstance(size_hint, Reply):
            self.reply(size_hint)
            return
        sender = self.config.sender
        decision = policy.decide_sender(
            address, sender.policy, sender.on_disallowed,
            self.user.allowed if self.user is not None else None,
        )
        if decision.verdict is policy.Verdict.REJECT:
            log.warn("rejected sender {sender} from {host} (user {user})",
                     sender=printable(address), host=self.peer_host,
                     user=self.user.name if self.user else None)
            self.reply(replies.SENDER_NOT_ALLOWED)
            return
        self._transaction = _Transaction(address, decision, size_hint)
        self.reply(replies.SENDER_OK)

    def _mail_parameters(self, params: list[tuple[str, str]]) -> int | Reply:
        """MAIL FROM's parameters -> the SIZE hint (0 without one), or the refusal."""
        size_hint = 0
        for key, value in params:
            if key == "SIZE":
                if not value.isdigit() or len(value) > 20:
                    return replies.BAD_SIZE
                size_hint = int(value)
                if size_hint > self.config.smtp.max_message_size:
                    return replies.SIZE_EXCEEDED
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    return replies.BAD_BODY
            elif key == "AUTH":
                pass  # RFC 4954 AUTH= on MAIL: accepted, not trusted
            else:
                return replies.UNSUPPORTED_PARAMETER.format(name=printable(key, 20))
        return size_hint

    def smtp_RCPT(self, rest: str) -> None:
        t = self._transaction
        if t is None:
            self.reply(replies.NEED_MAIL)
            return
        parsed = _parse_path(rest, "TO")
        if parsed is None:
            self.reply(replies.RCPT_SYNTAX)
            return
        address, params = parsed
        if not address or not policy.is_mailbox(address):
            self.reply(replies.BAD_RECIPIENT_SYNTAX)
            return
        if any(ord(c) > 127 for c in address):
            self.reply(replies.NON_ASCII_ADDRESS)
            return
        if params:
            self.reply(replies.UNSUPPORTED_PARAMETER.format(name=printable(params[0][0], 20)))
            return
        if len(t.recipients) >= self.config.smtp.max_recipients:
            self.reply(replies.TOO_MANY_RECIPIENTS)
            return
        t.add(address)
        self.reply(replies.RECIPIENT_OK)

    # -- DATA ------------------------------------------------------------------------------------

    def smtp_DATA(self, rest: str) -> None:
        t = self._transaction
        if rest:
            self.reply(replies.DATA_SYNTAX)
            return
        if t is None:
            self.reply(replies.NEED_MAIL)
            return
        if not t.recipients:
            self.reply(replies.NO_VALID_RECIPIENTS)
            return
        smtp = self.config.smtp
        self._reader = DataReader(max_line_length=smtp.max_line_length,
                                  max_size=smtp.max_message_size,
                                  bare_newlines=smtp.bare_newlines)
        self._spool = MessageSpool()
        self.reply(replies.START_DATA)

    def _feed_data(self) -> None:
        reader, spool = self._reader, self._spool
        assert reader is not None and spool is not None
        chunk = bytes(self._input)
        self._input.clear()
        result = reader.feed(chunk)
        if result.content or result.done:
            self.progress()
        if result.content:
            try:
                spool.write(result.content)
            except OSError as e:
                # the spool (memory, then a temporary file) failed: answer 451 at the end
                self._spool_error = e
        if result.done:
            self._input[:0] = result.rest
            self._end_of_data()

    def _end_of_data(self) -> None:
        reader, spool, t = self._reader, self._spool, self._transaction
        assert reader is not None and spool is not None and t is not None
        self._reader = None
        self._spool = None
        self._transaction = None
        eod_at = time.monotonic()
        failure, self._spool_error = self._spool_error, None
        if reader.error is not None:
            e = reader.error
            log.warn("message from {host} refused at end of data: {code} {status} {text}",
                     host=self.peer_host, code=e.code, status=e.status, text=e.text)
            spool.close()
            self.reply(e)
            return
        if failure is not None:
            log.error("spooling a message failed: {why}", why=failure)
            spool.close()
            self.reply(replies.LOCAL_ERROR)
            return
        self._hold()
        d = defer.maybeDeferred(self._accept, t, spool)

        def replied(reply: Reply) -> None:
            self.reply(reply)
            self.door.accept_latency(time.monotonic() - eod_at)

        def failed(f: Failure) -> None:
            log.failure("accepting a message failed", f)
            self.reply(replies.LOCAL_ERROR)

        d.addCallbacks(replied, failed)
        d.addBoth(lambda r: spool.close())
        d.addBoth(self._release)

    def _accept(self, t: _Transaction, spool: MessageSpool) -> defer.Deferred[Reply]:
        """The transaction's facts to the intake -> Deferred[the reply]."""
        user = self.user
        facts = Transaction(
            sender=t.decision.address,
            original_sender=t.original_sender,
            recipients=tuple(t.recipients),
            client_address=self.peer_host,
            helo=self.helo,
            user=AuthUser(user.name, user.allowed) if user is not None else None,
            protocol=msg.smtp_protocol(self.esmtp, self.tls_active, self.authenticated),
            mode=self.config.delivery.mode,
        )
        # judged by the configuration the session started with, as its envelope was
        return self.door.intake.receive(facts, spool, self.config)


def _parse_path(rest: str, keyword: str) -> tuple[str, list[tuple[str, str]]] | None:
    """``FROM:<a@b> SIZE=1`` -> ("a@b", [("SIZE", "1")]); None if malformed.

    Liberal where harmless: any case, spaces after the colon, a path without
    angle brackets, a source route (dropped).
    """
    head, sep, tail = rest.partition(":")
    if not sep or head.strip().upper() != keyword:
        return None
    tail = tail.lstrip()
    if tail.startswith("<"):
        end = tail.find(">")
        if end < 0:
            return None
        path, params_text = tail[1:end], tail[end + 1:]
        if params_text and not params_text.startswith(" "):
            return None
    else:
        path, _, params_text = tail.partition(" ")
        if not path:
            return None  # the null path is written "<>"
    if path != path.strip():
        return None  # "<\t>" is not the null path "<>", nor is "< a@b.c>" an address
    if path.startswith("@"):
        # a source route <@a,@b:user@c>: RFC 5321 says ignore it
        _, colon, path = path.partition(":")
        if not colon:
            return None
    if '"' not in path and (" " in path or "<" in path or ">" in path):
        return None
    params = []
    for item in params_text.split():
        key, _, value = item.partition("=")
        if not key.isalnum() and not key.replace("-", "").isalnum():
            return None
        params.append((key.upper(), value))
    return path, params



class FrontDoor:
    """What all sessions share: configuration, lockout, TLS, the intake."""

    def __init__(self, config: Config, store: IStore, clock: IReactorTime, portal: Portal,
                 lockout: Lockout, tls_context: ServerContextFactory | None = None,
                 runner: QueueRunner | None = None, metrics: Metrics | None = None) -> None:
        # what a finished transaction goes to
        self.intake = Intake(config, store, clock, runner=runner, metrics=metrics)
        self.config = config
        self.portal = portal
        self.lockout = lockout
        self.tls_context = tls_context
        self.metrics = metrics
        self.sessions: set[RelaySMTP] = set()
        self.per_address: dict[str, int] = {}  # peer host -> sessions open from it
        self.accepting = True

    def apply(self, config: Config, tls_context: ServerContextFactory | None,
              portal: Portal) -> None:
        """Serve new sessions with a new configuration, TLS context and cred portal
        (each built by the caller, where building may fail).  Sessions in progress
        keep the configuration, TLS context and login they started with, and their
        messages are judged by it; the door's own limits (stress, idle timeout)
        follow the new configuration at once."""
        self.config = config
        self.tls_context = tls_context
        self.portal = portal
        self.intake.apply(config)

    @property
    def hostname(self) -> str:
        return self.config.smtp.hostname

    # -- sessions and stress ----------------------------------------------------

    @property
    def under_stress(self) -> bool:
        """Nearly full (80 % of smtp.max_connections): slow clients go first."""
        return len(self.sessions) >= 0.8 * self.config.smtp.max_connections

    def session_timeout(self) -> float:
        smtp = self.config.smtp
        if self.under_stress:
            return min(smtp.idle_timeout, smtp.stress_timeout)
        return smtp.idle_timeout

    def open_session(self, session: RelaySMTP) -> None:
        was_stressed = self.under_stress
        self.sessions.add(session)
        host = session.peer_host
        self.per_address[host] = self.per_address.get(host, 0) + 1
        if self.under_stress and not was_stressed:
            log.warn("{n} SMTP sessions: under stress, idle sessions now time out after "
                     "{t:.0f}s", n=len(self.sessions), t=self.session_timeout())
            for s in list(self.sessions):
                s.progress()

    def close_session(self, session: RelaySMTP) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            host = session.peer_host
            left = self.per_address.get(host, 1) - 1
            if left > 0:
                self.per_address[host] = left
            else:
                self.per_address.pop(host, None)

    def accept_latency(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.accept_latency(seconds)

    def stop_accepting(self) -> None:
        self.accepting = False
        for session in list(self.sessions):
            session.shutdown()

    def force_close(self) -> None:
        for session in list(self.sessions):
            session.force_shutdown()


class RelaySMTPFactory(protocol.ServerFactory):
    noisy = False

    def __init__(self, door: FrontDoor, implicit_tls: bool = False) -> None:
        self.door = door
        self.implicit_tls = implicit_tls

    def buildProtocol(self, addr: Any) -> RelaySMTP:
        p = RelaySMTP(self.door, implicit_tls=self.implicit_tls)
        p.factory = self
        return p
