"""Abuse, completing test_smtp_attacks.py and test_smtp_session.py: an open relay
sought from outside, AUTH brute force from many connections at once, a user
sending as someone it may not.  Each attempt is counted into the report; none
may get a message through.
"""

import base64
import concurrent.futures
import threading
import time

import pytest

from smtprelay import replies
from smtprelay.passwords import hash_password
from tests import torture
from tests.network import non_loopback_address
from tests.relay import RawSMTP

pytestmark = [pytest.mark.slow, pytest.mark.torture]

PASSWORD = "correct-horse-battery-1"
PASSWORD_HASH = hash_password(PASSWORD.encode(), ln=10)


def b64(data):
    return base64.b64encode(data).decode()


def plain(user, password):
    return "AUTH PLAIN " + b64(b"\0" + user.encode() + b"\0" + password.encode())


def try_to_relay(port, host, sender="ceo@example.com", rcpt="victim@elsewhere.example"):
    """One open-relay attempt: every step a spammer would take -> the replies' codes."""
    codes = []
    try:
        with RawSMTP(port, host=host, timeout=10) as c:
            r = c.reply()
            codes.append(r.code)
            if r.code != 220:
                return codes
            for line in ("EHLO spammer.example", f"MAIL FROM:<{sender}>", f"RCPT TO:<{rcpt}>",
                         "DATA"):
                r = c.cmd(line)
                codes.append(r.code)
            if codes[-1] == 354:
                c.send(b"Subject: cheap pills\r\n\r\nbuy\r\n.\r\n")
                codes.append(c.reply().code)
    except (ConnectionError, OSError):
        codes.append("closed")
    return codes


def test_open_relay_attempts_from_outside(start_relay):
    """From a non-loopback address: outside allowed_networks, refused at connect; inside
    them (or with no network list) but without AUTH when it is required, refused at
    MAIL; AUTH itself not offered without TLS.  Nothing reaches the outbox."""
    address = non_loopback_address()
    attempts = torture.scale(5, 50)
    fenced = start_relay({"smtp": {"listen": "0.0.0.0:0", "allowed_networks": ["127.0.0.0/8"],
                                   "auth": {"required": True, "users": {"app": PASSWORD_HASH}}}},
                         name="fenced")
    guarded = start_relay({"smtp": {"listen": "0.0.0.0:0",
                                    "auth": {"required": True, "users": {"app": PASSWORD_HASH}}}},
                          name="guarded")
    for n in range(attempts):
        codes = try_to_relay(fenced.port, address, rcpt=f"victim{n}@elsewhere.example")
        assert codes[0] == 554 and len(codes) <= 2, codes
        codes = try_to_relay(guarded.port, address, rcpt=f"victim{n}@elsewhere.example")
        assert codes[:3] == [220, 250, 530] and 250 not in codes[3:] and 354 not in codes, codes
        torture.figures["open-relay attempts refused"] += 2
    with RawSMTP(guarded.port, host=address) as c:
        c.reply()
        c.cmd("EHLO x")
        assert c.cmd(plain("app", PASSWORD)).code == 538  # no AUTH in clear from afar
        assert c.cmd("MAIL FROM:<app@example.com>").code == 530
    time.sleep(0.5)
    assert fenced.outbox_files() == [] and guarded.outbox_files() == []
    assert fenced.query("SELECT COUNT(*) FROM messages") == [(0,)]
    assert guarded.query("SELECT COUNT(*) FROM messages") == [(0,)]


def test_brute_force_from_many_connections_at_once(start_relay):
    """A guesser opens many connections first, then tries passwords on all of them in
    parallel.  The lockout must hold for the sessions already open as for new ones:
    no more than max_failures - 1 wrong passwords are ever answered 535, every
    later try gets 421 4.7.0 and its connection closed, and the right password is
    refused too until the lockout ends."""
    max_failures = 3
    relay = start_relay({"smtp": {"max_connections_per_address": 200, "auth": {
        "users": {"app": PASSWORD_HASH}, "max_failures": max_failures, "lockout": "60s"}}})
    connections = torture.scale(20, 100)
    tries_each = torture.scale(5, 20)
    sessions = []
    for _ in range(connections + 1):
        c = RawSMTP(relay.port, timeout=30)
        assert c.reply().code == 220
        assert c.cmd("EHLO guesser").code == 250
        sessions.append(c)
    patient = sessions.pop()  # opened before the lockout, tries only the right password
    start = threading.Barrier(connections)
    outcomes = []
    lock = threading.Lock()

    def guess(n, c):
        start.wait()
        for k in range(tries_each):
            try:
                r = c.cmd(plain("app", f"guess-{n}-{k}"))
            except (ConnectionError, OSError):
                with lock:
                    outcomes.append("closed")
                return
            with lock:
                outcomes.append(r.code)
            if r.code != 535:
                assert r.lines == [str(replies.AUTH_LOCKED_OUT)]
                assert c.closed()
                return

    with concurrent.futures.ThreadPoolExecutor(max_workers=connections) as pool:
        list(pool.map(lambda a: guess(*a), enumerate(sessions)))
    for c in sessions:
        c.close()
    answered = outcomes.count(535)
    torture.figures["brute-force guesses refused"] += outcomes.count(421)
    assert answered <= max_failures - 1, outcomes
    assert outcomes.count(421) == connections, outcomes
    # the right password, on a session opened before the lockout, or a new one
    r = patient.cmd(plain("app", PASSWORD))
    assert r.code == 421, r
    patient.close()
    with RawSMTP(relay.port) as c:
        r = c.reply()
        assert (r.code, r.enhanced) == (421, "4.7.0")
    log = relay.log()
    assert "locking out 127.0.0.1" in log
    assert "guess-" not in log and PASSWORD not in log


FORGED_ENVELOPE = [
    "ceo@example.com", "CEO@EXAMPLE.COM", "app@example.com.evil.example", "app@evil.example",
    "app@example.co", "<@example.com:ceo@example.com>", '"app@example.com"@evil.example',
    "app+x@example.com", "",  # "": the null sender, sent as sender.default
]
FORGED_HEADER_FROM = [
    b"ceo@example.com", b"app@example.com, ceo@example.com", b"app@example.com <ceo@example.com>",
    b"app@example.com)<ceo@example.com>", b"<app@example.com>ceo@example.com",
    b"app@example.com;ceo@example.com", b"app@example.com\r\n\t<ceo@example.com>",
    b'app@example.com"ceo@example.com"', b"Group: ceo@example.com;, app@example.com",
    b"relay@example.com", b"", b"undisclosed:;", b"app@example.com@ceo@example.com",
]


def test_a_user_cannot_send_as_someone_else(start_relay):
    """A user limited to app@example.com tries every way to send as another address
    (the envelope, the header From a parser reads differently, the null sender that
    goes out as sender.default): 550 5.7.1 each time; only its own address passes."""
    relay = start_relay({
        "smtp": {"auth": {"users": {"app": {"password": PASSWORD_HASH,
                                             "allowed": ["app@example.com"]}}}},
        "sender": {"default": "relay@example.com", "allowed": ["@example.com"]},
    })

    def session():
        c = RawSMTP(relay.port)
        c.reply()
        c.cmd("EHLO x")
        assert c.cmd(plain("app", PASSWORD)).code == 235
        return c

    # (two sessions: one would reach smtp.max_errors)
    with session() as c:
        for sender in FORGED_ENVELOPE:
            r = c.cmd(f"MAIL FROM:<{sender}>" if not sender.startswith("<") else
                      f"MAIL FROM:{sender}")
            assert r.code in (550, 501, 553), (sender, r)
            torture.figures["forged senders refused"] += 1
            if r.code == 250:
                c.cmd("RSET")
    with session() as c:
        for value in FORGED_HEADER_FROM:
            assert c.cmd("MAIL FROM:<app@example.com>").code == 250
            assert c.cmd("RCPT TO:<to@example.net>").code == 250
            assert c.cmd("DATA").code == 354
            c.send(b"From: " + value + b"\r\nSubject: as someone else\r\n\r\nhi\r\n.\r\n")
            r = c.reply()
            assert r.lines == ["550 5.7.1 Sender not allowed in From header"], (value, r)
            torture.figures["forged senders refused"] += 1
        # its own address, in either place, passes
        assert c.cmd("MAIL FROM:<app@example.com>").code == 250
        assert c.cmd("RCPT TO:<to@example.net>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b'From: "The App" <app@example.com>\r\nSubject: mine\r\n\r\nhi\r\n.\r\n')
        assert c.reply().code == 250
    [only] = relay.wait_outbox(1)
    time.sleep(0.3)
    assert len(relay.outbox_files()) == 1
    assert b"Subject: mine" in only.read_bytes()
