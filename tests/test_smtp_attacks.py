"""One test per known hole of Twisted's ESMTP, each sending the attack bytes
to the real relay over a real socket and checking what reached the outbox."""

import os
import subprocess
import time

import pytest

from smtprelay import replies
from smtprelay.passwords import hash_password
from tests.relay import RawSMTP, parse_outbox, strip_received

PASSWORD_HASH = hash_password(b"right-password", ln=10)


def b64(data):
    import base64

    return base64.b64encode(data).decode()


def start_data(c, sender="app@example.com", rcpt="victim@example.com"):
    assert c.reply().code == 220
    assert c.cmd("EHLO attacker.test").code == 250
    assert c.cmd(f"MAIL FROM:<{sender}>").code == 250
    assert c.cmd(f"RCPT TO:<{rcpt}>").code == 250
    assert c.cmd("DATA").code == 354


# what a smuggler puts behind a fake end of data: a second transaction, whose
# body ends at the real CRLF.CRLF that follows
SMUGGLED = (b"MAIL FROM:<ceo@example.com>\r\n"
            b"RCPT TO:<forged@example.com>\r\n"
            b"DATA\r\n"
            b"Subject: forged\r\n\r\nwire the money")


def assert_no_forgery(relay, expected_messages):
    time.sleep(0.5)
    files = relay.outbox_files()
    assert len(files) == expected_messages, [f.read_bytes()[:300] for f in files]
    for f in files:
        _, env_to, _data = parse_outbox(f)
        assert "forged@example.com" not in env_to
    return files


def test_overlong_line_in_data_does_not_return_to_command_mode(start_relay):
    """Twisted answers 500 mid-body and parses the rest of the body as commands."""
    relay = start_relay({"smtp": {"max_line_length": 1000}})
    with RawSMTP(relay.port) as c:
        start_data(c)
        c.send(b"Subject: long\r\n\r\n" + b"A" * 5000 + b"\r\n" + SMUGGLED + b"\r\n.\r\n")
        r = c.reply()
        assert r.lines == ["500 5.5.6 Line too long"]
        # exactly one reply for the whole body: nothing of it ran as a command
        assert c.cmd("NOOP").lines == [str(replies.OK)]
    assert_no_forgery(relay, 0)


def test_lines_over_998_but_within_the_limit_are_kept(relay):
    line = b"<td>" + b"x" * 5000 + b"</td>"
    with RawSMTP(relay.port) as c:
        start_data(c)
        c.send(b"Subject: html\r\n\r\n" + line + b"\r\n.\r\n")
        assert c.reply().code == 250
    _, _, data = parse_outbox(relay.wait_outbox(1)[0])
    assert strip_received(data) == b"Subject: html\r\n\r\n" + line + b"\r\n"


def test_starttls_discards_pipelined_plaintext_and_resets_state(start_relay, tls_config, ca):
    """CVE-2011-0411: commands injected behind STARTTLS must not run inside TLS."""
    relay = start_relay(tls_config)
    with RawSMTP(relay.port) as c:
        assert c.reply().code == 220
        assert c.cmd("EHLO attacker.test").code == 250
        assert c.cmd("MAIL FROM:<app@example.com>").code == 250  # state before TLS
        c.send(b"STARTTLS\r\nRCPT TO:<forged@example.com>\r\nDATA\r\n")
        assert c.reply().lines == [str(replies.READY_FOR_TLS)]
        c.starttls(ca=str(ca.ca_path))
        # neither the injected RCPT nor the MAIL from before TLS survived
        assert c.cmd("RCPT TO:<victim@example.com>").lines == [str(replies.NEED_MAIL)]
        assert c.cmd("EHLO again.test").code == 250
        assert c.cmd("STARTTLS").code == 503
    assert_no_forgery(relay, 0)


def test_starttls_forgets_authentication(start_relay, tls_config, ca):
    relay = start_relay({"smtp": {**tls_config["smtp"], "auth": {
        "required": True, "users": {"app": PASSWORD_HASH}}}})
    with RawSMTP(relay.port) as c:
        c.reply()
        c.cmd("EHLO x")
        assert c.cmd("AUTH PLAIN " + b64(b"\0app\0right-password")).code == 235  # loopback
        assert c.cmd("STARTTLS").code == 220
        c.starttls(ca=str(ca.ca_path))
        c.cmd("EHLO x")
        assert c.cmd("MAIL FROM:<app@example.com>").lines == [str(replies.AUTH_REQUIRED)]


@pytest.mark.parametrize("ending", [
    b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r\n.\r", b"\r.\r\n", b"\n.\r", b"\r\n.\x00\r\n",
])
def test_bare_newline_variants_never_end_data(relay, ending):
    """SMTP smuggling: only CRLF.CRLF ends DATA; a variant must not start a second message."""
    with RawSMTP(relay.port) as c:
        start_data(c)
        c.send(b"Subject: first\r\n\r\nbody" + ending + SMUGGLED + b"\r\n.\r\n")
        r = c.reply()
        if b"\x00" in ending:
            assert r.lines == ["550 5.6.0 NUL character not allowed"]
        else:
            assert r.code == 250, r
        assert c.cmd("QUIT").code == 221
    files = assert_no_forgery(relay, 0 if b"\x00" in ending else 1)
    if files:
        _env_from, env_to, data = parse_outbox(files[0])
        assert env_to == ["victim@example.com"]
        # one message, with the would-be second one inside it as text
        assert b"wire the money" in data


def test_bare_newlines_are_normalized(relay):
    with RawSMTP(relay.port) as c:
        start_data(c)
        c.send(b"Subject: unix\nX-A: 1\r\n\nline one\nline two\rline three\r\n.\r\n")
        assert c.reply().code == 250
    _, _, data = parse_outbox(relay.wait_outbox(1)[0])
    assert strip_received(data) == (b"Subject: unix\r\nX-A: 1\r\n\r\nline one\r\nline two\r\n"
                                    b"line three\r\n")


def test_bare_newlines_rejected_when_configured(start_relay):
    relay = start_relay({"smtp": {"bare_newlines": "reject"}})
    with RawSMTP(relay.port) as c:
        start_data(c)
        c.send(b"Subject: unix\n\nbody\n.\n" + SMUGGLED + b"\r\n.\r\n")
        assert c.reply().lines == ["550 5.6.0 Bare CR or LF not allowed"]
        assert c.cmd("NOOP").code == 250
    assert_no_forgery(relay, 0)


@pytest.mark.parametrize("lines,reply", [
    (["AUTH"], replies.AUTH_SYNTAX),
    (["AUTH PLAIN !!!notbase64"], replies.AUTH_BAD_BASE64),
    (["AUTH PLAIN " + b64(b"no-nul-separators")], replies.AUTH_BAD_PLAIN),
    (["AUTH PLAIN " + b64(b"\0only-user")], replies.AUTH_BAD_PLAIN),
    (["AUTH PLAIN " + b64(b"a\0b\0c\0d")], replies.AUTH_BAD_PLAIN),
    (["AUTH PLAIN", "*"], replies.AUTH_CANCELLED),
    (["AUTH LOGIN", b64(b"app"), "*"], replies.AUTH_CANCELLED),
    (["AUTH LOGIN", "%%%"], replies.AUTH_BAD_BASE64),
    (["AUTH CRAM-MD5"], replies.AUTH_MECHANISM_UNKNOWN),
    # raw bytes, not the table: a wrong table entry must still fail a test
    (["AUTH PLAIN " + b64(b"\xff\xfe\0\xff\0\xff")],
     "535 5.7.8 Authentication credentials invalid"),
    (["AUTH PLAIN " + "A" * 20000], replies.LINE_TOO_LONG),
])
def test_malformed_auth_gets_a_reply_not_a_dropped_connection(start_relay, lines, reply):
    relay = start_relay({"smtp": {"auth": {"users": {"app": PASSWORD_HASH}}}})
    with RawSMTP(relay.port) as c:
        c.reply()
        c.cmd("EHLO x")
        for line in lines[:-1]:
            assert c.cmd(line).code == 334
        r = c.cmd(lines[-1])
        assert r.lines == [str(reply)], r
        # the session is alive and well
        assert c.cmd("NOOP").code == 250
        assert c.cmd("AUTH PLAIN " + b64(b"\0app\0right-password")).code == 235
    assert "Traceback" not in relay.log()


def test_storage_failure_is_451_and_nothing_is_half_stored(start_relay, tmp_path):
    """A full disk under the database: 451 4.3.0, then recovery when space returns."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mountpoint)],
                       check=True, capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        if os.environ.get("SMTPRELAY_REQUIRE_TOOLS"):
            raise
        pytest.skip(f"cannot mount a small tmpfs here: {e}")
    try:
        relay = start_relay({"database": {"url": f"sqlite:///{mountpoint / 'relay.db'}"}})
        filler = mountpoint / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        with RawSMTP(relay.port) as c:
            start_data(c)
            c.send(b"Subject: too big for the disk\r\n\r\n" + (b"y" * 998 + b"\r\n") * 300
                   + b".\r\n")
            r = c.reply()
            assert (r.code, r.enhanced) == (451, "4.3.0"), r
            filler.unlink()
            assert c.cmd("MAIL FROM:<app@example.com>").code == 250
            c.cmd("RCPT TO:<victim@example.com>")
            c.cmd("DATA")
            c.send(b"Subject: after\r\n\r\nfits now\r\n.\r\n")
            assert c.reply().code == 250
        files = relay.wait_outbox(1)
        time.sleep(0.5)
        assert len(relay.outbox_files()) == 1
        assert b"fits now" in files[0].read_bytes()
        assert relay.query("SELECT COUNT(*) FROM messages") == [(1,)]
        relay.stop()
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


@pytest.mark.parametrize("command", [
    'MAIL FROM:<"unbalanced@example.com>',
    "MAIL FROM:<a@b@c.com>",
    "MAIL FROM:<@route-without-colon>",
    "MAIL FROM:<a@b.c>junk",
    "MAIL FROM:<a\x01b@c.com>",
    "MAIL FROM:<é@example.com>",
    "RCPT TO:<\"unbalanced@example.com>",
    "RCPT TO:<a@b@c.com>",
    "RCPT TO:<a@[300.1.1.1>",
])
def test_address_errors_always_get_a_reply(relay, command):
    """Twisted raises AddressError with a bytes message and sends nothing."""
    with RawSMTP(relay.port) as c:
        c.reply()
        c.cmd("EHLO x")
        if command.startswith("RCPT"):
            assert c.cmd("MAIL FROM:<app@example.com>").code == 250
        r = c.cmd(command.encode("utf-8"))
        assert r.code in (500, 501, 553), r
        assert r.enhanced is not None
        assert c.cmd("NOOP").code == 250


def test_size_parameter_is_enforced(start_relay):
    relay = start_relay({"smtp": {"max_message_size": "1MB"}})
    with RawSMTP(relay.port) as c:
        c.reply()
        c.cmd("EHLO x")
        assert c.cmd("MAIL FROM:<a@example.com> SIZE=1000001").lines == [str(replies.SIZE_EXCEEDED)]
        assert c.cmd("MAIL FROM:<a@example.com> SIZE=abc").code == 501


def test_pipelined_replies_come_back_in_order(start_relay):
    """With an asynchronous AUTH check and an asynchronous commit in the middle of
    a pipelined burst, the replies still come back one per command, in order."""
    relay = start_relay({"smtp": {"auth": {"users": {"app": PASSWORD_HASH}}}})
    burst = [
        "EHLO x",
        "AUTH PLAIN " + b64(b"\0app\0right-password"),
        "MAIL FROM:<app@example.com>",
        "RCPT TO:<one@example.com>",
        "RCPT TO:<bad address>",
        "RCPT TO:<two@example.com>",
        "DATA",
    ]
    with RawSMTP(relay.port) as c:
        c.reply()
        c.send(("\r\n".join(burst) + "\r\n").encode()
               + b"Subject: pipelined\r\n\r\nbody\r\n.\r\n"
               + b"MAIL FROM:<app@example.com>\r\nRCPT TO:<three@example.com>\r\nDATA\r\n"
               + b"Subject: second\r\n\r\nbody2\r\n.\r\nNOOP\r\nQUIT\r\n")
        codes = [r.code for r in c.replies(14)]
    assert codes == [250, 235, 250, 250, 501, 250, 354, 250, 250, 250, 354, 250, 250, 221]
    files = relay.wait_outbox(2)
    envelopes = sorted(parse_outbox(f)[1] for f in files)
    assert envelopes == [["one@example.com", "two@example.com"], ["three@example.com"]]


def test_auth_is_not_accepted_over_plaintext_from_afar(start_relay):
    """Twisted accepts AUTH over plaintext from anywhere."""
    from tests.network import non_loopback_address

    address = non_loopback_address()
    relay = start_relay({"smtp": {"listen": "0.0.0.0:0", "auth": {
        "required": True, "users": {"app": PASSWORD_HASH}}}})
    with RawSMTP(relay.port, host=address) as c:
        c.reply()
        c.cmd("EHLO x")
        r = c.cmd("AUTH PLAIN " + b64(b"\0app\0right-password"))
        assert (r.code, r.enhanced) == (replies.ENCRYPTION_REQUIRED.code,
                                        replies.ENCRYPTION_REQUIRED.status)


def test_after_auth_not_every_sender_is_accepted(start_relay):
    """Twisted accepts any MAIL FROM once a client has authenticated."""
    relay = start_relay({
        "smtp": {"auth": {"users": {"app": {"password": PASSWORD_HASH,
                                             "allowed": ["app@example.com"]}}}},
        "sender": {"default": "relay@example.com", "allowed": ["@example.com"]},
    })
    with RawSMTP(relay.port) as c:
        c.reply()
        c.cmd("EHLO x")
        assert c.cmd("AUTH PLAIN " + b64(b"\0app\0right-password")).code == 235
        assert c.cmd("MAIL FROM:<ceo@example.com>").lines == ["550 5.7.1 Sender not allowed"]
        assert c.cmd("MAIL FROM:<ceo@elsewhere.org>").code == 550
        assert c.cmd("MAIL FROM:<app@example.com>").code == 250


def test_nul_and_8bit_in_commands(relay):
    with RawSMTP(relay.port) as c:
        c.reply()
        assert c.cmd(b"EHLO x\x00y").code == 500
        assert c.cmd(b"NOOP \xff\xfe").code == 500
        assert c.cmd("NOOP").code == 250


def test_overlong_command_line(relay):
    with RawSMTP(relay.port) as c:
        c.reply()
        c.send(b"EHLO " + b"a" * 100_000 + b"\r\nNOOP\r\n")
        assert c.reply().lines == [str(replies.LINE_TOO_LONG)]
        assert c.reply().lines == [str(replies.OK)]


@pytest.mark.parametrize("path", ["<\t>", "< >", "< a@example.com>", "<a@example.com >"])
def test_whitespace_in_a_path_is_not_the_null_sender(relay, path):
    """Found by the fuzzer: "<\\t>" used to be read as "<>"."""
    with RawSMTP(relay.port) as c:
        c.reply()
        c.cmd("EHLO x")
        r = c.cmd(f"MAIL FROM:{path}")
        assert r.code == 501, r
