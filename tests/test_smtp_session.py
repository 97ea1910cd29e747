"""The SMTP session of smtp.md, spoken to the real twistd relay over loopback."""

import ssl
import time

import pytest

from smtprelay import replies
from smtprelay.passwords import hash_password
from tests.network import non_loopback_address
from tests.relay import RawSMTP, parse_outbox

PASSWORD_HASH = hash_password(b"s3cret-pass", ln=10)


def b64(data):
    import base64

    return base64.b64encode(data).decode()


def session(relay, ehlo=True):
    c = RawSMTP(relay.port)
    assert c.reply().code == 220
    if ehlo:
        assert c.cmd("EHLO client.test").code == 250
    return c


def test_greeting_and_ehlo(relay):
    with RawSMTP(relay.port) as c:
        assert c.reply().lines == ["220 relay.test ESMTP smtprelay"]
        r = c.cmd("EHLO client.test")
        assert r.code == 250
        ext = [line[4:] for line in r.lines[1:]]
        assert "SIZE 35000000" in ext
        assert {"8BITMIME", "ENHANCEDSTATUSCODES", "PIPELINING"} <= set(ext)
        assert "STARTTLS" not in ext  # no certificate configured
        assert not any(e.startswith("AUTH") for e in ext)  # no users configured
        assert c.cmd("HELO client.test").code == 250


def test_tls_and_auth_are_advertised_when_configured(start_relay, tls_config):
    relay = start_relay({**tls_config, "smtp": {**tls_config["smtp"], "auth": {
        "users": {"app": PASSWORD_HASH}}}})
    with session(relay, ehlo=False) as c:
        ext = [line[4:] for line in c.cmd("EHLO x").lines[1:]]
        assert "STARTTLS" in ext and "AUTH PLAIN LOGIN" in ext  # loopback: AUTH offered


@pytest.mark.parametrize("line,expected", [
    ("NOOP", replies.OK),
    ("RSET", replies.OK),
    ("VRFY someone@example.com", replies.CANNOT_VRFY),
    ("FROB", replies.NOT_RECOGNIZED),
    ("MAIL FROM:", replies.MAIL_SYNTAX),
    ("MAIL TO:<a@b.c>", replies.MAIL_SYNTAX),
    ("MAIL FROM:<not an address>", replies.MAIL_SYNTAX),
    ("MAIL FROM:<a@@b.c>", replies.BAD_SENDER_SYNTAX),
    ("RCPT TO:<a@b.c>", replies.NEED_MAIL),
    ("DATA", replies.NEED_MAIL),
    ("EHLO", replies.GREET_SYNTAX.format(verb="EHLO")),
    ("STARTTLS", replies.TLS_NOT_AVAILABLE),
    ("AUTH PLAIN", replies.AUTH_NOT_ENABLED),
    ("EXPN list", replies.NOT_IMPLEMENTED),
    ("BDAT 10 LAST", replies.NOT_IMPLEMENTED),
])
def test_replies_and_enhanced_codes(relay, line, expected):
    with session(relay) as c:
        r = c.cmd(line)
        assert r.lines == [str(expected)], r


def test_help_and_quit(relay):
    with session(relay) as c:
        assert c.cmd("HELP").code == 214
        assert c.cmd("QUIT").lines == [str(replies.BYE)]
        assert c.closed()


def test_transaction_replies(relay):
    with session(relay) as c:
        assert c.cmd("MAIL FROM:<app@example.com> BODY=8BITMIME SIZE=1000").enhanced == "2.1.0"
        assert c.cmd("MAIL FROM:<app@example.com>").code == 503
        assert c.cmd("RCPT TO:<bad address>").code == 501
        assert c.cmd("RCPT TO:<>").enhanced == "5.1.3"
        assert c.cmd("RCPT TO:<a@example.com> NOTIFY=NEVER").code == 555
        assert c.cmd("RCPT TO:<a@example.com>").enhanced == "2.1.5"
        assert c.cmd("DATA extra").code == 501
        assert c.cmd("RSET").code == 250
        assert c.cmd("RCPT TO:<a@example.com>").code == 503
        assert c.cmd("MAIL FROM:<app@example.com> FOO=BAR").code == 555
        assert c.cmd("MAIL FROM:<app@example.com> BODY=9BIT").code == 501
        assert c.cmd("MAIL FROM:<app@example.com>").code == 250
        assert c.cmd("DATA").lines == [str(replies.NO_VALID_RECIPIENTS)]


def test_liberal_forms_legacy_clients_send(relay):
    with session(relay) as c:
        assert c.cmd("mail from: app@example.com").code == 250
        assert c.cmd("rcpt to:<@relay1.example,@relay2.example:a@example.com>").code == 250
        assert c.cmd("MAIL FROM:<>").code == 503
        assert c.cmd("rset").code == 250
        assert c.cmd("MAIL FROM:<>").code == 250


def test_null_sender_is_sent_as_default(relay):
    with session(relay) as c:
        c.cmd("MAIL FROM:<>")
        c.cmd("RCPT TO:<a@example.com>")
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: bounce\r\n\r\nx\r\n.\r\n")
        assert c.reply().code == 250
    env_from, env_to, _ = parse_outbox(relay.wait_outbox(1)[0])
    assert (env_from, env_to) == ("relay@example.com", ["a@example.com"])


def test_size_limits(start_relay):
    relay = start_relay({"smtp": {"max_message_size": "10KB"}})
    with session(relay) as c:
        assert c.cmd("EHLO x").lines[1] == "250-SIZE 10000"
        assert c.cmd("MAIL FROM:<a@example.com> SIZE=10001").lines == [str(replies.SIZE_EXCEEDED)]
        assert c.cmd("MAIL FROM:<a@example.com> SIZE=5000").code == 250
        c.cmd("RCPT TO:<b@example.com>")
        c.cmd("DATA")
        c.send(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 12 + b".\r\n")
        assert c.reply().lines == ["552 5.3.4 Message size exceeds fixed limit"]
        # the session goes on
        assert c.cmd("NOOP").code == 250
    assert relay.outbox_files() == []


def test_recipient_limit_and_duplicates(start_relay):
    relay = start_relay({"smtp": {"max_recipients": 3}})
    with session(relay) as c:
        c.cmd("MAIL FROM:<a@example.com>")
        for i in range(3):
            assert c.cmd(f"RCPT TO:<r{i}@example.com>").code == 250
        assert c.cmd("RCPT TO:<r1@example.com>").code == 452  # still the limit
        assert c.cmd("RCPT TO:<r9@example.com>").lines == [str(replies.TOO_MANY_RECIPIENTS)]
        c.cmd("DATA")
        c.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        assert c.reply().code == 250
    _, env_to, _ = parse_outbox(relay.wait_outbox(1)[0])
    assert env_to == ["r0@example.com", "r1@example.com", "r2@example.com"]


def test_duplicate_recipients_are_delivered_once(relay):
    with session(relay) as c:
        c.cmd("MAIL FROM:<a@example.com>")
        assert c.cmd("RCPT TO:<x@example.com>").code == 250
        assert c.cmd("RCPT TO:<X@Example.com>").code == 250
        c.cmd("DATA")
        c.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        assert c.reply().code == 250
    _, env_to, _ = parse_outbox(relay.wait_outbox(1)[0])
    assert env_to == ["x@example.com"]


def test_idle_timeout(start_relay):
    relay = start_relay({"smtp": {"idle_timeout": "1s"}})
    with session(relay) as c:
        time.sleep(1.6)
        assert c.reply().lines == [str(replies.TIMEOUT.format(hostname="relay.test"))]
        assert c.closed()


def test_max_connections(start_relay):
    relay = start_relay({"smtp": {"max_connections": 2}})
    a, b = session(relay), session(relay)
    with RawSMTP(relay.port) as c:
        r = c.reply()
        assert (r.code, r.enhanced) == (421, "4.7.0")
        assert c.closed()
    a.close()
    time.sleep(0.2)
    with RawSMTP(relay.port) as c:
        assert c.reply().code == 220
    b.close()


def test_too_many_errors_close_the_session(start_relay):
    relay = start_relay({"smtp": {"max_errors": 5}})
    with session(relay) as c:
        for _ in range(4):
            assert c.cmd("BOGUS").code == 500
        c.send(b"BOGUS\r\n")
        assert c.reply().code == 500
        assert c.reply().lines == [str(replies.TOO_MANY_ERRORS)]
        assert c.closed()


def test_outside_allowed_networks_is_refused_at_connect(start_relay):
    address = non_loopback_address()
    relay = start_relay({"smtp": {"listen": "0.0.0.0:0", "allowed_networks": ["127.0.0.0/8"]}})
    with RawSMTP(relay.port, host=address) as c:
        r = c.reply()
        assert (r.code, r.enhanced) == (replies.NETWORK_REFUSED.code,
                                        replies.NETWORK_REFUSED.status)
        assert c.closed()
    with RawSMTP(relay.port) as c:
        assert c.reply().code == 220


# --- AUTH -----------------------------------------------------------------------------


@pytest.fixture
def auth_relay(start_relay, tls_config):
    return start_relay({
        "smtp": {**tls_config["smtp"], "auth": {
            "required": True, "max_failures": 3, "lockout": "3s",
            "users": {
                "app": PASSWORD_HASH,
                "scanner": {"password": "plain-secret-pw", "allowed": ["scanner@example.com"]},
            }}},
        "sender": {"default": "relay@example.com", "allowed": ["@example.com"]},
    })


def test_auth_plain_with_and_without_initial_response(auth_relay):
    with session(auth_relay) as c:
        assert c.cmd("MAIL FROM:<a@example.com>").lines == [str(replies.AUTH_REQUIRED)]
        r = c.cmd("AUTH PLAIN " + b64(b"\0app\0s3cret-pass"))
        assert r.lines == [str(replies.AUTH_OK)]
        assert (c.cmd("AUTH PLAIN " + b64(b"\0app\0s3cret-pass")).lines
                == [str(replies.ALREADY_AUTHENTICATED)])
        assert c.cmd("MAIL FROM:<a@example.com>").code == 250
    with session(auth_relay) as c:
        assert c.cmd("AUTH PLAIN").lines == [str(replies.AUTH_CONTINUE)]
        assert c.cmd(b64(b"\0scanner\0plain-secret-pw")).code == 235


def test_auth_login(auth_relay):
    with session(auth_relay) as c:
        assert c.cmd("AUTH LOGIN").lines == [str(replies.AUTH_USERNAME)]
        assert c.cmd(b64(b"app")).lines == [str(replies.AUTH_PASSWORD)]
        assert c.cmd(b64(b"s3cret-pass")).code == 235
    with session(auth_relay) as c:
        assert c.cmd("AUTH LOGIN " + b64(b"app")).lines == [str(replies.AUTH_PASSWORD)]
        assert c.cmd(b64(b"wrong")).lines == ["535 5.7.8 Authentication credentials invalid"]


def test_user_may_send_only_as_its_own_senders(auth_relay):
    with session(auth_relay) as c:
        assert c.cmd("AUTH PLAIN " + b64(b"\0scanner\0plain-secret-pw")).code == 235
        assert c.cmd("MAIL FROM:<boss@example.com>").lines == ["550 5.7.1 Sender not allowed"]
        assert c.cmd("MAIL FROM:<scanner@example.com>").code == 250
    with session(auth_relay) as c:
        assert c.cmd("AUTH PLAIN " + b64(b"\0app\0s3cret-pass")).code == 235
        assert c.cmd("MAIL FROM:<someone@other.org>").code == 550
        assert c.cmd("MAIL FROM:<boss@example.com>").code == 250


def test_lockout_after_failures_then_it_ends(auth_relay):
    with session(auth_relay) as c:
        for _ in range(2):
            assert c.cmd("AUTH PLAIN " + b64(b"\0app\0nope")).code == 535
        assert c.cmd("AUTH PLAIN " + b64(b"\0app\0nope")).lines == [str(replies.AUTH_LOCKED_OUT)]
        assert c.closed()
    with RawSMTP(auth_relay.port) as c:
        r = c.reply()
        assert (r.code, r.enhanced) == (421, "4.7.0")
        assert c.closed()
    log = auth_relay.log()
    assert "AUTH failed for user app from 127.0.0.1" in log
    assert "nope" not in log and b64(b"\0app\0nope") not in log
    time.sleep(3.2)
    with session(auth_relay) as c:
        # even the right password was refused during the lockout; now it works
        assert c.cmd("AUTH PLAIN " + b64(b"\0app\0s3cret-pass")).code == 235


def test_auth_over_starttls_with_a_real_client(auth_relay, ca):
    import smtplib

    with smtplib.SMTP("127.0.0.1", auth_relay.port, timeout=10) as s:
        s.starttls(context=ssl.create_default_context(cafile=str(ca.ca_path)))
        s.login("app", "s3cret-pass")
        refused = s.sendmail("app@example.com", ["x@example.net"], b"Subject: tls\r\n\r\nhi\r\n")
        assert refused == {}
    data = auth_relay.wait_outbox(1)[0].read_bytes()
    assert b"with ESMTPSA id" in data


def test_plaintext_auth_is_not_offered_off_loopback(start_relay):
    address = non_loopback_address()
    relay = start_relay({"smtp": {"listen": "0.0.0.0:0", "auth": {
        "required": True, "users": {"app": PASSWORD_HASH}}}})
    with RawSMTP(relay.port, host=address) as c:
        c.reply()
        ext = [line[4:] for line in c.cmd("EHLO x").lines[1:]]
        assert not any(e.startswith("AUTH") for e in ext)
        assert (c.cmd("AUTH PLAIN " + b64(b"\0app\0s3cret-pass")).lines
                == [str(replies.ENCRYPTION_REQUIRED)])
        assert c.cmd("MAIL FROM:<a@example.com>").code == 530


def test_plaintext_auth_off_loopback_when_allowed(start_relay):
    address = non_loopback_address()
    relay = start_relay({"smtp": {"listen": "0.0.0.0:0", "auth": {
        "required": True, "allow_plaintext": True, "users": {"app": PASSWORD_HASH}}}})
    with RawSMTP(relay.port, host=address) as c:
        c.reply()
        assert "250-AUTH PLAIN LOGIN" in c.cmd("EHLO x").lines
        assert c.cmd("AUTH PLAIN " + b64(b"\0app\0s3cret-pass")).code == 235


def test_implicit_tls_listener(start_relay, tls_config, ca):
    relay = start_relay({"smtp": {**tls_config["smtp"], "tls_listen": ["127.0.0.1:0"]}})
    assert len(relay.smtp_ports) == 2
    with RawSMTP(relay.smtp_ports[1], tls=True, ca=str(ca.ca_path)) as c:
        assert c.reply().code == 220
        ext = [line[4:] for line in c.cmd("EHLO x").lines[1:]]
        assert "STARTTLS" not in ext
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")


def test_tls_minimum_version_is_enforced(start_relay, tls_config, ca):
    relay = start_relay({"smtp": {**tls_config["smtp"], "tls_minimum_version": "1.3"}})
    with session(relay) as c:
        assert c.cmd("STARTTLS").code == 220
        ctx = ssl.create_default_context(cafile=str(ca.ca_path))
        ctx.check_hostname = False
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(c.sock, server_hostname="localhost")


# --- sender policy -------------------------------------------------------------------------


@pytest.fixture
def policy_relay(start_relay):
    def make(**sender):
        return start_relay({"sender": {"default": "relay@company.com",
                                       "allowed": ["@company.com", "*.branch.org"], **sender}})
    return make


def send(relay, sender, recipients, body, expect=250):
    with session(relay) as c:
        r = c.cmd(f"MAIL FROM:<{sender}>")
        if r.code != 250:
            return r
        for rcpt in recipients:
            assert c.cmd(f"RCPT TO:<{rcpt}>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(body + b".\r\n")
        return c.reply()


def test_envelope_sender_outside_the_list_is_rejected(policy_relay):
    relay = policy_relay()
    r = send(relay, "x@evil.org", ["a@b.org"], b"")
    assert r.lines == ["550 5.7.1 Sender not allowed"]
    r = send(relay, "x@eu.branch.org", ["a@b.org"], b"From: x@eu.branch.org\r\n\r\nhi\r\n")
    assert r.code == 250


def test_header_from_outside_the_list_is_rejected(policy_relay):
    relay = policy_relay()
    r = send(relay, "app@company.com", ["a@b.org"],
             b"From: ceo@evil.org\r\nSubject: x\r\n\r\nhi\r\n")
    assert r.lines == ["550 5.7.1 Sender not allowed in From header"]
    r = send(relay, "app@company.com", ["a@b.org"], b"From: garbage\r\n\r\nhi\r\n")
    assert r.code == 550
    assert relay.outbox_files() == []


def test_header_check_can_be_switched_off(policy_relay):
    relay = policy_relay(check_header_from=False)
    r = send(relay, "app@company.com", ["a@b.org"], b"From: ceo@evil.org\r\n\r\nhi\r\n")
    assert r.code == 250


def test_rewrite_sends_as_default_and_keeps_the_original_as_reply_to(policy_relay):
    relay = policy_relay(on_disallowed="rewrite")
    body = b"From: Printer <printer@lobby.local>\r\nSubject: scan\r\n\r\nscan attached\r\n"
    r = send(relay, "printer@lobby.local", ["a@b.org"], body)
    assert r.code == 250
    env_from, _env_to, data = parse_outbox(relay.wait_outbox(1)[0])
    assert env_from == "relay@company.com"
    assert b"\r\nFrom: relay@company.com\r\n" in data
    assert b"\r\nReply-To: Printer <printer@lobby.local>\r\n" in data
    assert data.endswith(b"Subject: scan\r\nFrom: relay@company.com\r\n"
                         b"Reply-To: Printer <printer@lobby.local>\r\n\r\nscan attached\r\n")
    head = data.split(b"\r\n\r\n", 1)[0]
    assert b"lobby.local" not in head.split(b"Reply-To")[0].split(b"Received")[1]


# --- direct mode -----------------------------------------------------------------------------


def test_direct_mode_answers_after_the_provider(start_relay):
    relay = start_relay({"delivery": {"mode": "direct"}})
    with session(relay) as c:
        c.cmd("MAIL FROM:<a@example.com>")
        c.cmd("RCPT TO:<b@example.com>")
        c.cmd("DATA")
        c.send(b"Subject: direct\r\n\r\nnow\r\n.\r\n")
        r = c.reply()
        assert r.code == 250 and r.text.startswith("2.0.0 Ok: sent "), r
        message_id = r.text.rsplit(" ", 1)[1]
    # the outbox already has it when the 250 arrives
    assert len(relay.outbox_files()) == 1
    assert relay.query("SELECT status FROM messages WHERE id = ?", (message_id,)) == [("sent",)]


def test_direct_mode_temporary_failure_is_451(start_relay, tmp_path):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the outbox should be")
    relay = start_relay({"delivery": {"mode": "direct"},
                         "provider": {"type": "outbox", "directory": str(blocked)}})
    with session(relay) as c:
        c.cmd("MAIL FROM:<a@example.com>")
        c.cmd("RCPT TO:<b@example.com>")
        c.cmd("DATA")
        c.send(b"Subject: direct\r\n\r\nnow\r\n.\r\n")
        r = c.reply()
        assert r.code == 451 and r.enhanced.startswith("4."), r
        assert "outbox" in r.text
    [(status, error)] = relay.query("SELECT status, error FROM messages")
    assert status == "failed" and "direct mode" in error
