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
- end of data: any failure becomes a clear reply (451 for storage), never
  a silent 550 or no reply.
"""

import base64
import binascii
import re
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from twisted.cred import credentials, error as cred_error
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.mail.smtp import ESMTP

from smtprelay import message as msg
from smtprelay import policy
from smtprelay.model import Envelope, Result, Status, new_message_id
from smtprelay.smtp.auth import IRelayUser
from smtprelay.smtp.data import DataReader
from smtprelay.smtp.spool import MessageSpool
from smtprelay.store.interface import StoreUnavailable

log = Logger()

MAX_COMMAND_LINE = 4096  # RFC 5321 says 512; AUTH lines may carry long base64
MAX_AUTH_LINE = 12288  # RFC 4954
MAX_HELD_INPUT = 1 << 20  # bytes read while a reply is pending, before pausing
# A message up to this size is kept in memory from its end of data to its
# delivery when handed straight to the queue (no read back from the store).
HAND_OFF_BYTES = 256 * 1024

_B64 = re.compile(rb"^[A-Za-z0-9+/]*={0,2}$")


def _b64decode(data):
    if data == b"=":
        return b""
    if not _B64.match(data) or len(data) % 4:
        raise ValueError("bad base64")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("bad base64") from None


def _printable(data, limit=80):
    """Client input made safe for a log line."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", errors="replace")
    out = "".join(c if c.isprintable() else "?" for c in data[:limit])
    return out + ("..." if len(data) > limit else "")


class _Transaction:
    """One mail transaction: MAIL, RCPTs, DATA."""

    def __init__(self, original_sender, decision, size_hint):
        self.original_sender = original_sender
        self.decision = decision
        self.size_hint = size_hint
        self.recipients = []
        self._seen = set()

    def add(self, address):
        key = address.lower()
        if key not in self._seen:
            self._seen.add(key)
            self.recipients.append(address)


class RelaySMTP(ESMTP):
    """One SMTP session.  ``door`` is the shared :class:`FrontDoor`."""

    def __init__(self, door, implicit_tls=False):
        ESMTP.__init__(self, chal={}, contextFactory=door.tls_context)
        self.door = door
        self.config = door.config
        self.portal = door.portal
        self.host = door.config.smtp.hostname.encode("idna")
        self.timeout = door.config.smtp.idle_timeout
        self.implicit_tls = implicit_tls
        self.startedTLS = implicit_tls
        self._buffer = bytearray()
        self._skipping_line = False
        self._busy = 0
        self._paused = False
        self._closing = False
        self._errors = 0
        self._spool_error = None
        self._reset_session()

    # -- state -------------------------------------------------------------------

    def _reset_session(self):
        """Forget everything a client said (connect, and after STARTTLS)."""
        self.helo = None
        self.esmtp = False
        self.user = None
        self.authenticated = False
        self._auth = None
        self._transaction = None
        self._reader = None
        self._spool = None

    def _reset_transaction(self):
        self._transaction = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self._reader = None

    @property
    def peer_host(self):
        return getattr(self.transport.getPeer(), "host", "unknown")

    @property
    def tls_active(self):
        return self.startedTLS

    # -- connection ---------------------------------------------------------------

    def connectionMade(self):
        try:
            # replies go out as written: a pipelining client must not wait
            # for Nagle's algorithm and its peer's delayed ACK
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass  # not a TCP transport (a test's loopback)
        self.canStartTLS = self.door.tls_context is not None and hasattr(self.transport, "startTLS")
        host = self.peer_host
        door = self.door
        smtp = self.config.smtp
        refusal = None
        if not policy.network_allowed(host, smtp.allowed_networks):
            refusal = (554, "5.7.1", f"{host} is not allowed to use this relay")
            log.warn("refused {host}: outside smtp.allowed_networks", host=host)
        elif not door.accepting:
            refusal = (421, "4.3.2", f"{door.hostname} Service not available, closing channel")
        elif door.lockout.locked(host):
            refusal = (421, "4.7.0", f"{door.hostname} Too many failed authentications; try later")
            log.warn("refused {host}: locked out after failed AUTH", host=host)
        elif len(door.sessions) >= smtp.max_connections:
            refusal = (421, "4.7.0", f"{door.hostname} Too many connections; try again later")
            log.warn("refused {host}: smtp.max_connections ({n}) reached", host=host,
                     n=smtp.max_connections)
        elif door.per_address.get(host, 0) >= smtp.max_connections_per_address:
            refusal = (421, "4.7.0", f"{door.hostname} Too many connections from your address")
            log.warn("refused {host}: smtp.max_connections_per_address ({n}) reached",
                     host=host, n=smtp.max_connections_per_address)
        if refusal:
            self._closing = True
            self.reply(*refusal)
            self.transport.loseConnection()
            return
        door.open_session(self)
        self.reply(220, None, f"{door.hostname} ESMTP smtprelay")
        self.progress()

    def connectionLost(self, reason=protocol.connectionDone):
        self.door.close_session(self)
        self.setTimeout(None)
        self._reset_transaction()

    def progress(self):
        """The client completed something (a line): restart the idle timer.

        Only whole lines count, not bytes, so that a client sending a byte a
        second (slowloris) cannot hold a session; when the relay is nearly
        full the timer is the short ``smtp.stress_timeout``."""
        self.setTimeout(self.door.session_timeout())

    def timeoutConnection(self):
        if self._busy:
            # the client waits on us (a commit, a direct-mode delivery), not we on it
            self.progress()
            return
        log.info("idle timeout for {host}", host=self.peer_host)
        self.reply(421, "4.4.2", f"{self.door.hostname} Error: timeout exceeded")
        self._close()

    def _close(self):
        self._closing = True
        self._buffer.clear()
        self.transport.loseConnection()

    def shutdown(self):
        """The relay is stopping: close now if idle, else after this message."""
        if self._transaction is None and not self._busy and self._reader is None:
            self.reply(421, "4.3.2", f"{self.door.hostname} Service shutting down")
            self._close()

    def force_shutdown(self):
        if not self._closing:
            self.reply(421, "4.3.2", f"{self.door.hostname} Service shutting down")
            self._close()

    # -- output --------------------------------------------------------------------

    def reply(self, code, status, text):
        """One reply line (``status`` is the RFC 3463 code, None for greetings)."""
        prefix = f"{code} {status} " if status else f"{code} "
        self.transport.write((prefix + text).encode("utf-8", "replace") + b"\r\n")
        if code >= 500 and not self._closing:
            self._errors += 1

    def reply_lines(self, code, lines):
        out = [f"{code}-{line}" for line in lines[:-1]] + [f"{code} {lines[-1]}"]
        self.transport.write(("\r\n".join(out) + "\r\n").encode("utf-8", "replace"))

    def sendCode(self, code, message=b""):
        """Twisted's reply path, kept working for inherited code; ours is reply()."""
        text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
        self.reply(code, None, text)

    # -- input framing ---------------------------------------------------------------

    def dataReceived(self, data):
        if self._closing:
            return
        self._buffer += data
        self._process()

    def _process(self):
        while self._buffer and not self._busy and not self._closing:
            if self._reader is not None:
                self._feed_data()
                continue
            limit = MAX_AUTH_LINE if self._auth is not None else MAX_COMMAND_LINE
            nl = self._buffer.find(b"\n")
            if nl < 0:
                if len(self._buffer) > limit:
                    self._buffer.clear()
                    if not self._skipping_line:
                        self._skipping_line = True
                        self.reply(500, "5.5.2", "Line too long")
                        self._check_errors()
                break
            line = bytes(self._buffer[:nl])
            del self._buffer[: nl + 1]
            if self._skipping_line:
                # the tail of an over-long line, already answered
                self._skipping_line = False
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            self.progress()
            if len(line) > limit:
                self.reply(500, "5.5.2", "Line too long")
            elif self._auth is not None:
                self._auth_line(line)
            else:
                self._command(line)
            self._check_errors()
        self._flow()

    def _flow(self):
        """Hold the client back while a reply is pending and input piles up."""
        want_pause = self._busy and len(self._buffer) > MAX_HELD_INPUT
        if want_pause and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        elif not want_pause and self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def _check_errors(self):
        if self._errors >= self.config.smtp.max_errors and not self._closing:
            log.warn("closing {host}: too many errors", host=self.peer_host)
            self._closing = True
            self.transport.write(b"421 4.7.0 Too many errors; closing connection\r\n")
            self._buffer.clear()
            self.transport.loseConnection()

    def _hold(self):
        self._busy += 1

    def _release(self, _=None):
        self._busy -= 1
        if not self._busy and not self._closing:
            if not self.door.accepting and self._transaction is None and self._reader is None:
                self.shutdown()
                return _
            self._process()
        return _

    def _command(self, line):
        if b"\x00" in line:
            self.reply(500, "5.5.2", "Invalid characters in command")
            return
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            self.reply(500, "5.5.2", "Invalid characters in command (8-bit)")
            return
        text = text.strip()
        if not text:
            self.reply(500, "5.5.2", "Error: bad syntax")
            return
        verb, _, rest = text.partition(" ")
        handler = getattr(self, "smtp_" + verb.upper(), None) if verb.isalpha() else None
        if handler is None:
            self.reply(500, "5.5.1", "Error: command not recognized")
            return
        try:
            handler(rest.strip())
        except Exception:
            log.failure("error handling {verb} from {host}", verb=verb.upper(), host=self.peer_host)
            self.reply(451, "4.3.0", "Error: internal error in processing")

    # -- session verbs -----------------------------------------------------------------

    def _greet(self, rest, esmtp):
        if not rest or " " in rest:
            self.reply(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
            return
        self._reset_transaction()
        self.helo = rest
        self.esmtp = esmtp
        hello = f"{self.door.hostname} Hello {_printable(rest, 64)} [{self.peer_host}]"
        if not esmtp:
            self.reply(250, None, hello)
            return
        self.reply_lines(250, [hello] + self.extensions_list())

    def extensions_list(self):
        smtp = self.config.smtp
        out = [f"SIZE {smtp.max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES", "PIPELINING"]
        if self.canStartTLS and not self.tls_active:
            out.append("STARTTLS")
        if self._auth_offered() and not self.authenticated:
            out.append("AUTH PLAIN LOGIN")
        out.append("HELP")
        return out

    def smtp_HELO(self, rest):
        self._greet(rest, esmtp=False)

    def smtp_EHLO(self, rest):
        self._greet(rest, esmtp=True)

    def smtp_NOOP(self, rest):
        self.reply(250, "2.0.0", "Ok")

    def smtp_RSET(self, rest):
        if rest:
            self.reply(501, "5.5.4", "Syntax: RSET")
            return
        self._reset_transaction()
        self.reply(250, "2.0.0", "Ok")

    def smtp_QUIT(self, rest):
        self.reply(221, "2.0.0", "Bye")
        self._close()

    def smtp_VRFY(self, rest):
        if not rest:
            self.reply(501, "5.5.4", "Syntax: VRFY address")
            return
        self.reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_EXPN(self, rest):
        self.reply(502, "5.5.1", "Error: command not implemented")

    smtp_ETRN = smtp_TURN = smtp_BDAT = smtp_EXPN

    def smtp_HELP(self, rest):
        self.reply_lines(214, [
            "2.0.0 smtprelay: an SMTP relay to Microsoft 365, Gmail or upstream SMTP",
            "2.0.0 Commands: HELO EHLO STARTTLS AUTH MAIL RCPT DATA RSET NOOP VRFY HELP QUIT",
            "2.0.0 End of HELP",
        ])

    # -- STARTTLS ---------------------------------------------------------------------------

    def smtp_STARTTLS(self, rest):
        if rest:
            self.reply(501, "5.5.4", "Syntax: STARTTLS")
        elif self.tls_active:
            self.reply(503, "5.5.1", "Error: TLS already active")
        elif not self.canStartTLS:
            self.reply(454, "4.7.0", "TLS not available")
        else:
            self.reply(220, "2.0.0", "Ready to start TLS")
            # CVE-2011-0411: nothing sent in plaintext after STARTTLS may be executed
            self._buffer.clear()
            self._reset_transaction()
            self._reset_session()
            self.transport.startTLS(self.door.tls_context)
            self.startedTLS = True

    # -- AUTH -------------------------------------------------------------------------------------

    def _auth_offered(self):
        auth = self.config.smtp.auth
        if not auth.users:
            return False
        return self.tls_active or auth.allow_plaintext or policy.is_loopback(self.peer_host)

    def smtp_AUTH(self, rest):
        if not self.config.smtp.auth.users:
            self.reply(502, "5.5.1", "Error: authentication not enabled")
            return
        if not self._auth_offered():
            self.reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
            return
        if self.authenticated:
            self.reply(503, "5.5.1", "Error: already authenticated")
            return
        if self._locked_out():
            return
        if self._transaction is not None:
            self.reply(503, "5.5.1", "Error: AUTH not permitted during a mail transaction")
            return
        mechanism, _, initial = rest.partition(" ")
        mechanism = mechanism.upper()
        initial = initial.strip()
        if not mechanism:
            self.reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
            return
        if mechanism not in ("PLAIN", "LOGIN"):
            self.reply(504, "5.5.4", "Unrecognized authentication type")
            return
        self._auth = {"mechanism": mechanism, "username": None}
        if mechanism == "PLAIN":
            if initial:
                self._auth_line(initial.encode("ascii"))
            else:
                self.reply(334, None, "")
        else:
            if initial:
                self._auth_line(initial.encode("ascii"))
            else:
                self.reply(334, None, "VXNlcm5hbWU6")  # "Username:"

    def _auth_line(self, line):
        state = self._auth
        if line.strip() == b"*":
            self._auth = None
            self.reply(501, "5.5.2", "Authentication cancelled")
            return
        try:
            decoded = _b64decode(line.strip())
        except ValueError:
            self._auth = None
            self.reply(501, "5.5.2", "Invalid base64 data in AUTH response")
            return
        if state["mechanism"] == "PLAIN":
            parts = decoded.split(b"\x00")
            if len(parts) != 3 or not parts[1]:
                self._auth = None
                self.reply(501, "5.5.2", "Malformed PLAIN authentication response")
                return
            authzid, username, password = parts
            if authzid and authzid != username:
                self._auth = None
                self._auth_failed(username, "authorization identity differs")
                return
            self._auth = None
            self._login(username, password)
        elif state["username"] is None:
            state["username"] = decoded
            self.reply(334, None, "UGFzc3dvcmQ6")  # "Password:"
        else:
            self._auth = None
            self._login(state["username"], decoded)

    def _login(self, username, password):
        self._hold()
        d = self.portal.login(credentials.UsernamePassword(username, password), None, IRelayUser)

        def ok(result):
            _, avatar, _ = result
            if self._locked_out():
                return  # locked while this check ran (from a parallel session)
            self.user = avatar
            self.authenticated = True
            log.info("AUTH ok for {user} from {host}", user=avatar.name, host=self.peer_host)
            self.reply(235, "2.7.0", "Authentication successful")

        def bad(failure):
            if failure.check(cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials):
                self._auth_failed(username, "wrong user name or password")
            else:
                log.failure("AUTH check failed", failure)
                self.reply(454, "4.7.0", "Temporary authentication failure")

        d.addCallbacks(ok, bad)
        d.addErrback(lambda f: log.failure("AUTH reply failed", f))
        d.addBoth(self._release)

    def _locked_out(self):
        """A session opened before its address was locked out gets no more tries:
        -> True after answering 421 and closing."""
        if not self.door.lockout.locked(self.peer_host):
            return False
        log.warn("AUTH refused for {host}: locked out after failed AUTH", host=self.peer_host)
        self.reply(421, "4.7.0", "Too many failed authentications; try again later")
        self._close()
        return True

    def _auth_failed(self, username, why):
        host = self.peer_host
        log.warn("AUTH failed for user {user} from {host}: {why}",
                 user=self._loggable_user(username), host=host, why=why)
        if self._locked_out():
            return
        if self.door.lockout.failure(host):
            log.warn("locking out {host} for {s:.0f}s after {n} failed AUTH attempts",
                     host=host, s=self.door.lockout.window, n=self.door.lockout.max_failures)
            self.reply(421, "4.7.0", "Too many failed authentications; try again later")
            self._close()
            return
        self.reply(535, "5.7.8", "Authentication credentials invalid")

    _USER_NAME = re.compile(rb"[A-Za-z0-9._@+=-]{1,64}")

    def _loggable_user(self, username):
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

    def smtp_MAIL(self, rest):
        if self._transaction is not None:
            self.reply(503, "5.5.1", "Error: nested MAIL command")
            return
        if self.config.smtp.auth.required and not self.authenticated:
            self.reply(530, "5.7.0", "Authentication required")
            return
        parsed = _parse_path(rest, "FROM")
        if parsed is None:
            self.reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
            return
        address, params = parsed
        if address and not policy.is_mailbox(address):
            self.reply(501, "5.1.7", "Bad sender address syntax")
            return
        if any(ord(c) > 127 for c in address):
            self.reply(553, "5.6.7", "Non-ASCII addresses are not supported")
            return
        size_hint = 0
        for key, value in params:
            if key == "SIZE":
                if not value.isdigit() or len(value) > 20:
                    self.reply(501, "5.5.4", "Bad SIZE parameter")
                    return
                size_hint = int(value)
                if size_hint > self.config.smtp.max_message_size:
                    self.reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
                    return
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    self.reply(501, "5.5.4", "Bad BODY parameter")
                    return
            elif key == "AUTH":
                pass  # RFC 4954 AUTH= on MAIL: accepted, not trusted
            else:
                self.reply(555, "5.5.4", f"Unsupported parameter {_printable(key, 20)}")
                return
        sender = self.config.sender
        decision = policy.decide_sender(
            address, sender.policy, sender.on_disallowed,
            self.user.allowed if self.user is not None else None,
        )
        if decision.verdict is policy.Verdict.REJECT:
            log.warn("rejected sender {sender} from {host} (user {user})",
                     sender=_printable(address), host=self.peer_host,
                     user=self.user.name if self.user else None)
            self.reply(550, "5.7.1", "Sender not allowed")
            return
        self._transaction = _Transaction(address, decision, size_hint)
        self.reply(250, "2.1.0", "Ok")

    def smtp_RCPT(self, rest):
        t = self._transaction
        if t is None:
            self.reply(503, "5.5.1", "Error: need MAIL command")
            return
        parsed = _parse_path(rest, "TO")
        if parsed is None:
            self.reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
            return
        address, params = parsed
        if not address or not policy.is_mailbox(address):
            self.reply(501, "5.1.3", "Bad recipient address syntax")
            return
        if any(ord(c) > 127 for c in address):
            self.reply(553, "5.6.7", "Non-ASCII addresses are not supported")
            return
        if params:
            self.reply(555, "5.5.4", f"Unsupported parameter {_printable(params[0][0], 20)}")
            return
        if len(t.recipients) >= self.config.smtp.max_recipients:
            self.reply(452, "4.5.3", "Error: too many recipients")
            return
        t.add(address)
        self.reply(250, "2.1.5", "Ok")

    # -- DATA ---------------------------------------------------------------------------------------

    def smtp_DATA(self, rest):
        t = self._transaction
        if rest:
            self.reply(501, "5.5.4", "Syntax: DATA")
            return
        if t is None:
            self.reply(503, "5.5.1", "Error: need MAIL command")
            return
        if not t.recipients:
            self.reply(554, "5.5.1", "Error: no valid recipients")
            return
        smtp = self.config.smtp
        self._reader = DataReader(max_line_length=smtp.max_line_length,
                                  max_size=smtp.max_message_size,
                                  bare_newlines=smtp.bare_newlines)
        self._spool = MessageSpool()
        self.reply(354, None, "End data with <CR><LF>.<CR><LF>")

    def _feed_data(self):
        chunk = bytes(self._buffer)
        self._buffer.clear()
        result = self._reader.feed(chunk)
        if result.content or result.done:
            self.progress()
        if result.content:
            try:
                self._spool.write(result.content)
            except OSError as e:
                # the spool (memory, then a temporary file) failed: answer 451 at the end
                self._spool_error = e
        if result.done:
            self._buffer[:0] = result.rest
            self._end_of_data()

    def _end_of_data(self):
        reader, spool, t = self._reader, self._spool, self._transaction
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
            self.reply(e.code, e.status, e.text)
            return
        if failure is not None:
            log.error("spooling a message failed: {why}", why=failure)
            spool.close()
            self.reply(451, "4.3.0", "Error: local error in processing; try again later")
            return
        self._hold()
        d = defer.maybeDeferred(self._accept, t, spool)

        def replied(reply):
            self.reply(*reply)
            self.door.accept_latency(time.monotonic() - eod_at)

        def failed(f):
            log.failure("accepting a message failed", f)
            self.reply(451, "4.3.0", "Error: local error in processing; try again later")

        d.addCallbacks(replied, failed)
        d.addBoth(lambda r: spool.close())
        d.addBoth(self._release)

    @defer.inlineCallbacks
    def _accept(self, t, spool):
        door = self.door
        sender_cfg = self.config.sender
        summary = msg.summarize(spool.header_block)
        decision = t.decision
        header_block = None
        if sender_cfg.check_header_from:
            user_allowed = self.user.allowed if self.user is not None else None
            bad = [a for a in summary.from_addresses
                   if policy.decide_sender(a, sender_cfg.policy, "reject",
                                           user_allowed).verdict is policy.Verdict.REJECT]
            if summary.from_parse_error:
                bad.append(summary.from_display or "(unparseable From)")
            if bad:
                if sender_cfg.on_disallowed == "rewrite" and sender_cfg.default and \
                        policy.decide_sender(sender_cfg.default, sender_cfg.policy, "reject",
                                             user_allowed).verdict is policy.Verdict.ACCEPT:
                    header_block = msg.rewrite_from(spool.header_block, sender_cfg.default)
                    log.info("rewrote From {bad} to {default}", bad=_printable(bad[0]),
                             default=sender_cfg.default)
                else:
                    log.warn("rejected message from {host}: From header {bad} not allowed",
                             host=self.peer_host, bad=_printable(bad[0]))
                    return (550, "5.7.1", "Sender not allowed in From header")
        now = door.clock.seconds()
        message_id = new_message_id(now)
        received = msg.received_header(
            self.helo.encode("ascii", "replace") if self.helo else b"",
            self.peer_host, door.hostname, message_id,
            msg.smtp_protocol(self.esmtp, self.tls_active, self.authenticated), now,
        )
        size = len(received) + spool.size
        if header_block is not None:
            size += len(header_block) - len(spool.header_block)
        mode = self.config.delivery.mode
        envelope = Envelope(
            id=message_id,
            sender=decision.address,
            original_sender=t.original_sender,
            # one spelling per mailbox: back-off and concurrency are counted by it
            mailbox=(decision.address or sender_cfg.default or t.original_sender).lower(),
            recipients=tuple(t.recipients),
            received_at=now,
            size=size,
            client_address=self.peer_host,
            helo=_printable(self.helo or "", 255),
            auth_user=self.user.name if self.user is not None else None,
            header_from=(summary.from_addresses[0] if summary.from_addresses
                         else summary.from_display),
            subject=summary.subject,
            message_id=summary.message_id,
            mode=mode,
            instance=door.store.instance_id,
        )
        delivery = self.config.delivery
        # a small message is joined here, once: the store writes it and, when it
        # is handed straight to the queue, the provider reads it from memory
        data = (b"".join(spool.chunks(received, header_block))
                if size <= HAND_OFF_BYTES else None)
        body = [data] if data is not None else spool.chunks(received, header_block)
        claim = None
        reserved = mode == "queue" and door.runner is not None and \
            door.runner.reserve(envelope.mailbox)
        try:
            if reserved:
                claim = yield door.store.accept_and_claim(
                    envelope, body, now, now + delivery.lease, door.runner.claim_limit)
            else:
                yield door.store.accept(
                    envelope, body, lease_until=now + delivery.lease if mode == "direct" else None)
        except StoreUnavailable as e:
            log.error("storing a message failed: {why}", why=e)
            return (451, "4.3.0", "Error: temporary storage failure; try again later")
        finally:
            if reserved and claim is None:
                door.runner.unreserve()
        door.message_received(envelope)
        log.info("{id} accepted from {host} user={user} sender=<{sender}> recipients={n} "
                 "size={size}", id=message_id, host=self.peer_host,
                 user=envelope.auth_user, sender=envelope.sender, n=len(envelope.recipients),
                 size=size)
        if mode == "direct":
            reply = yield door.deliver_direct(envelope)
            return reply
        if claim is not None:
            door.runner.take(claim, data)
        else:
            door.wake_queue(envelope.mailbox)
        return (250, "2.0.0", f"Ok: queued as {message_id}")


def _parse_path(rest, keyword):
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


if TYPE_CHECKING:
    from twisted.cred.portal import Portal
    from twisted.internet.interfaces import IReactorTime

    from smtprelay.config import Config
    from smtprelay.metrics import Metrics
    from smtprelay.queue import QueueRunner
    from smtprelay.smtp.auth import Lockout
    from smtprelay.store.interface import IStore
    from smtprelay.tls import ServerContextFactory


class FrontDoor:
    """What all sessions share: configuration, store, lockout, TLS, the queue."""

    def __init__(self, config: "Config", store: "IStore", clock: "IReactorTime",
                 portal: "Portal", lockout: "Lockout",
                 tls_context: "ServerContextFactory | None" = None,
                 runner: "QueueRunner | None" = None, metrics: "Metrics | None" = None) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.portal = portal
        self.lockout = lockout
        self.tls_context = tls_context
        self.runner = runner
        self.metrics = metrics
        self.hostname = config.smtp.hostname
        self.sessions: set[RelaySMTP] = set()
        self.per_address: dict[str, int] = {}  # peer host -> sessions open from it
        self.accepting = True

    def apply(self, config: "Config", tls_context: "ServerContextFactory | None",
              portal: "Portal") -> None:
        """Serve new sessions with a new configuration, TLS context and cred portal
        (each built by the caller, where building may fail).  Sessions in progress
        keep what they started with for their TLS and login; limits read from
        ``config`` apply to them from their next command."""
        self.config = config
        self.hostname = config.smtp.hostname
        self.tls_context = tls_context
        self.portal = portal

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

    def open_session(self, session: "RelaySMTP") -> None:
        was_stressed = self.under_stress
        self.sessions.add(session)
        host = session.peer_host
        self.per_address[host] = self.per_address.get(host, 0) + 1
        if self.under_stress and not was_stressed:
            log.warn("{n} SMTP sessions: under stress, idle sessions now time out after "
                     "{t:.0f}s", n=len(self.sessions), t=self.session_timeout())
            for s in list(self.sessions):
                s.progress()

    def close_session(self, session: "RelaySMTP") -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            host = session.peer_host
            left = self.per_address.get(host, 1) - 1
            if left > 0:
                self.per_address[host] = left
            else:
                self.per_address.pop(host, None)

    def wake_queue(self, mailbox: str) -> None:
        """A message for ``mailbox`` was queued: the runner may claim it."""
        if self.runner is not None:
            self.runner.queued(mailbox)

    def message_received(self, envelope: Envelope) -> None:
        if self.metrics is not None:
            self.metrics.received(envelope)

    def accept_latency(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.accept_latency(seconds)

    @defer.inlineCallbacks
    def deliver_direct(self, envelope: Envelope) -> Generator[Any, Any, tuple[int, str, str]]:
        """Direct mode: the reply waits for the provider (bounded by direct_timeout)."""
        from smtprelay.model import Claim

        claim = Claim(id=envelope.id, sender=envelope.sender, mailbox=envelope.mailbox,
                      recipients=envelope.recipients, age_from=envelope.received_at,
                      size=envelope.size, attempts=0, mode="direct")
        if self.runner is None:
            raise RuntimeError("direct mode without a queue runner")
        transition = yield self.runner.deliver_direct(claim)
        return direct_reply(envelope.id, transition)

    def stop_accepting(self) -> None:
        self.accepting = False
        for session in list(self.sessions):
            session.shutdown()

    def force_close(self) -> None:
        for session in list(self.sessions):
            session.force_shutdown()


def direct_reply(message_id, transition):
    """The SMTP reply for a direct-mode delivery's transition."""
    detail = transition.attempt.detail.replace("\r", " ").replace("\n", " ")[:400]
    if transition.status is Status.SENT:
        return (250, "2.0.0", f"Ok: sent {message_id}")
    results = [r for r, _ in transition.recipient_results.values()]
    if Result.SENT in results:
        # one reply for all recipients: those accepted must not be sent twice
        return (250, "2.0.0", f"Ok: sent {message_id} to {results.count(Result.SENT)} of "
                              f"{len(results)} recipients; {detail}")
    if Result.TEMPORARY in results:
        return (451, _status_in(detail, "4"), detail or "Temporary delivery failure")
    return (554, _status_in(detail, "5"), detail or "Delivery failed")


def _status_in(detail, klass):
    """The enhanced status code a provider's detail carries, in ``klass``."""
    m = re.search(r"\b[245]\.(\d{1,3})\.(\d{1,3})\b", detail)
    if m:
        return f"{klass}.{m.group(1)}.{m.group(2)}"
    if klass == "4" and "within" in detail:
        return "4.4.1"
    return f"{klass}.0.0"


class RelaySMTPFactory(protocol.ServerFactory):
    noisy = False

    def __init__(self, door, implicit_tls=False):
        self.door = door
        self.implicit_tls = implicit_tls

    def buildProtocol(self, addr):
        p = RelaySMTP(self.door, implicit_tls=self.implicit_tls)
        p.factory = self
        return p
