"""The SMTP provider, against real upstream servers on loopback.

Three layers:

- the reading of replies (``smtp.replies``): pure, tested exhaustively;
- the provider with the real reactor (trial) against aiosmtpd (STARTTLS,
  implicit TLS, AUTH, certificates from a trustme CA) and Postfix's
  ``smtp-sink``: bytes on the wire, security, reply mapping, timeouts,
  connection reuse, ``check()``;
- the whole relay (twistd) forwarding through those upstreams, read back
  from its delivery log.
"""

from __future__ import annotations

import base64
import email.message
import email.policy
import io
import os
import smtplib
import tempfile
import time
import warnings
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, error, reactor, task
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python import failure
from twisted.trial import unittest

from smtprelay import config, schedule
from smtprelay.model import Claim, Result, Status
from smtprelay.providers.base import CheckResult, OutgoingMessage
from smtprelay.providers.smtp import SMTPProvider, replies
from smtprelay.providers.smtp.client import UpstreamProtocol
from smtprelay.providers.smtp.errors import (
    BodyStalled,
    ConnectionClosed,
    ConnectionFailed,
    PrematureReply,
    ProtocolViolation,
    ReplyTimeout,
)
from smtprelay.providers.smtp.transaction import path as _path
from tests.fakes.tlsca import TestCA
from tests.relay import RelayProcess, strip_received
from tests.upstream import SmtpSink, Upstream, free_port, silent_listener

PASSWORD = "Sup3r-S3cret-Pw!"
USERS = {"relayuser": PASSWORD}

# ---------------------------------------------------------------------------
# the reading of replies (pure)


@pytest.mark.parametrize("line,parsed", [
    (b"250-SIZE 1000", (250, False, "SIZE 1000")),
    (b"250 2.0.0 Ok\r", (250, True, "2.0.0 Ok")),
    (b"220", (220, True, "")),
    (b"550 caf\xc3\xa9", (550, True, "caf\u00e9")),
])
def test_parse_reply_line(line: bytes, parsed: tuple[int, bool, str]) -> None:
    assert replies.parse_reply_line(line) == parsed


@pytest.mark.parametrize("line", [b"", b"25", b"OK", b"250xOK", b"650 nope", b"099 x", b"2a0 x"])
def test_malformed_reply_lines(line: bytes) -> None:
    with pytest.raises(replies.MalformedReply):
        replies.parse_reply_line(line)


def test_reply_is_one_line_with_code_and_text() -> None:
    r = replies.Reply(550, ("5.1.1 The email account that you tried to reach does not exist.",
                            "5.1.1 Please try double-checking \x1b[31mthe address"))
    assert str(r) == ("550 5.1.1 The email account that you tried to reach does not exist. "
                      "Please try double-checking [31mthe address")
    assert r.enhanced == "5.1.1"
    assert str(replies.Reply(250, ())) == "250"


def test_parse_ehlo_and_choose_auth() -> None:
    r = replies.Reply(250, ("upstream.test", "SIZE 1000", "AUTH=LOGIN", "auth cram-md5 plain login",
                            "STARTTLS", "8BITMIME", "PIPELINING"))
    ext = replies.parse_ehlo(r)
    assert ext["SIZE"] == "1000" and "STARTTLS" in ext and "8BITMIME" in ext
    assert replies.auth_mechanisms(ext) == {"LOGIN", "CRAM-MD5", "PLAIN"}
    assert replies.choose_auth(ext) == "PLAIN"
    assert replies.choose_auth({"AUTH": "LOGIN CRAM-MD5"}) == "LOGIN"
    assert replies.choose_auth({"AUTH": "CRAM-MD5 XOAUTH2"}) is None
    assert replies.choose_auth({}) is None
    assert replies.size_limit(ext) == 1000
    assert replies.size_limit({"SIZE": ""}) is None and replies.size_limit({"SIZE": "0"}) is None


T, P, S = Result.TEMPORARY, Result.PERMANENT, Result.SENT


@pytest.mark.parametrize("code,text,stage,result", [
    (250, "2.1.5 Ok", "rcpt", S),
    (451, "4.2.0 mailbox busy", "rcpt", T),
    (452, "4.5.3 too many recipients", "rcpt", T),
    (550, "5.1.1 unknown user", "rcpt", P),
    (553, "5.7.1 Sender address rejected: not owned by user", "mail", P),  # send-as denied
    (421, "4.3.2 shutting down", "mail", T),
    (530, "5.7.0 Authentication required", "mail", T),  # our configuration, not the message
    (550, "5.7.0 Must issue a STARTTLS command first", "mail", T),
    (535, "5.7.8 Authentication credentials invalid", "auth", T),
    (554, "5.7.1 no SMTP service here", "greeting", T),  # the server refuses us, not the message
    (502, "5.5.1 EHLO not implemented", "ehlo", T),
    (454, "4.7.0 TLS not available", "starttls", T),
    (552, "5.3.4 Message too big", "dot", P),
    (554, "5.7.1 Spam", "dot", P),
    (451, "4.7.1 Greylisted", "dot", T),
    (354, "go ahead", "rcpt", T),  # out of place: the exchange went wrong
])
def test_classify(code: int, text: str, stage: str, result: Result) -> None:
    assert replies.classify(replies.Reply(code, (text,)), stage) is result


def test_combine() -> None:
    same = {"a@x": (S, "250 ok"), "b@x": (S, "250 ok")}
    assert replies.combine(same) == (S, "250 ok")
    partial = {"a@x": (S, "250 ok"), "b@x": (T, "451 4.2.0 busy")}
    assert replies.combine(partial) == (S, "a@x: 250 ok; b@x: 451 4.2.0 busy")
    assert replies.combine({"a@x": (P, "550 no"), "b@x": (T, "451 busy")})[0] is T
    assert replies.combine({"a@x": (P, "550 no"), "b@x": (P, "553 no")})[0] is P


@pytest.mark.parametrize("text,expected", [
    ("2.0.0 Ok: queued as 4XyZ1abc", "4XyZ1abc"),  # Postfix
    ("OK id=1qAbCd-000123-AB", "1qAbCd-000123-AB"),  # Exim
    ("2.6.0 <a1b2@mail.example> [InternalId=1] Queued mail for delivery", "<a1b2@mail.example>"),
    ("Message accepted for delivery", None),
])
def test_queue_id(text: str, expected: str | None) -> None:
    assert replies.queue_id(replies.Reply(250, (text,))) == expected


def test_describe_tls_failures() -> None:
    assert replies.describe_tls_failure(VerificationError(errors=[]), "mx.example") == (
        "TLS: certificate verify failed (hostname mismatch: the certificate is not valid "
        "for mx.example)")
    chain = SSL.Error([("SSL routines", "", "certificate verify failed")])
    assert replies.describe_tls_failure(chain, "mx", "certificate has expired") == (
        "TLS: certificate verify failed (certificate has expired)")
    assert replies.describe_tls_failure(chain, "mx") == "TLS: certificate verify failed"
    version = SSL.Error([("SSL routines", "", "tlsv1 alert protocol version")])
    assert replies.describe_tls_failure(version, "mx") == (
        "TLS: handshake failed: tlsv1 alert protocol version")
    assert replies.is_tls_failure(chain) and not replies.is_tls_failure(error.ConnectionDone())


@pytest.mark.parametrize("exc,expected", [
    (error.ConnectionRefusedError(), "mx:25: connection refused"),
    (error.DNSLookupError("mx"), "cannot resolve mx (DNS lookup failed)"),
    (error.TimeoutError(), "mx:25: no connection within 9s (connect timeout)"),
    (defer.TimeoutError(), "mx:25: no connection within 9s (connect timeout)"),
    (error.ConnectionLost(), "mx:25: connection reset by the server"),
    (error.ConnectionDone(), "mx:25: connection closed by the server"),
])
def test_describe_connection_failures(exc: Exception, expected: str) -> None:
    assert replies.describe_connection_failure(exc, "mx", 25, 9.0) == expected


@given(st.text())
def test_one_line_is_one_bounded_line(text: str) -> None:
    out = replies.one_line(text, 50)
    assert "\r" not in out and "\n" not in out and len(out) <= 50


def test_envelope_paths_cannot_inject_commands() -> None:
    assert _path("") == b"<>"
    assert _path('"odd local"@example.com') == b'<"odd local"@example.com>'
    for bad in ("a@b.c>\r\nRCPT TO:<evil@x", "a@b.c\nDATA", "caf\u00e9@x", "a\x00@b"):
        with pytest.raises(ValueError):
            _path(bad)


# ---------------------------------------------------------------------------
# the protocol alone: a Clock and a StringTransport (what the server says, exactly)


class ProtocolTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.proto = UpstreamProtocol(b"relay.test", self.clock, 10.0)
        # Any: its producer, set by send_body, is typed Optional
        self.transport: Any = StringTransport()
        self.proto.makeConnection(self.transport)
        self.greeting = self.proto.greeting

    def reply_of(self, d: defer.Deferred[replies.Reply]) -> replies.Reply:
        return self.successResultOf(d)

    def test_greeting_then_pipelined_commands_get_their_replies_in_order(self) -> None:
        self.proto.dataReceived(b"220 upstream ESMTP\r\n")
        self.assertEqual(self.reply_of(self.greeting), replies.Reply(220, ("upstream ESMTP",)))
        mail = self.proto.command(b"MAIL FROM:<a@x>", "MAIL FROM")
        rcpt = self.proto.command(b"RCPT TO:<b@x>", "RCPT TO")
        self.assertEqual(self.transport.value(), b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n")
        self.proto.dataReceived(b"250 2.1.0 Ok\r\n550-5.1.1 no such\n550 5.1.1 user\r\n")
        self.assertEqual(str(self.reply_of(mail)), "250 2.1.0 Ok")
        self.assertEqual(str(self.reply_of(rcpt)), "550 5.1.1 no such user")
        self.assertTrue(self.proto.usable)

    def test_silence_fails_the_pending_command_after_the_timeout(self) -> None:
        self.clock.advance(9.9)
        self.assertNoResult(self.greeting)
        self.clock.advance(0.2)
        failure = self.failureResultOf(self.greeting, ReplyTimeout)
        self.assertEqual(str(failure.value), "no reply to the greeting within 10s")
        self.assertTrue(self.transport.disconnecting)

    def test_no_timer_while_idle(self) -> None:
        self.proto.dataReceived(b"220 hi\r\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.proto.command(b"NOOP", "NOOP")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_plaintext_after_the_starttls_reply_is_refused(self) -> None:
        self.proto.dataReceived(b"220 hi\r\n")
        d = self.proto.command(b"STARTTLS", "STARTTLS")
        # a man in the middle appends a fake post-TLS EHLO answer
        self.proto.dataReceived(b"220 2.0.0 go ahead\r\n250-evil\r\n250 AUTH PLAIN\r\n")
        self.failureResultOf(d, ProtocolViolation)
        self.assertTrue(self.transport.disconnecting)

    def test_a_reply_during_the_body_stops_it_at_once(self) -> None:
        self.proto.dataReceived(b"220 hi\r\n")
        d = self.proto.send_body(io.BytesIO((b"x" * 78 + b"\r\n") * 10_000))
        producer = self.transport.producer
        producer.resumeProducing()
        sent = len(self.transport.value())
        self.proto.dataReceived(b"552 5.3.4 too big\r\n")
        failure = self.failureResultOf(d, PrematureReply)
        self.assertEqual(str(failure.value.reply), "552 5.3.4 too big")
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.proto.dot_sent)
        producer.resumeProducing()  # a transport asking for more after all
        self.assertEqual(len(self.transport.value()), sent)

    def test_the_body_deadline_counts_progress_not_total_time(self) -> None:
        self.proto.dataReceived(b"220 hi\r\n")
        body = (b"." * 100 + b"\r\n") * 3000
        d = self.proto.send_body(io.BytesIO(body))
        for _ in range(4):  # slow but steady: 9s per 64 KiB
            self.clock.advance(9)
            self.transport.producer.resumeProducing()
        self.assertNoResult(d)
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        self.assertTrue(self.proto.dot_sent)
        wire = self.transport.value()
        self.assertTrue(wire.endswith(b"\r\n.\r\n"))
        self.assertEqual(wire.count(b"\r\n.\r\n"), 1)
        self.clock.advance(10.1)  # now the reply to the end of data is late
        self.failureResultOf(d, ReplyTimeout)

    def test_a_stalled_body_times_out(self) -> None:
        self.proto.dataReceived(b"220 hi\r\n")
        d = self.proto.send_body(io.BytesIO(b"x\r\n" * 100_000))
        self.transport.producer.resumeProducing()
        self.clock.advance(10.1)
        self.failureResultOf(d, BodyStalled)
        self.assertFalse(self.proto.dot_sent)

    def test_connection_lost_during_the_body_is_not_ambiguous(self) -> None:
        self.proto.dataReceived(b"220 hi\r\n")
        d = self.proto.send_body(io.BytesIO(b"x\r\n" * 100_000))
        self.transport.producer.resumeProducing()
        # what a TCP transport does when the peer resets the connection
        self.transport.producer.stopProducing()
        self.proto.connectionLost(failure.Failure(error.ConnectionLost()))
        f = self.failureResultOf(d, ConnectionClosed)
        self.assertIsInstance(f.value.reason, error.ConnectionLost)
        self.assertEqual(f.value.waiting_for, "the end of data")
        self.assertTrue(f.value.streaming)  # described as "... (not delivered)"
        self.assertFalse(self.proto.dot_sent)

    def test_an_unreadable_stored_message_aborts_without_the_end_of_data(self) -> None:
        class Broken(io.BytesIO):
            def read(self, n: int | None = -1) -> bytes:
                if self.tell() > 0:
                    raise OSError(5, "Input/output error")
                return super().read(n)

        self.proto.dataReceived(b"220 hi\r\n")
        d = self.proto.send_body(Broken(b"x\r\n" * 100_000))
        self.transport.producer.resumeProducing()
        self.transport.producer.resumeProducing()
        f = self.failureResultOf(d, ConnectionFailed)
        self.assertEqual(str(f.value), "cannot read the stored message: Input/output error")
        self.assertTrue(self.transport.disconnecting)
        self.assertNotIn(b"\r\n.\r\n", self.transport.value())

    def test_unsolicited_and_malformed_replies_end_the_connection(self) -> None:
        self.proto.dataReceived(b"220 hi\r\n")
        self.proto.dataReceived(b"250 nobody asked\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.proto.usable)
        other = UpstreamProtocol(b"relay.test", self.clock, 10.0)
        other.makeConnection(StringTransport())
        other.dataReceived(b"hello there\r\n")
        self.failureResultOf(other.greeting, ProtocolViolation)

    def test_connection_lost_fails_every_pending_command(self) -> None:
        self.proto.dataReceived(b"220 hi\r\n")
        a = self.proto.command(b"MAIL FROM:<a@x>", "MAIL FROM")
        b = self.proto.command(b"RCPT TO:<b@x>", "RCPT TO")
        self.proto.connectionLost(failure.Failure(error.ConnectionDone()))
        self.assertEqual(self.failureResultOf(a, ConnectionClosed).value.waiting_for, "MAIL FROM")
        self.failureResultOf(b, ConnectionClosed)
        self.failureResultOf(self.proto.command(b"NOOP", "NOOP"), ConnectionClosed)


# ---------------------------------------------------------------------------
# the provider against real servers (trial, real reactor)

_CA: list[TestCA] = []


def test_ca() -> TestCA:
    if not _CA:
        _CA.append(TestCA(tempfile.mkdtemp(prefix="smtp-provider-ca-")))
    return _CA[0]


test_ca.__test__ = False  # type: ignore[attr-defined]


def message(body: bytes, sender: str = "app@example.com",
            recipients: tuple[str, ...] | list[str] = ("to@example.net",),
            id: str = "M1") -> OutgoingMessage:
    return OutgoingMessage(id=id, sender=sender, mailbox=sender or "relay@example.com",
                           recipients=tuple(recipients), size=len(body), body=io.BytesIO(body))


def rich_message() -> bytes:
    """Multipart, 8-bit text, a binary attachment, an inline image, custom headers."""
    m = email.message.EmailMessage(policy=email.policy.SMTP)
    m["From"] = "App <app@example.com>"
    m["To"] = "to@example.net"
    m["Subject"] = "Rapport \u00e9t\u00e9 \u2013 gr\u00fc\u00dfe"
    m["Message-ID"] = "<report-1@app.example.com>"
    m["X-Custom"] = "kept as is"
    m.set_content("Bonjour,\n.ligne qui commence par un point\n..deux\n.\nfin \u00e9\u00e8\n",
                  cte="8bit")
    m.add_alternative("<p>Gr\u00fc\u00dfe <img src=\"cid:logo\"></p>\n", subtype="html", cte="8bit")
    alternative: Any = m.get_payload()
    alternative[1].add_related(b"\x89PNG\r\n\x1a\n" + os.urandom(3000), "image", "png",
                               cid="<logo>")
    m.add_attachment(os.urandom(50_000), maintype="application", subtype="octet-stream",
                     filename="data.bin")
    data = m.as_bytes()
    assert b"\r\n" in data and b"\xc3\xa9" in data
    return data


def dotted_body(size: int, boundary: int = 16384) -> bytes:
    """A message whose every ``boundary``-th octet starts a line beginning with ".",
    among them ".", ".." and a whole forged transaction after a lone "."."""
    kinds = [
        b".\r\n",
        b"..\r\n",
        b".\r\nMAIL FROM:<forged@evil.test>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
        b"Subject: forged\r\n\r\nsmuggled\r\n.\r\n",
        b". a line with a leading dot\r\n",
        b"...\r\n",
    ]
    out = bytearray(b"From: app@example.com\r\nSubject: dots\r\n\r\n")
    k = 0
    while len(out) < size:
        target = (len(out) // boundary + 1) * boundary
        if target - len(out) < 2:
            target += boundary
        gap = target - len(out)
        while gap > 80:
            out += b"x" * 76 + b"\r\n"
            gap -= 78
        out += b"y" * (gap - 2) + b"\r\n"
        out += kinds[k % len(kinds)]
        k += 1
    for offset in range(boundary, len(out), boundary):
        assert out[offset - 2:offset + 1] == b"\r\n.", offset
    return bytes(out)


def postfix_fold(line: bytes, limit: int = 998) -> bytes:
    """What Postfix's smtp_line_length_limit makes of one long line (no CRLF)."""
    pieces = [line[:limit]]
    rest = line[limit:]
    while rest:
        pieces.append(b" " + rest[:limit - 1])
        rest = rest[limit - 1:]
    return b"\r\n".join(pieces)


def wait_until(predicate: Callable[[], object], timeout: float = 5.0,
               interval: float = 0.02) -> defer.Deferred[bool]:
    """Deferred: fires True once ``predicate()`` holds (False after ``timeout``)."""
    deadline = time.monotonic() + timeout

    @defer.inlineCallbacks
    def loop() -> Generator[defer.Deferred[None], None, bool]:
        while not predicate():
            if time.monotonic() > deadline:
                return False
            yield task.deferLater(reactor, interval, lambda: None)
        return True

    return loop()


class ProviderTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.ca = test_ca()

    def upstream(self, **kw: Any) -> Upstream:
        up = Upstream(self.ca, **kw).start()
        self.addCleanup(up.stop)
        return up

    def sink(self, *options: str) -> SmtpSink:
        s = SmtpSink(tempfile.mkdtemp(prefix="smtp-sink-"), *options).start()
        self.addCleanup(s.stop)
        return s

    def provider(self, port: int | None, concurrency: int = 4, idle_seconds: float = 5.0,
                 **keys: Any) -> SMTPProvider:
        document = {
            "smtp": {"hostname": "relay.test"},
            "provider": {"type": "smtp", "host": "127.0.0.1", "port": port, "timeout": "5s",
                         **keys},
            "delivery": {"concurrency": concurrency},
        }
        p = SMTPProvider(config.parse(document, "/"), reactor, idle_seconds=idle_seconds)
        self.addCleanup(p.stop)
        return p

    def secure(self, up: Upstream, **keys: Any) -> SMTPProvider:
        """A provider for ``up`` with STARTTLS (or implicit TLS), the CA and the right password."""
        keys.setdefault("security", "tls" if up.mode == "tls" else "starttls")
        keys.setdefault("username", "relayuser")
        keys.setdefault("password", PASSWORD)
        keys.setdefault("ca_file", str(self.ca.ca_path))
        return self.provider(up.port, **keys)

    # -- the bytes ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_body_arrives_byte_exact_with_attachments_and_8bit_text(
            self) -> Generator[Any, Any, None]:
        up = self.upstream(users=USERS)
        body = rich_message()
        outcome = yield self.secure(up).send(message(body))
        self.assertIs(outcome.result, Result.SENT, outcome)
        self.assertEqual(outcome.detail, "250 2.0.0 Ok: queued as Q1")
        self.assertEqual(outcome.provider_id, "Q1")
        [got] = up.messages
        self.assertEqual(got.content, body)
        self.assertTrue(got.tls)
        self.assertEqual(got.auth, b"relayuser")
        [(address, _, options)] = up.mail_commands
        self.assertEqual(address, "app@example.com")
        self.assertIn("BODY=8BITMIME", options)
        self.assertIn(f"SIZE={len(body)}", options)

    @defer.inlineCallbacks
    def test_envelope_decides_who_receives(self) -> Generator[Any, Any, None]:
        # Bcc-only recipients are envelope recipients; an address only in a header is not
        up = self.upstream(users=USERS)
        body = (b"From: app@example.com\r\nTo: to@example.net\r\nCc: header-only@example.net\r\n"
                b"Subject: x\r\n\r\nhello\r\n")
        outcome = yield self.secure(up).send(
            message(body, recipients=("to@example.net", "hidden@example.org")))
        self.assertIs(outcome.result, Result.SENT)
        [got] = up.messages
        self.assertEqual(got.rcpt_tos, ["to@example.net", "hidden@example.org"])
        self.assertEqual(up.rcpt_commands, ["to@example.net", "hidden@example.org"])
        self.assertEqual(got.content, body)  # no Bcc header added, nothing removed

    @defer.inlineCallbacks
    def test_null_sender_goes_out_as_null(self) -> Generator[Any, Any, None]:
        up = self.upstream(users=USERS)
        outcome = yield self.secure(up).send(message(b"Subject: bounce\r\n\r\nx\r\n", sender=""))
        self.assertIs(outcome.result, Result.SENT)
        self.assertEqual(up.mail_commands[0][0], "<>")

    @defer.inlineCallbacks
    def test_dots_at_every_16k_boundary_cannot_end_data_early(self) -> Generator[Any, Any, None]:
        body = dotted_body(4_000_000)
        up = self.upstream(users=USERS)
        outcome = yield self.secure(up).send(message(body))
        self.assertIs(outcome.result, Result.SENT, outcome)
        self.assertEqual(len(up.messages), 1)
        self.assertEqual(len(up.mail_commands), 1)  # no forged second transaction
        self.assertEqual(up.messages[0].content, body)
        self.assertNotIn("victim@example.net", up.rcpt_commands)

    @defer.inlineCallbacks
    def test_dots_at_every_16k_boundary_reach_postfix_smtp_sink_intact(
            self) -> Generator[Any, Any, None]:
        body = dotted_body(3_000_000)
        sink = self.sink()
        outcome = yield self.provider(sink.port, security="none").send(message(body))
        self.assertIs(outcome.result, Result.SENT, outcome)
        [got] = sink.messages()
        self.assertEqual(got.mail_args.split()[0], "<app@example.com>")
        self.assertEqual(got.rcpt_args, ["<to@example.net>"])
        self.assertEqual(got.content, body.replace(b"\r\n", b"\n"))

    @defer.inlineCallbacks
    def test_long_lines_are_folded_as_postfix_does(self) -> Generator[Any, Any, None]:
        lines = [b"a" * 2500, b"b" * 998, b"c" * 999, b"." + b"d" * 1499, b"short"]
        body = b"Subject: long\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
        expected = b"Subject: long\r\n\r\n" + b"\r\n".join(postfix_fold(x) for x in lines) + b"\r\n"
        # aiosmtpd refuses any wire line over 1001 octets (998 + a stuffing dot + CRLF)
        up = self.upstream(users=USERS)
        outcome = yield self.secure(up).send(message(body))
        self.assertIs(outcome.result, Result.SENT, outcome)
        self.assertEqual(up.messages[0].content, expected)
        sink = self.sink()
        outcome = yield self.provider(sink.port, security="none").send(message(body))
        self.assertIs(outcome.result, Result.SENT, outcome)
        self.assertEqual(sink.messages()[0].content, expected.replace(b"\r\n", b"\n"))

    # -- security ---------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_starttls_required_but_not_offered_sends_nothing(self) -> Generator[Any, Any, None]:
        up = self.upstream(mode="none", users=USERS, auth_plaintext=True)
        outcome = yield self.provider(up.port, security="starttls", username="relayuser",
                                      password=PASSWORD).send(message(b"Subject: x\r\n\r\nx\r\n"))
        self.assertIs(outcome.result, Result.TEMPORARY)
        self.assertEqual(outcome.detail,
                         f'127.0.0.1:{up.port} does not offer STARTTLS and security = "starttls": '
                         "nothing was sent (no downgrade to plaintext)")
        self.assertEqual(up.mail_commands, [])
        self.assertEqual(up.auth_attempts, [])

    @defer.inlineCallbacks
    def test_wrong_certificate_host_sends_nothing_unless_verification_is_off(
            self) -> Generator[Any, Any, None]:
        cert = self.ca.issue("other.example")
        for mode in ("starttls", "tls"):
            up = self.upstream(mode=mode, users=USERS, cert=cert)
            outcome = yield self.secure(up).send(message(b"Subject: x\r\n\r\nx\r\n"))
            self.assertIs(outcome.result, Result.TEMPORARY)
            self.assertEqual(outcome.detail, "TLS: certificate verify failed (hostname mismatch: "
                                             "the certificate is not valid for 127.0.0.1)")
            self.assertEqual((up.mail_commands, up.auth_attempts), ([], []))
            outcome = yield self.secure(up, verify_certificate=False).send(
                message(b"Subject: x\r\n\r\nx\r\n"))
            self.assertIs(outcome.result, Result.SENT, outcome)
            self.assertEqual(len(up.messages), 1)

    @defer.inlineCallbacks
    def test_certificate_from_an_unknown_ca_sends_nothing(self) -> Generator[Any, Any, None]:
        up = self.upstream(users=USERS)
        p = self.provider(up.port, security="starttls", username="relayuser", password=PASSWORD)
        outcome = yield p.send(message(b"Subject: x\r\n\r\nx\r\n"))
        self.assertIs(outcome.result, Result.TEMPORARY)
        self.assertEqual(outcome.detail,
                         "TLS: certificate verify failed (unable to get local issuer certificate)")
        self.assertEqual((up.mail_commands, up.auth_attempts), ([], []))

    @defer.inlineCallbacks
    def test_implicit_tls(self) -> Generator[Any, Any, None]:
        up = self.upstream(mode="tls", users=USERS)
        outcome = yield self.secure(up).send(message(b"Subject: x\r\n\r\nx\r\n"))
        self.assertIs(outcome.result, Result.SENT, outcome)
        self.assertTrue(up.messages[0].tls)
        self.assertEqual([a[2] for a in up.auth_attempts], [True])

    @defer.inlineCallbacks
    def test_tls_below_1_2_is_refused(self) -> Generator[Any, Any, None]:
        import ssl

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old = (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1)
        up = self.upstream(users=USERS, tls_versions=old)
        outcome = yield self.secure(up).send(message(b"Subject: x\r\n\r\nx\r\n"))
        self.assertIs(outcome.result, Result.TEMPORARY)
        self.assertTrue(outcome.detail.startswith("TLS: handshake failed"), outcome.detail)
        self.assertEqual((up.mail_commands, up.auth_attempts), ([], []))

    @defer.inlineCallbacks
    def test_a_server_without_esmtp_gets_helo_only_when_nothing_needs_esmtp(
            self) -> Generator[Any, Any, None]:
        sink = self.sink("-e")  # smtp-sink: "Do not announce ESMTP support"
        outcome = yield self.provider(sink.port, security="none").send(
            message(b"Subject: x\r\n\r\nx\r\n"))
        self.assertIs(outcome.result, Result.SENT, outcome)
        self.assertEqual(sink.messages()[0].helo, "relay.test")
        outcome = yield self.provider(sink.port, security="none", username="relayuser",
                                      password=PASSWORD).send(message(b"Subject: x\r\n\r\nx\r\n"))
        self.assertIs(outcome.result, Result.TEMPORARY)
        self.assertTrue(outcome.detail.startswith(f"EHLO refused by 127.0.0.1:{sink.port}: 5"),
                        outcome.detail)
        self.assertEqual(len(sink.messages()), 1)

    @defer.inlineCallbacks
    def test_wrong_password_is_temporary_with_the_upstream_reply(self) -> Generator[Any, Any, None]:
        up = self.upstream(users=USERS)
        outcome = yield self.secure(up, password="wrong").send(message(b"Subject: x\r\n\r\nx\r\n"))
        self.assertIs(outcome.result, Result.TEMPORARY)
        self.assertEqual(outcome.detail, "authentication as relayuser failed: "
                                         "535 5.7.8 Authentication credentials invalid")
        self.assertEqual(up.mail_commands, [])
        self.assertEqual([(m, tls, ok) for m, _, tls, ok in up.auth_attempts],
                         [("PLAIN", True, False)])

    @defer.inlineCallbacks
    def test_auth_waits_for_tls_even_when_offered_in_plaintext(self) -> Generator[Any, Any, None]:
        up = self.upstream(users=USERS, auth_plaintext=True)
        outcome = yield self.secure(up).send(message(b"Subject: x\r\n\r\nx\r\n"))
        self.assertIs(outcome.result, Result.SENT, outcome)
        self.assertEqual([tls for _, _, tls, _ in up.auth_attempts], [True])

    @defer.inlineCallbacks
    def test_security_none_authenticates_in_plaintext_when_asked_to(
            self) -> Generator[Any, Any, None]:
        up = self.upstream(mode="none", users=USERS, auth_plaintext=True)
        outcome = yield self.provider(up.port, security="none", username="relayuser",
                                      password=PASSWORD).send(message(b"Subject: x\r\n\r\nx\r\n"))
        self.assertIs(outcome.result, Result.SENT, outcome)
        self.assertEqual([tls for _, _, tls, _ in up.auth_attempts], [False])

    @defer.inlineCallbacks
    def test_username_set_but_no_auth_offered_sends_nothing(self) -> Generator[Any, Any, None]:
        up = self.upstream()  # STARTTLS, no AUTH
        outcome = yield self.secure(up).send(message(b"Subject: x\r\n\r\nx\r\n"))
        self.assertIs(outcome.result, Result.TEMPORARY)
        self.assertEqual(outcome.detail, f"127.0.0.1:{up.port} offers no AUTH; provider.username "
                                         "is set, so nothing is sent unauthenticated")
        self.assertEqual(up.mail_commands, [])

    @defer.inlineCallbacks
    def test_auth_login_when_plain_is_not_offered(self) -> Generator[Any, Any, None]:
        up = self.upstream(users=USERS, exclude_auth=["PLAIN"])
        outcome = yield self.secure(up).send(message(b"Subject: x\r\n\r\nx\r\n"))
        self.assertIs(outcome.result, Result.SENT, outcome)
        self.assertEqual([(m, ok) for m, _, _, ok in up.auth_attempts], [("LOGIN", True)])

    @defer.inlineCallbacks
    def test_no_secret_in_details_or_log_events(self) -> Generator[Any, Any, None]:
        texts: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            texts.append(formatEvent(event) or "")
            texts.append(repr(event))

        observer = cast(ILogObserver, observe)  # a plain function serves, as Twisted's own do
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        up = self.upstream(users={"relayuser": "something-else"})
        details = []
        for exclude in ([], ["PLAIN"]):
            up2 = self.upstream(users=USERS, exclude_auth=exclude)
            for target in (up, up2):
                p = self.secure(target, idle_seconds=0)
                outcome = yield p.send(message(b"Subject: x\r\n\r\nx\r\n"))
                details.append(outcome.detail)
                result = yield p.check()
                details += [s.detail for s in result.steps]
        forms = [PASSWORD, base64.b64encode(PASSWORD.encode()).decode(),
                 base64.b64encode(b"\0relayuser\0" + PASSWORD.encode()).decode()]
        for text in details + texts:
            for form in forms:
                self.assertNotIn(form, text)

    # -- replies ------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_recipients_refused_and_accepted_in_one_transaction(self) -> Generator[Any, Any, None]:
        yield self.check_recipients_refused_and_accepted(pipelining=False)

    @defer.inlineCallbacks
    def test_recipients_refused_and_accepted_in_one_transaction_pipelined(
            self) -> Generator[Any, Any, None]:
        yield self.check_recipients_refused_and_accepted(pipelining=True)

    @defer.inlineCallbacks
    def check_recipients_refused_and_accepted(self,
                                              pipelining: bool) -> Generator[Any, Any, None]:
        up = self.upstream(users=USERS, pipelining=pipelining)
        up.rcpt_reply = {
            "busy@example.net": "451 4.2.0 <busy@example.net>: mailbox busy",
            "gone@example.net": "550 5.1.1 <gone@example.net>: Recipient address rejected",
        }.get
        recipients = ("ok@example.net", "busy@example.net", "gone@example.net")
        outcome = yield self.secure(up).send(message(b"Subject: x\r\n\r\nx\r\n",
                                                     recipients=recipients))
        self.assertEqual(outcome.recipients, {
            "ok@example.net": (Result.SENT, "250 2.0.0 Ok: queued as Q1"),
            "busy@example.net": (Result.TEMPORARY, "451 4.2.0 <busy@example.net>: mailbox busy"),
            "gone@example.net": (Result.PERMANENT,
                                 "550 5.1.1 <gone@example.net>: Recipient address rejected"),
        })
        self.assertIs(outcome.result, Result.SENT)
        self.assertEqual(up.messages[0].rcpt_tos, ["ok@example.net"])
        # the queue's decision: only the temporarily refused recipient stays pending
        claim = Claim("M1", "app@example.com", "app@example.com", recipients, 0.0, 10, 0)
        t = schedule.decide(claim, outcome, 100.0, (60.0,), 86400.0)
        self.assertEqual(t.status, Status.DEFERRED)
        self.assertEqual({a for a, (r, _) in t.recipient_results.items() if r is Result.TEMPORARY},
                         {"busy@example.net"})
        self.assertEqual(t.attempt.outcome, "partial")

    @defer.inlineCallbacks
    def test_all_recipients_refused_sends_no_data(self) -> Generator[Any, Any, None]:
        up = self.upstream(users=USERS)
        up.rcpt_reply = lambda a: f"550 5.1.1 <{a}>: Recipient address rejected"
        p = self.secure(up)
        outcome = yield p.send(message(b"Subject: x\r\n\r\nx\r\n",
                                       recipients=("a@example.net", "b@example.net")))
        self.assertIs(outcome.result, Result.PERMANENT)
        self.assertEqual(outcome.detail,
                         "a@example.net: 550 5.1.1 <a@example.net>: Recipient address rejected; "
                         "b@example.net: 550 5.1.1 <b@example.net>: Recipient address rejected")
        self.assertEqual((up.messages, up.refused), ([], []))
        # the connection is still good for the next message (RSET first)
        up.rcpt_reply = None
        outcome = yield p.send(message(b"Subject: y\r\n\r\ny\r\n"))
        self.assertIs(outcome.result, Result.SENT, outcome)
        self.assertEqual(up.connections, 1)

    @defer.inlineCallbacks
    def test_sender_refused(self) -> Generator[Any, Any, None]:
        for pipelining in (False, True):
            yield self.check_sender_refused(pipelining)

    @defer.inlineCallbacks
    def check_sender_refused(self, pipelining: bool) -> Generator[Any, Any, None]:
        up = self.upstream(users=USERS, pipelining=pipelining)
        p = self.secure(up)
        for reply, result in [
            ("553 5.7.1 <app@example.com>: Sender address rejected: not owned by user",
             Result.PERMANENT),
            ("451 4.3.0 Temporary lookup failure", Result.TEMPORARY),
            ("530 5.7.0 Authentication required", Result.TEMPORARY),
        ]:
            up.mail_reply = lambda a, reply=reply: reply
            outcome = yield p.send(message(b"Subject: x\r\n\r\nx\r\n",
                                           recipients=("a@example.net", "b@example.net")))
            self.assertIs(outcome.result, result, reply)
            self.assertEqual(outcome.detail, f"sender <app@example.com> refused: {reply}")
            self.assertEqual(set(r for r, _ in outcome.recipients.values()), {result})
        self.assertEqual(up.messages, [])

    @defer.inlineCallbacks
    def test_end_of_data_replies(self) -> Generator[Any, Any, None]:
        up = self.upstream(users=USERS)
        p = self.secure(up)
        for reply, result in [("451 4.7.1 Greylisted, try again later", Result.TEMPORARY),
                              ("554 5.7.1 Message rejected as spam", Result.PERMANENT)]:
            up.data_reply = lambda got, reply=reply: reply
            outcome = yield p.send(message(b"Subject: x\r\n\r\nx\r\n"))
            self.assertIs(outcome.result, result)
            self.assertEqual(outcome.detail, reply)
            self.assertFalse(outcome.ambiguous)

    @defer.inlineCallbacks
    def test_size_over_the_upstream_limit_is_permanent_without_sending(
            self) -> Generator[Any, Any, None]:
        up = self.upstream(users=USERS, data_size_limit=1000)
        outcome = yield self.secure(up).send(message(b"Subject: x\r\n\r\n" + b"x" * 5000 + b"\r\n"))
        self.assertIs(outcome.result, Result.PERMANENT)
        self.assertIn("exceeds the 1000 bytes", outcome.detail)
        self.assertEqual(up.mail_commands, [])

    # -- failures of the connection -------------------------------------------------------------

    @defer.inlineCallbacks
    def test_dropped_after_the_final_dot_is_ambiguous_and_sent_again(
            self) -> Generator[Any, Any, None]:
        up = self.upstream(users=USERS)
        up.drop_after_dot = 1
        p = self.secure(up)
        body = b"Subject: x\r\n\r\nonce or twice\r\n"
        outcome = yield p.send(message(body))
        self.assertIs(outcome.result, Result.TEMPORARY)
        self.assertTrue(outcome.ambiguous)
        self.assertIn("may have been delivered", outcome.detail)
        self.assertIn("waiting for the reply to the end of data", outcome.detail)
        self.assertEqual([d.content for d in up.dropped], [body])
        outcome = yield p.send(message(body))  # the queue's retry: at-least-once
        self.assertIs(outcome.result, Result.SENT, outcome)
        self.assertEqual([m.content for m in up.messages], [body])

    @defer.inlineCallbacks
    def test_postfix_disconnecting_after_the_final_dot_is_ambiguous(
            self) -> Generator[Any, Any, None]:
        sink = self.sink("-q", ".")
        outcome = yield self.provider(sink.port, security="none").send(
            message(b"Subject: x\r\n\r\nx\r\n"))
        self.assertIs(outcome.result, Result.TEMPORARY)
        self.assertTrue(outcome.ambiguous)

    @defer.inlineCallbacks
    def test_no_reply_after_the_final_dot_is_ambiguous(self) -> Generator[Any, Any, None]:
        up = self.upstream(users=USERS)
        up.data_delay = 4
        outcome = yield self.secure(up, timeout="1s").send(message(b"Subject: x\r\n\r\nx\r\n"))
        self.assertIs(outcome.result, Result.TEMPORARY)
        self.assertTrue(outcome.ambiguous)
        self.assertIn(f"127.0.0.1:{up.port}: no reply to the end of data within 1s",
                      outcome.detail)

    @defer.inlineCallbacks
    def test_reply_before_the_end_of_data_stops_the_body(self) -> Generator[Any, Any, None]:
        # smtp-sink -A: a 550 right after the 354, then it reads nothing more; every
        # octet we sent after that would be taken for a command by a real server
        sink = self.sink("-A", "0")
        body = b"Subject: big\r\n\r\n" + (b"z" * 78 + b"\r\n") * 100_000
        outcome = yield self.provider(sink.port, security="none").send(message(body))
        self.assertIs(outcome.result, Result.PERMANENT, outcome)
        self.assertTrue(outcome.detail.startswith("550 "), outcome.detail)
        self.assertIn("(before the end of the message)", outcome.detail)
        self.assertFalse(outcome.ambiguous)

    @defer.inlineCallbacks
    def test_silent_upstream_times_out(self) -> Generator[Any, Any, None]:
        s = silent_listener()
        self.addCleanup(s.close)
        start = time.monotonic()
        outcome = yield self.provider(s.getsockname()[1], timeout="1s").send(
            message(b"Subject: x\r\n\r\nx\r\n"))
        self.assertIs(outcome.result, Result.TEMPORARY)
        self.assertEqual(outcome.detail,
                         f"127.0.0.1:{s.getsockname()[1]}: no reply to the greeting within 1s")
        self.assertFalse(outcome.ambiguous)
        self.assertLess(time.monotonic() - start, 4)

    @defer.inlineCallbacks
    def test_connection_refused_and_unknown_host(self) -> Generator[Any, Any, None]:
        port = free_port()
        outcome = yield self.provider(port).send(message(b"Subject: x\r\n\r\nx\r\n"))
        self.assertEqual((outcome.result, outcome.detail),
                         (Result.TEMPORARY, f"127.0.0.1:{port}: connection refused"))
        document = {"provider": {"type": "smtp", "host": "no-such-host.invalid", "timeout": "3s"}}
        p = SMTPProvider(config.parse(document, "/"), reactor)
        self.addCleanup(p.stop)
        outcome = yield p.send(message(b"Subject: x\r\n\r\nx\r\n"))
        self.assertIs(outcome.result, Result.TEMPORARY)
        self.assertIn(outcome.detail, ("cannot resolve no-such-host.invalid (DNS lookup failed)",
                                       "no-such-host.invalid:587: no connection within 3s "
                                       "(connect timeout)"))

    # -- connections ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_an_authenticated_connection_is_reused_then_closed_when_idle(
            self) -> Generator[Any, Any, None]:
        up = self.upstream(users=USERS)
        p = self.secure(up, idle_seconds=0.5)
        for n in range(3):
            outcome = yield p.send(message(b"Subject: %d\r\n\r\nx\r\n" % n, id=f"M{n}"))
            self.assertIs(outcome.result, Result.SENT, outcome)
        self.assertEqual((up.connections, len(up.auth_attempts), len(up.messages)), (1, 1, 3))
        self.assertTrue((yield wait_until(lambda: up.open_now == 0)))
        self.assertEqual(p._pool.open_connections, 0)

    @defer.inlineCallbacks
    def test_a_stale_reused_connection_does_not_cost_the_message_an_attempt(
            self) -> Generator[Any, Any, None]:
        up = self.upstream(users=USERS)
        p = self.secure(up)
        outcome = yield p.send(message(b"Subject: 1\r\n\r\nx\r\n"))
        self.assertIs(outcome.result, Result.SENT)
        up.drop_connections()  # the upstream closed it while it sat idle
        outcome = yield p.send(message(b"Subject: 2\r\n\r\nx\r\n"))
        self.assertIs(outcome.result, Result.SENT, outcome)
        self.assertEqual((up.connections, len(up.messages)), (2, 2))

    @defer.inlineCallbacks
    def test_at_most_concurrency_connections(self) -> Generator[Any, Any, None]:
        up = self.upstream(users=USERS)
        up.data_delay = 0.3
        p = self.secure(up, concurrency=2)
        sends = [p.send(message(b"Subject: %d\r\n\r\nx\r\n" % n, id=f"M{n}")) for n in range(5)]
        outcomes = yield defer.gatherResults(sends)
        self.assertEqual([o.result for o in outcomes], [Result.SENT] * 5)
        self.assertEqual(up.max_open, 2)
        self.assertEqual(len(up.messages), 5)

    @defer.inlineCallbacks
    def test_cancelled_send_aborts_its_connection(self) -> Generator[Any, Any, None]:
        up = self.upstream(users=USERS)
        up.data_delay = 5
        p = self.secure(up)
        d = p.send(message(b"Subject: x\r\n\r\nx\r\n"))
        yield wait_until(lambda: up.mail_commands)
        d.cancel()  # what the queue does when its cap on a call expires
        with self.assertRaises(defer.CancelledError):
            yield d
        self.assertTrue((yield wait_until(lambda: p._pool.open_connections == 0)))

    @defer.inlineCallbacks
    def test_stop_closes_idle_connections(self) -> Generator[Any, Any, None]:
        up = self.upstream(users=USERS)
        p = self.secure(up, idle_seconds=60)
        yield p.send(message(b"Subject: x\r\n\r\nx\r\n"))
        self.assertEqual(p._pool.idle, 1)
        yield p.stop()
        self.assertEqual(p._pool.open_connections, 0)
        self.assertTrue((yield wait_until(lambda: up.open_now == 0)))

    @defer.inlineCallbacks
    def test_unusable_ca_file_is_reported_and_nothing_is_sent(self) -> Generator[Any, Any, None]:
        up = self.upstream(users=USERS)
        bad = os.path.join(tempfile.mkdtemp(), "not-a-ca.pem")
        with open(bad, "w") as f:
            f.write("this is not PEM\n")
        p = self.secure(up, ca_file=bad)
        self.assertEqual(len(p.warnings()), 1)
        self.assertTrue(p.warnings()[0].startswith(f"TLS: cannot use provider.ca_file {bad}"))
        outcome = yield p.send(message(b"Subject: x\r\n\r\nx\r\n"))
        self.assertEqual((outcome.result, outcome.detail), (Result.TEMPORARY, p.warnings()[0]))
        result = yield p.check()
        self.assertFalse(result.ok)
        self.assertEqual(up.connections, 0)

    # -- check() -----------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_check_good_configuration(self) -> Generator[Any, Any, None]:
        up = self.upstream(users=USERS)
        result = yield self.secure(up).check()
        self.assertTrue(result.ok, result)
        connect, tls_step, auth = result.steps
        self.assertEqual([s.name for s in result.steps], ["connect", "tls", "auth"])
        self.assertTrue(connect.detail.startswith(f"127.0.0.1:{up.port}: 220 upstream.test "),
                        connect.detail)
        self.assertRegex(tls_step.detail, r"^STARTTLS, TLSv1\.[23] \S+, certificate verified for "
                                          r"127\.0\.0\.1$")
        self.assertEqual(auth.detail,
                         "AUTH PLAIN as relayuser: 235 2.7.0 Authentication successful")
        self.assertEqual(up.mail_commands, [])
        self.assertTrue((yield wait_until(lambda: up.open_now == 0)))

    @defer.inlineCallbacks
    def test_check_bad_configurations(self) -> Generator[Any, Any, None]:
        def summary(result: CheckResult) -> list[tuple[str, bool]]:
            return [(s.name, s.ok) for s in result.steps]

        up = self.upstream(users=USERS)
        result = yield self.secure(up, password="wrong").check()
        self.assertEqual(summary(result), [("connect", True), ("tls", True), ("auth", False)])
        self.assertEqual(result.steps[2].detail, "authentication as relayuser failed: "
                                                 "535 5.7.8 Authentication credentials invalid")

        plain = self.upstream(mode="none", users=USERS, auth_plaintext=True)
        result = yield self.secure(plain).check()
        self.assertEqual(summary(result), [("connect", True), ("tls", False), ("auth", False)])
        self.assertIn("does not offer STARTTLS", result.steps[1].detail)
        self.assertEqual(result.steps[2].detail, "not attempted (tls failed)")

        result = yield self.provider(free_port()).check()
        self.assertEqual(summary(result), [("connect", False), ("tls", False), ("auth", False)])
        self.assertIn("connection refused", result.steps[0].detail)

        wrong_host = self.upstream(mode="tls", users=USERS, cert=self.ca.issue("other.example"))
        result = yield self.secure(wrong_host).check()
        self.assertEqual(summary(result), [("connect", True), ("tls", False), ("auth", False)])
        self.assertIn("hostname mismatch", result.steps[1].detail)

        # the security mode does not match the port
        result = yield self.secure(plain, security="tls").check()
        self.assertEqual(summary(result), [("connect", True), ("tls", False), ("auth", False)])
        self.assertTrue(result.steps[1].detail.startswith("TLS: handshake failed"),
                        result.steps[1].detail)
        implicit = self.upstream(mode="tls", users=USERS)
        result = yield self.secure(implicit, security="starttls", timeout="1s").check()
        self.assertEqual(summary(result), [("connect", False), ("tls", False), ("auth", False)])
        self.assertEqual(result.steps[0].detail,
                         f"127.0.0.1:{implicit.port}: no reply to the greeting within 1s")

        result = yield self.provider(plain.port, security="none").check()
        self.assertTrue(result.ok)
        self.assertEqual([s.detail for s in result.steps[1:]],
                         ['not used (security = "none")', "not used (no provider.username)"])
        self.assertEqual(plain.mail_commands, [])


# ---------------------------------------------------------------------------
# the whole relay (twistd) forwarding to a real upstream


@pytest.fixture
def smtp_relay(tmp_path: Path, ca: TestCA) -> Iterator[Callable[..., RelayProcess]]:
    """smtp_relay(upstream, **provider_keys) -> a running relay whose provider is ``upstream``."""
    relays: list[RelayProcess] = []

    def start(upstream: Upstream | SmtpSink, name: str = "relay",
              **keys: Any) -> RelayProcess:
        provider: dict[str, Any] = {"type": "smtp", "host": "127.0.0.1", "port": upstream.port,
                                    "timeout": "5s"}
        mode = getattr(upstream, "mode", "none")
        if mode != "none":
            provider.update(security="tls" if mode == "tls" else "starttls",
                            username="relayuser", password=PASSWORD, ca_file=str(ca.ca_path))
        else:
            provider["security"] = "none"
        provider.update(keys)
        relay = RelayProcess(tmp_path / name)
        relay.config["provider"] = provider
        relays.append(relay)
        return relay.start()

    yield start
    for r in relays:
        r.stop()


@pytest.fixture
def upstream(ca: TestCA) -> Iterator[Callable[..., Upstream]]:
    started: list[Upstream] = []

    def start(**kw: Any) -> Upstream:
        up = Upstream(ca, **kw).start()
        started.append(up)
        return up

    yield start
    for up in started:
        up.stop()


def submit(relay: RelayProcess, body: bytes, sender: str = "app@example.com",
           recipients: tuple[str, ...] = ("to@example.net",)) -> str:
    """Send through the relay with smtplib; -> the relay's message id."""
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail(sender)
        for r in recipients:
            code, _ = s.rcpt(r)
            assert code == 250
        code, text = s.data(body)
        assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


def attempts(relay: RelayProcess, message_id: str) -> list[tuple[Any, ...]]:
    return relay.query("SELECT outcome, detail FROM attempts WHERE message_id = ? ORDER BY at",
                       (message_id,))


def wait_attempts(relay: RelayProcess, message_id: str, n: int,
                  timeout: float = 20) -> list[tuple[Any, ...]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = attempts(relay, message_id)
        if len(rows) >= n:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} attempts: {attempts(relay, message_id)}\n"
                         f"{relay.log()[-3000:]}")


@pytest.mark.slow
def test_relay_forwards_through_starttls_and_auth(smtp_relay: Callable[..., RelayProcess],
                                                  upstream: Callable[..., Upstream]) -> None:
    up = upstream(users=USERS)
    relay = smtp_relay(up)
    body = rich_message()
    message_id = submit(relay, body, recipients=("to@example.net", "bcc-only@example.org"))
    assert relay.wait_status(message_id, ("sent", "failed")) == "sent"
    [got] = up.messages
    assert got.mail_from == "app@example.com"
    assert got.rcpt_tos == ["to@example.net", "bcc-only@example.org"]
    assert strip_received(got.content) == body
    assert got.tls and got.auth == b"relayuser"
    [(outcome, detail)] = attempts(relay, message_id)
    assert (outcome, detail) == ("sent", "250 2.0.0 Ok: queued as Q1")
    assert PASSWORD not in relay.log(whole=True)


@pytest.mark.slow
def test_relay_several_mb_with_dots_reach_smtp_sink_byte_exact(
        smtp_relay: Callable[..., RelayProcess], tmp_path: Path) -> None:
    sink = SmtpSink(tmp_path / "sink").start()
    try:
        relay = smtp_relay(sink)
        # dots at every 4 KiB: whatever the Received header's length, chunk
        # boundaries of the stored body fall on many of these lines
        body = dotted_body(3_000_000, boundary=4096)
        message_id = submit(relay, body)
        assert relay.wait_status(message_id, ("sent", "failed"), timeout=60) == "sent"
        [got] = sink.messages()
        stored = got.content.replace(b"\n", b"\r\n")
        assert strip_received(stored) == body
    finally:
        sink.stop()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["starttls not offered", "wrong certificate host"])
def test_relay_sends_nothing_over_an_insecure_upstream(
        smtp_relay: Callable[..., RelayProcess], upstream: Callable[..., Upstream], ca: TestCA,
        case: str) -> None:
    if case == "starttls not offered":
        up = upstream(mode="none", users=USERS, auth_plaintext=True)
        expected = "does not offer STARTTLS"
    else:
        up = upstream(users=USERS, cert=ca.issue("other.example"))
        expected = "TLS: certificate verify failed (hostname mismatch"
    relay = smtp_relay(up, security="starttls", username="relayuser", password=PASSWORD,
                       ca_file=str(ca.ca_path))
    message_id = submit(relay, b"Subject: x\r\n\r\nx\r\n")
    [(outcome, detail)] = wait_attempts(relay, message_id, 1)
    assert outcome == "temporary" and expected in detail, detail
    assert relay.query("SELECT status FROM messages") == [("deferred",)]
    assert (up.mail_commands, up.auth_attempts) == ([], [])


@pytest.mark.slow
def test_relay_wrong_password_is_deferred_with_the_upstream_reply(
        smtp_relay: Callable[..., RelayProcess], upstream: Callable[..., Upstream]) -> None:
    up = upstream(users=USERS)
    relay = smtp_relay(up, password="not-the-password")
    message_id = submit(relay, b"Subject: x\r\n\r\nx\r\n")
    [(outcome, detail)] = wait_attempts(relay, message_id, 1)
    assert (outcome, detail) == ("temporary", "authentication as relayuser failed: "
                                              "535 5.7.8 Authentication credentials invalid")
    assert relay.query("SELECT status FROM messages") == [("deferred",)]
    assert all(tls for _, _, tls, _ in up.auth_attempts) and up.mail_commands == []
    assert "not-the-password" not in relay.log(whole=True)


@pytest.mark.slow
def test_relay_retries_only_the_temporarily_refused_recipient(
        smtp_relay: Callable[..., RelayProcess], upstream: Callable[..., Upstream]) -> None:
    up = upstream(users=USERS)
    refused: list[str] = []

    def rcpt(address: str) -> str | None:
        if address == "busy@example.net" and not refused:
            refused.append(address)
            return "451 4.2.0 <busy@example.net>: mailbox busy"
        return None

    up.rcpt_reply = rcpt
    relay = smtp_relay(up)
    message_id = submit(relay, b"Subject: x\r\n\r\nx\r\n",
                        recipients=("ok@example.net", "busy@example.net"))
    assert relay.wait_status(message_id, ("sent", "failed")) == "sent"
    assert [m.rcpt_tos for m in up.messages] == [["ok@example.net"], ["busy@example.net"]]
    rows = attempts(relay, message_id)
    assert rows[0] == ("partial", "1 of 2 recipients accepted; busy@example.net: "
                                  "451 4.2.0 <busy@example.net>: mailbox busy")
    assert rows[1] == ("sent", "250 2.0.0 Ok: queued as Q2")
    assert relay.query("SELECT address, status FROM recipients ORDER BY position") == [
        ("ok@example.net", "sent"), ("busy@example.net", "sent")]


@pytest.mark.slow
def test_relay_connection_dropped_after_the_dot_is_retried(
        smtp_relay: Callable[..., RelayProcess], upstream: Callable[..., Upstream]) -> None:
    up = upstream(users=USERS)
    up.drop_after_dot = 1
    relay = smtp_relay(up)
    message_id = submit(relay, b"Subject: x\r\n\r\nat least once\r\n")
    assert relay.wait_status(message_id, ("sent", "failed")) == "sent"
    (first, _), (second, _) = rows = attempts(relay, message_id)
    assert (first, second) == ("ambiguous", "sent")
    assert "may have been delivered" in rows[0][1]
    assert len(up.dropped) == 1 and len(up.messages) == 1
    assert strip_received(up.messages[0].content) == b"Subject: x\r\n\r\nat least once\r\n"
