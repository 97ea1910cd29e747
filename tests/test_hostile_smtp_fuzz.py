"""SMTP fuzzing: a hypothesis state machine drives real sessions over loopback.

It speaks valid, invalid and hostile command sequences (random case, long
arguments, NULs, 8-bit bytes, pipelined bursts, STARTTLS in the middle, AUTH
garbage, every end-of-data variant) and keeps a model of the session.
Invariants: the server always answers and never with a traceback; it never
accepts a message it answered non-2xx for; every message in the outbox is one
the client sent as one (one marker each, each acknowledged marker exactly
once); nothing survives STARTTLS or RSET that should not.
"""

import base64
import re
import time
import uuid

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from smtprelay.passwords import hash_password
from tests import torture
from tests.relay import RawSMTP, RelayProcess, parse_outbox

PASSWORD = "fuzz-pass-4711"
MAX_RCPT = 5
MAX_SIZE = 200_000
MAX_LINE = 2000

END_VARIANTS = [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r\n.\r", b"\r.\r\n", b"\n.\r",
                b"\r\n..\r\n", b"\r\n. \r\n", b"\r\n.\t\r\n"]


def random_case(word):
    return st.lists(st.booleans(), min_size=len(word), max_size=len(word)).map(
        lambda flags: "".join(c.upper() if f else c.lower() for c, f in zip(word, flags)))


good_address = st.builds(lambda local, dom: f"{local}@{dom}.example",
                         st.from_regex(r"[a-z][a-z0-9.+_-]{0,15}", fullmatch=True).filter(
                             lambda s: ".." not in s and not s.endswith(".")),
                         st.sampled_from(["a", "b", "mail", "x-y"]))
bad_address = st.one_of(
    st.just(""), st.just("no-at"), st.just("a@@b.c"), st.just("a b@c.d"), st.just('"open@x.y'),
    st.just("a@b.c>extra"), st.just("<nested@x.y>"),
    st.binary(min_size=1, max_size=40).map(lambda b: b.decode("latin-1")),
    st.text(min_size=200, max_size=600),
).map(lambda a: a.replace("\r", "").replace("\n", ""))  # a line break would be two commands
garbage_line = st.one_of(
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
    st.text(max_size=100).map(
        lambda t: t.encode("utf-8", "replace").replace(b"\n", b"").replace(b"\r", b"")),
    st.sampled_from([b"GET / HTTP/1.1", b"\x00\x00\x00", b"MAIL", b"RCPT TO", b"AUTH",
                     b"STARTTLS extra", b"HELO", b"QUIT now", b"DATA\x00", b"\xff\xfe\xfd"]),
)
body_piece = st.one_of(
    st.sampled_from([b"Hello world", b".leading dot", b"..two dots", b".", b"", b"8bit \xe9\xe8",
                     b"\x00nul", b"tab\tline", b"=?utf-8?q?encoded?="]),
    st.sampled_from(END_VARIANTS),
    st.binary(max_size=120),
    st.integers(10, 3000).map(lambda n: b"L" * n),
)


def first_error(content):
    """The reply codes the relay may give at end of data: the first error by
    byte position wins (a NUL, or the byte that makes a line too long)."""
    nul = content.find(b"\x00")
    long_at = -1
    for m in re.finditer(rb"[^\r\n]*", content):
        if m.end() - m.start() > MAX_LINE:
            long_at = m.start() + MAX_LINE
            break
    positions = [(p, code) for p, code in ((nul, 550), (long_at, 500)) if p >= 0]
    if positions:
        return {min(positions)[1]}
    if len(content) > MAX_SIZE - 2000:
        return {250, 552}
    return {250}


class SMTPFuzz(RuleBasedStateMachine):
    relay = None  # set by the test
    ca = None
    acknowledged = None  # marker -> message id, shared by all runs of one test

    def __init__(self):
        super().__init__()
        self.c = None

    # -- the model ---------------------------------------------------------------

    def reset_session(self):
        self.mail = False
        self.rcpts = 0
        self.tls = False
        self.authed = False

    def reset_transaction(self):
        self.mail = False
        self.rcpts = 0

    def connect(self):
        if self.c is not None:
            self.c.close()
        self.c = RawSMTP(self.relay.port, timeout=20)
        self.reset_session()
        r = self.c.reply()
        assert r.code == 220, r
        torture.figures["sessions fuzzed"] += 1

    def expect(self, reply, codes):
        assert reply.code in codes, (reply, codes)
        assert "Traceback" not in reply.text
        if reply.code not in (220, 221, 235, 250, 252, 214, 334, 354):
            assert reply.enhanced, reply
        return reply

    def cmd(self, line):
        torture.figures["commands sent"] += 1
        return self.c.cmd(line)

    @initialize()
    def start(self):
        self.connect()
        self.expect(self.cmd("EHLO fuzz.test"), {250})

    # -- session verbs ---------------------------------------------------------------

    @rule(verb=random_case("ehlo"), name=st.sampled_from(["x", "client.example", "[127.0.0.1]"]))
    def ehlo(self, verb, name):
        self.expect(self.cmd(f"{verb} {name}"), {250})
        self.reset_transaction()

    @rule(verb=random_case("helo"))
    def helo_without_argument(self, verb):
        self.expect(self.cmd(verb), {501})

    @rule(verb=random_case("rset"))
    def rset(self, verb):
        self.expect(self.cmd(verb), {250})
        self.reset_transaction()

    @rule(verb=st.sampled_from(["NOOP", "noop", "VRFY someone@x.y", "HELP", "EXPN x", "ETRN x"]))
    def harmless(self, verb):
        self.expect(self.cmd(verb), {250, 252, 214, 502})

    @rule(line=garbage_line)
    def garbage(self, line):
        r = self.expect(self.cmd(line), {500, 501, 502, 503, 504, 530, 250, 252, 214, 334, 221,
                                         454, 555, 553, 550, 552})
        verb = line.split(b" ", 1)[0].upper()
        if r.code == 334:
            self.expect(self.cmd("*"), {501})
        elif r.code == 221:
            assert self.c.closed()
            self.connect()
        elif verb in (b"HELO", b"EHLO") and r.code == 250:
            self.reset_transaction()
        elif verb == b"MAIL" and r.code == 250:
            self.mail = True
        elif verb == b"RCPT" and r.code == 250:
            self.rcpts += 1
        elif verb == b"RSET" and r.code == 250:
            self.reset_transaction()
        elif r.code == 250 and verb not in (b"NOOP",):
            raise AssertionError(f"unexpected 250 for {line!r}: {r}")

    # -- envelope ----------------------------------------------------------------------------

    @rule(verb=random_case("mail from:"), address=good_address,
          params=st.sampled_from(["", " BODY=8BITMIME", " SIZE=100", f" SIZE={MAX_SIZE + 1}",
                                  " BODY=BINARY", " FOO=bar", " SIZE=x"]))
    def mail_from(self, verb, address, params):
        r = self.cmd(f"{verb}<{address}>{params}")
        if self.mail:
            self.expect(r, {503})
        elif params in (f" SIZE={MAX_SIZE + 1}",):
            self.expect(r, {552})
        elif params in (" BODY=BINARY", " SIZE=x"):
            self.expect(r, {501})
        elif params == " FOO=bar":
            self.expect(r, {555})
        else:
            self.expect(r, {250})
            self.mail = True

    @rule(address=bad_address)
    def mail_from_bad(self, address):
        r = self.cmd(("MAIL FROM:<" + address + ">").encode("utf-8", "replace"))
        codes = {503, 500} if self.mail else {500, 501, 553, 555}
        if not self.mail and address == "":
            codes = {250}  # the null sender
        self.expect(r, codes)
        if r.code == 250:
            self.mail = True

    @rule(verb=random_case("rcpt to:"), address=good_address)
    def rcpt_to(self, verb, address):
        r = self.cmd(f"{verb}<{address}>")
        if not self.mail:
            self.expect(r, {503})
        elif self.rcpts >= MAX_RCPT:
            self.expect(r, {452, 250})  # a duplicate of an accepted one is still 452 or 250
            if r.code == 250:
                raise AssertionError("more recipients than smtp.max_recipients accepted")
        else:
            self.expect(r, {250})
            self.rcpts += 1

    @rule(address=bad_address)
    def rcpt_to_bad(self, address):
        r = self.cmd(("RCPT TO:<" + address + ">").encode("utf-8", "replace"))
        # a NUL or 8-bit byte is refused before the state is looked at
        self.expect(r, {503, 500} if not self.mail else {500, 501, 553, 555, 452})

    # -- DATA ------------------------------------------------------------------------------------

    @rule(pieces=st.lists(body_piece, max_size=12), big=st.booleans(),
          endings=st.sampled_from([b"\r\n", b"\n", b"\r"]))
    def data(self, pieces, big, endings):
        r = self.cmd("DATA")
        if not self.mail:
            self.expect(r, {503})
            return
        if not self.rcpts:
            self.expect(r, {554})
            return
        self.expect(r, {354})
        marker = uuid.uuid4().hex
        body = b"X-Fuzz-Marker: " + marker.encode() + b"\r\nSubject: fuzz\r\n\r\n"
        body += endings.join(pieces)
        if big:
            body += b"\r\n" + (b"B" * 900 + b"\r\n") * 300
        # pieces may join into a real CRLF.CRLF: a client stuffs that one (and
        # only that one: every other variant is sent raw, to be kept as data)
        body += b"\r\n"
        while b"\r\n.\r\n" in body:
            body = body.replace(b"\r\n.\r\n", b"\r\n..\r\n")
        wire = body + b".\r\n"
        self.c.send(wire)
        torture.figures["messages sent"] += 1
        r = self.c.reply()
        self.reset_transaction()
        expect = first_error(body)
        self.expect(r, expect)
        if r.code == 250:
            self.acknowledged[marker] = r.text.rsplit(" ", 1)[1]
            torture.figures["messages accepted"] += 1

    @precondition(lambda self: not self.mail)
    @rule(sender=good_address, recipients=st.lists(good_address, min_size=1, max_size=3),
          pieces=st.lists(body_piece, max_size=12), big=st.booleans(),
          endings=st.sampled_from([b"\r\n", b"\n", b"\r"]), pipelined=st.booleans())
    def transaction(self, sender, recipients, pieces, big, endings, pipelined):
        """A whole transaction, often pipelined, with a fuzzed body."""
        lines = [f"MAIL FROM:<{sender}>"] + [f"RCPT TO:<{r}>" for r in recipients]
        if pipelined:
            self.c.send(("\r\n".join(lines) + "\r\n").encode())
            torture.figures["commands sent"] += len(lines)
            for _ in lines:
                self.expect(self.c.reply(), {250})
        else:
            for line in lines:
                self.expect(self.cmd(line), {250})
        self.mail = True
        self.rcpts = len(recipients)
        self.data(pieces, big, endings)

    @rule(n=st.integers(1, 5))
    def pipelined_burst(self, n):
        lines = ["RSET"] + ["NOOP"] * n + [f"MAIL FROM:<burst{n}@a.example>",
                                            "RCPT TO:<x@b.example>", "RSET", "NOOP"]
        self.c.send(("\r\n".join(lines) + "\r\n").encode())
        torture.figures["commands sent"] += len(lines)
        codes = [self.c.reply().code for _ in lines]
        assert codes == [250] * len(lines), codes
        self.reset_transaction()

    # -- TLS and AUTH ------------------------------------------------------------------------------

    @precondition(lambda self: not self.tls)
    @rule(injected=st.sampled_from([b"", b"MAIL FROM:<evil@x.example>\r\n",
                                    b"RCPT TO:<evil@x.example>\r\nDATA\r\n", b"NOOP\r\n"]))
    def starttls(self, injected):
        self.c.send(b"STARTTLS\r\n" + injected)
        self.expect(self.c.reply(), {220})
        self.c.starttls(ca=str(self.ca))
        self.reset_session()
        self.tls = True
        # nothing before TLS survived, nothing injected ran
        self.expect(self.cmd("RCPT TO:<after-tls@x.example>"), {503})
        self.expect(self.cmd("EHLO again"), {250})

    @precondition(lambda self: not self.mail)
    @rule(payload=st.one_of(
        st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode()),
        st.text(max_size=60).filter(lambda t: "\n" not in t and "\r" not in t),
        st.just(base64.b64encode(b"\0fuzz\0" + PASSWORD.encode()).decode()),
        st.just(base64.b64encode(b"\0fuzz\0wrong").decode()),
    ), mechanism=st.sampled_from(["PLAIN", "LOGIN", "plain", "CRAM-MD5", ""]))
    def auth(self, payload, mechanism):
        r = self.cmd(f"AUTH {mechanism} {payload}".rstrip().encode("utf-8", "replace"))
        if self.authed:
            self.expect(r, {503, 500})  # 500: 8-bit bytes are refused before anything else
            return
        if r.code == 334:
            r = self.cmd(payload.encode("utf-8", "replace") if payload else b"*")
            if r.code == 334:
                r = self.cmd("*")
        self.expect(r, {235, 501, 504, 535, 421, 500})
        if r.code == 235:
            self.authed = True
        if r.code == 421:
            assert self.c.closed()
            time.sleep(0)  # locked out: the model starts over on a fresh connection
            self.connect()

    @rule()
    def reconnect(self):
        self.cmd("QUIT")
        self.connect()
        self.expect(self.cmd("EHLO again"), {250})

    @invariant()
    def alive(self):
        if self.c is not None:
            # the session answers at any point
            r = self.cmd("NOOP")
            self.expect(r, {250})

    def teardown(self):
        if self.c is not None:
            try:
                self.c.cmd("QUIT")
            except OSError:
                pass
            self.c.close()


@pytest.fixture(scope="module")
def fuzz_relay(tmp_path_factory, ca):
    directory = tmp_path_factory.mktemp("fuzz")
    relay = RelayProcess(directory, {
        "smtp": {"tls_certificate": str(ca.server_cert), "tls_key": str(ca.server_key),
                 "max_recipients": MAX_RCPT, "max_message_size": MAX_SIZE,
                 "max_line_length": MAX_LINE, "max_errors": 100000,
                 "auth": {"users": {"fuzz": hash_password(PASSWORD.encode(), ln=4)},
                          "max_failures": 100000}},
    })
    relay.start()
    yield relay
    relay.stop()


def test_smtp_state_machine(fuzz_relay, ca):
    SMTPFuzz.relay = fuzz_relay
    SMTPFuzz.ca = ca.ca_path
    SMTPFuzz.acknowledged = {}
    run_state_machine_as_test(SMTPFuzz, settings=settings(
        max_examples=torture.scale(25, 400), stateful_step_count=torture.scale(25, 60),
        deadline=None, suppress_health_check=list(HealthCheck)))
    acknowledged = SMTPFuzz.acknowledged
    # every acknowledged message is delivered exactly once, and nothing else is
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if len(fuzz_relay.outbox_files()) >= len(acknowledged):
            break
        time.sleep(0.2)
    time.sleep(0.5)
    seen = {}
    forged = 0
    for f in fuzz_relay.outbox_files():
        _, _, data = parse_outbox(f)
        markers = [line.split(b": ", 1)[1].decode() for line in data.split(b"\r\n")
                   if line.startswith(b"X-Fuzz-Marker: ")]
        if len(markers) != 1 or markers[0] not in acknowledged:
            forged += 1
            continue
        seen[markers[0]] = seen.get(markers[0], 0) + 1
    lost = [m for m in acknowledged if m not in seen]
    torture.figures["messages delivered"] += len(seen)
    torture.figures["messages lost"] += len(lost)
    torture.figures["messages forged"] += forged
    torture.figures["duplicates"] += sum(n - 1 for n in seen.values())
    log = fuzz_relay.log()
    torture.figures["tracebacks to clients"] += 0
    assert not lost, lost[:5]
    assert forged == 0
    assert all(n == 1 for n in seen.values())
    assert PASSWORD not in log
    assert base64.b64encode(b"\0fuzz\0" + PASSWORD.encode()).decode() not in log
    assert "Unhandled Error" not in log, log[-3000:]
