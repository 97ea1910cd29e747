"""End to end through the real relay (twistd) to the fake Gmail API (a process), over HTTPS.

Owns the evidence that issue 5's "done when" holds with every room of the relay in
the way: an SMTP client (smtplib) talks to ``twistd smtprelay`` configured with
``provider.type = "gmail"``, which stores, queues and delivers to
``python -m tests.fakes.gmail`` on loopback with the test CA.  The fake records what
it was sent; the relay's SQLite database says what the relay thinks happened.

A message with attachments arrives byte-exact (plus our Received header and the
Bcc added for an envelope-only recipient); a 30 MB message too; exactly the
envelope's recipients receive; credential problems defer and warn and the mail
flows once fixed; rate limits hold back one mailbox and not the others; a storm
of 500s loses nothing; a lost answer is retried (at-least-once).
"""

import base64
import hashlib
import os
import smtplib
import time
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY

import pytest

from tests.fakes.google_accounts import GMAIL_SEND, OAuthUser, ServiceAccountKey
from tests.gmail_support import FakeGoogleProcess
from tests.relay import RelayProcess, strip_received

APP = "app@example.com"
OTHER = "other@example.com"
DENIED = "denied@example.com"
DEFAULT = "relay@example.com"
ALICE = "alice@example.org"
BOB = "bob@example.org"
HIDDEN = "hidden@example.net"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def google(tmp_path_factory, ca):
    fake = FakeGoogleProcess(ca.directory, tmp_path_factory.mktemp("fake") / "fake.log")
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def account():
    return ServiceAccountKey.generate()


@pytest.fixture
def fake(google, account):
    """The fake, emptied, with the test's mailboxes and a service account delegated for
    every mailbox of example.com but DENIED."""
    google.control("POST", "reset")
    for mailbox in (APP, OTHER, DENIED, DEFAULT):
        google.control("POST", "mailboxes", {"address": mailbox})
    delegations = {m: [GMAIL_SEND] for m in (APP, OTHER, DEFAULT)}
    google.control("POST", "service-accounts", account.registration(delegations))
    return google


@pytest.fixture
def gmail_relay(tmp_path, fake, account, ca):
    """start(provider_overrides, **config) -> a running relay sending through the fake."""
    relays = []

    def start(provider=None, name="relay", env=None, **config):
        directory = tmp_path / name
        directory.mkdir(parents=True, exist_ok=True)
        relay = RelayProcess(directory, config, env=env)
        settings = {"type": "gmail",
                    "service_account_file": str(account.write(directory / "sa.json")),
                    "token_uri": fake.token_uri, "api_endpoint": fake.url,
                    "ca_file": str(ca.ca_path), "timeout": "5s"}
        settings.update(provider or {})
        relay.config["provider"] = {k: v for k, v in settings.items() if v is not None}
        relay.config["sender"]["default"] = DEFAULT
        relays.append(relay)
        return relay.start()

    yield start
    for relay in relays:
        relay.stop()


def send(relay, sender, recipients, data):
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as s:
        assert s.sendmail(sender, recipients, data) == {}


def simple(sender=APP, to=ALICE, subject="hello", message_id=None, extra=""):
    message_id = message_id or f"<{subject.replace(' ', '-')}@app.example>"
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {message_id}\r\n"
            f"{extra}\r\nbody of {subject}\r\n").encode()


def row(relay, message_id):
    rows = relay.query("SELECT id, status, provider_id, error FROM messages "
                       "WHERE message_id = ?", (message_id,))
    return rows[0] if rows else None


def attempts(relay, relay_id):
    return relay.query("SELECT outcome, detail FROM attempts WHERE message_id = ? ORDER BY at",
                       (relay_id,))


def wait_row(relay, message_id, statuses, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = row(relay, message_id)
        if r and r[1] in statuses:
            return r
        time.sleep(0.1)
    raise AssertionError(f"{message_id}: {row(relay, message_id)}\n{relay.log()[-4000:]}")


def rich_message():
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = f"Scanner Lobby <{APP}>"
    msg["To"] = f"Alice <{ALICE}>"
    msg["Cc"] = BOB
    msg["Subject"] = "Scan: Überweisung für März"
    msg["Message-ID"] = "<scan-0001@scanner.example.com>"
    msg["X-Custom"] = "kept as is"
    msg.set_content("Grüße aus dem Büro.\nLine two.\n.starts with a dot\n", charset="utf-8",
                    cte="8bit")
    msg.add_alternative("<p>Grüße <b>aus</b> dem Büro <img src='cid:logo'></p>", subtype="html",
                        charset="utf-8")
    msg.get_payload()[1].add_related(os.urandom(5000), "image", "png", cid="<logo>")
    msg.add_attachment(bytes(range(256)) * 400, maintype="application", subtype="pdf",
                       filename="scan 1.pdf")
    msg.add_attachment("ça va\r\n".encode("latin-1"), maintype="text", subtype="plain",
                       filename="notes.txt")
    return msg.as_bytes()


def test_attachments_byte_exact_bcc_invisible(gmail_relay, fake):
    relay = gmail_relay()
    data = rich_message()
    send(relay, APP, [ALICE, BOB, HIDDEN], data)
    (sent,) = fake.wait_messages(1, relay=relay)
    # what the client sent, our Received header in front, the Bcc-only recipient added
    # as Bcc at the end of the header block: nothing else changed
    expected = data.replace(b"\r\n\r\n", f"\r\nBcc: {HIDDEN}\r\n\r\n".encode(), 1)
    assert sent["raw"].startswith(b"Received: from ")
    assert strip_received(sent["raw"]) == expected
    assert sent["recipients"] == [ALICE, BOB, HIDDEN]
    assert sent["bcc"] == [HIDDEN]
    assert HIDDEN.encode() not in sent["delivered"]  # Gmail removes Bcc: invisible
    assert (sent["mailbox"], sent["user_id"], sent["from_rewritten"]) == (APP, APP, False)
    relay_id, _status, provider_id, _ = wait_row(relay, "<scan-0001@scanner.example.com>",
                                                ("sent",))
    assert provider_id == sent["id"]
    assert attempts(relay, relay_id) == [("sent", f"200 id={sent['id']} "
                                                  f"threadId={sent['thread_id']}")]


def test_thirty_megabytes(gmail_relay, fake):
    relay = gmail_relay()
    line = base64.b64encode(os.urandom(57)) + b"\r\n"  # 78 bytes per line
    body = line * (30_000_000 // len(line))
    data = (f"From: {APP}\r\nTo: {ALICE}\r\nSubject: big\r\nMessage-ID: <big@app.example>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n").encode() + body
    assert len(data) > 30_000_000
    send(relay, APP, [ALICE], data)
    (sent,) = fake.wait_messages(1, timeout=120, bodies=False, relay=relay)
    stored = relay.query("SELECT size FROM messages WHERE message_id = '<big@app.example>'")
    assert sent["raw_size"] == stored[0][0]
    received_len = sent["raw_size"] - len(data)
    assert 0 < received_len < 300
    raw = fake.messages()[0]["raw"]
    assert strip_received(raw) == data
    assert hashlib.sha256(raw).hexdigest() == sent["raw_sha256"]
    wait_row(relay, "<big@app.example>", ("sent",))


def test_header_only_recipients_receive_nothing(gmail_relay, fake):
    relay = gmail_relay()
    data = simple(to=f"Alice <{ALICE}>, Carol <carol@example.org>",
                  extra="Cc: dave@example.org\r\n", message_id="<h@app.example>")
    send(relay, APP, [ALICE, HIDDEN], data)
    (sent,) = fake.wait_messages(1, relay=relay)
    assert sent["recipients"] == [ALICE, HIDDEN]
    assert b"carol@" not in sent["raw"] and b"dave@" not in sent["raw"]
    expected = data.replace(b", Carol <carol@example.org>", b"").replace(
        b"Cc: dave@example.org\r\n", b"").replace(
        b"\r\n\r\n", f"\r\nBcc: {HIDDEN}\r\n\r\n".encode(), 1)
    assert strip_received(sent["raw"]) == expected
    wait_row(relay, "<h@app.example>", ("sent",))
    log = relay.log()
    assert "the visible recipient headers changed" in log
    assert "removed carol@example.org from To" in log


def test_delegation_refused_defers_then_delivers(gmail_relay, fake, account):
    relay = gmail_relay()
    send(relay, DENIED, [ALICE], simple(sender=DENIED, message_id="<d@app.example>"))
    deadline = time.monotonic() + 20
    while "gmail credential problem" not in relay.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    _relay_id, _status, _, error = wait_row(relay, "<d@app.example>", ("deferred",))
    assert error.startswith("delegation not granted for denied@example.com: "
                            "unauthorized_client"), error
    assert "gmail credential problem: delegation not granted for denied@example.com" in \
        relay.log()
    assert fake.messages() == []
    fake.control("POST", "delegations", {"client_email": account.client_email,
                                         "subject": DENIED, "scopes": [GMAIL_SEND]})
    wait_row(relay, "<d@app.example>", ("sent",), timeout=30)
    (sent,) = fake.messages()
    assert sent["mailbox"] == DENIED
    assert "gmail credential for denied@example.com works again" in relay.log()


def test_revoked_refresh_token_defers_and_warns(gmail_relay, fake):
    user = OAuthUser.generate(DEFAULT)
    fake.control("POST", "oauth-clients", user.client_registration())
    fake.control("POST", "refresh-tokens", user.token_registration(revoked=True))
    # the secrets come from the environment, as an administrator would keep them
    relay = gmail_relay({"service_account_file": None, "client_id": user.client_id,
                         "client_secret": {"env": "GMAIL_SECRET"},
                         "refresh_token": {"env": "GMAIL_REFRESH"}},
                        env={"GMAIL_SECRET": user.client_secret,
                             "GMAIL_REFRESH": user.refresh_token})
    send(relay, DEFAULT, [ALICE], simple(sender=DEFAULT, message_id="<r@app.example>"))
    _relay_id, _, _, error = wait_row(relay, "<r@app.example>", ("deferred",))
    assert error == ("refresh token revoked or expired: invalid_grant: Token has been expired "
                     "or revoked.")
    assert "gmail credential problem: refresh token revoked or expired" in relay.log()
    # a new consent for the same token (the fake's way of un-revoking) lets it drain
    fake.control("POST", "refresh-tokens", user.token_registration(revoked=False))
    wait_row(relay, "<r@app.example>", ("sent",))
    (sent,) = fake.messages()
    assert (sent["user_id"], sent["mailbox"]) == ("me", DEFAULT)
    log = relay.log(whole=True)
    assert user.client_secret not in log and user.refresh_token not in log


def test_429_then_recovery(gmail_relay, fake):
    fake.control("POST", "rate-limits", {"mailbox": APP, "max_sends": 1, "window": 3})
    relay = gmail_relay()
    ids = [f"<rl{n}@app.example>" for n in range(3)]
    for n, message_id in enumerate(ids):
        send(relay, APP, [ALICE], simple(subject=f"rl {n}", message_id=message_id))
    fake.wait_messages(3, timeout=40, relay=relay)
    for message_id in ids:
        wait_row(relay, message_id, ("sent",))
    details = [d for (mid,) in relay.query("SELECT id FROM messages") for _, d in
               attempts(relay, mid)]
    limited = [d for d in details if d.startswith("429 rateLimitExceeded")]
    assert limited, details
    assert all("sending as app@example.com paused until" in d for d in limited)
    # the pause came from Gmail's own "Retry after <time>", not from our 60 s default
    sent_at = sorted(m["received_at"] for m in fake.messages(bodies=False))
    assert sent_at[-1] - sent_at[0] < 30


def test_403_rate_limit_holds_back_that_mailbox_only(gmail_relay, fake):
    fake.control("POST", "faults", {"route": "send", "mailbox": APP, "status": 403,
                                    "reason": "userRateLimitExceeded", "retry_after": 6})
    relay = gmail_relay()
    send(relay, APP, [ALICE], simple(subject="a1", message_id="<a1@app.example>"))
    wait_row(relay, "<a1@app.example>", ("deferred",))
    paused = relay.query("SELECT not_before FROM mailboxes WHERE mailbox = ?", (APP,))
    assert paused and paused[0][0] > time.time() + 2
    send(relay, APP, [ALICE], simple(subject="a2", message_id="<a2@app.example>"))
    send(relay, OTHER, [ALICE], simple(sender=OTHER, subject="b1",
                                       message_id="<b1@app.example>"))
    # the other mailbox is not held back
    wait_row(relay, "<b1@app.example>", ("sent",), timeout=10)
    assert [m["mailbox"] for m in fake.messages(bodies=False)] == [OTHER]
    # the second message of the paused mailbox waits without an attempt
    a2 = row(relay, "<a2@app.example>")
    assert a2[1] == "queued" and attempts(relay, a2[0]) == []
    # and both go once the pause is over
    wait_row(relay, "<a1@app.example>", ("sent",), timeout=30)
    wait_row(relay, "<a2@app.example>", ("sent",), timeout=30)
    a1_id = row(relay, "<a1@app.example>")[0]
    assert attempts(relay, a1_id)[0][1].startswith("403 userRateLimitExceeded: ")


def test_500_storm_loses_nothing(gmail_relay, fake):
    fake.control("POST", "faults", {"route": "send", "status": 500, "count": None,
                                    "probability": 0.5})
    relay = gmail_relay()
    ids = []
    for n in range(16):
        sender = (APP, OTHER, DEFAULT)[n % 3]
        message_id = f"<storm{n}@app.example>"
        ids.append(message_id)
        send(relay, sender, [ALICE], simple(sender=sender, subject=f"storm {n}",
                                            message_id=message_id))
    for message_id in ids:
        wait_row(relay, message_id, ("sent",), timeout=90)
    delivered = [m["message_id"] for m in fake.messages(bodies=False)]
    assert sorted(delivered) == sorted(ids)  # each exactly once
    failures = relay.query("SELECT COUNT(*) FROM attempts WHERE detail LIKE '500 backendError%'")
    assert failures[0][0] > 0


def test_lost_answer_is_retried(gmail_relay, fake):
    # the fake sends the message, then never answers: the relay cannot know, retries
    fake.control("POST", "faults", {"route": "send", "kind": "hang", "process": True})
    relay = gmail_relay({"timeout": "1s"})
    send(relay, APP, [ALICE], simple(message_id="<amb@app.example>"))
    relay_id, *_ = wait_row(relay, "<amb@app.example>", ("sent",), timeout=30)
    history = attempts(relay, relay_id)
    assert history[0][0] == "ambiguous"
    assert "after the whole message was sent: it may have been delivered" in history[0][1]
    assert history[-1][0] == "sent"
    # at-least-once: Gmail got it twice
    assert [m["message_id"] for m in fake.messages(bodies=False)] == ["<amb@app.example>"] * 2
