"""End to end: the real relay (twistd, SQLite, the queue) sending through the Graph fake.

A message goes in over SMTP (smtplib) and the test looks at what the fake
(``python -m tests.fakes.graph``, its own process) received: the call, the
recipients Graph computed, the bytes, the uploaded attachments, the requests
in flight per mailbox; and at the relay's database for deferrals and
failures.  The 100 MB test also measures the relay's peak memory.
"""

import base64
import datetime
import hashlib
import os
import re
import smtplib
import time

import pytest

from tests.graph_support import (
    ALL_PERMISSIONS,
    CLIENT,
    MAILBOX,
    MIB,
    FakeGraphProcess,
    build_message,
    relay_provider,
    self_signed_certificate,
    sized_message,
)
from tests.relay import RelayProcess, strip_received


@pytest.fixture(scope="module")
def graph_process(tmp_path_factory):
    fake = FakeGraphProcess(tmp_path_factory.mktemp("graph-ca"))
    yield fake
    fake.stop()


@pytest.fixture
def graph(graph_process):
    graph_process.setup()
    return graph_process


@pytest.fixture
def m365_relay(tmp_path):
    """m365_relay(fake, provider={...}, config={...}) -> a running relay sending through it."""
    relays = []

    def start(fake, provider=None, config=None, secret="Q~x8.secret-value-for-tests"):
        base = {"sender": {"default": MAILBOX, "allowed": ["*"]},
                "smtp": {"max_message_size": "150MB"},
                "delivery": {"retry": ["1s", "2s"]}}
        for key, value in (config or {}).items():
            base[key] = {**base.get(key, {}), **value}
        relay = RelayProcess(tmp_path / f"relay{len(relays)}", base)
        table = relay_provider(fake, secret=secret)
        table.setdefault("save_to_sent_items", True)
        table.update(provider or {})
        relay.config["provider"] = table
        relays.append(relay)
        return relay.start()

    yield start
    for relay in relays:
        relay.stop()


def submit(relay, raw, recipients=("ann@example.com",), sender=MAILBOX):
    """Send over SMTP; the relay's message id."""
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as s:
        s.ehlo("app.example")
        s.mail(sender)
        for r in recipients:
            code, text = s.rcpt(r)
            assert code == 250, (code, text)
        code, text = s.data(raw)
        assert code == 250, (code, text)
    return re.search(rb"queued as (\S+)", text).group(1).decode()


def stored(relay, message_id):
    return b"".join(row[0] for row in relay.query(
        "SELECT data FROM bodies WHERE message_id = ? ORDER BY seq", (message_id,)))


def attempts(relay, message_id):
    return relay.query("SELECT outcome, detail FROM attempts WHERE message_id = ? ORDER BY at",
                       (message_id,))


def wait_for(predicate, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def mime_of(record):
    return base64.b64decode(record["mime_b64"]) if record["mime_b64"] else None


def test_a_small_message_arrives_byte_exact(graph, m365_relay):
    relay = m365_relay(graph)
    raw = build_message(to=("ann@example.com",), cc=("carl@example.com",))
    message_id = submit(relay, raw, ("ann@example.com", "carl@example.com"))
    [record] = graph.messages(wait=1)
    assert relay.wait_status(message_id, ("sent",)) == "sent"
    assert record["method"] == "mime" and record["mailbox"] == MAILBOX
    assert mime_of(record) == stored(relay, message_id)
    assert strip_received(mime_of(record)) == raw
    assert base64.b64decode(record["delivered_mime_b64"]) == mime_of(record)
    assert sorted(record["recipients"]) == ["ann@example.com", "carl@example.com"]
    [(outcome, detail)] = attempts(relay, message_id)
    assert outcome == "sent" and "sendMail" in detail and "request-id" in detail


def test_the_default_keeps_no_copy_in_sent_items(graph, m365_relay):
    relay = m365_relay(graph, provider={"save_to_sent_items": False})
    raw = build_message()
    message_id = submit(relay, raw, ("ann@example.com", "hidden@example.com"))
    [record] = graph.messages(wait=1)
    assert relay.wait_status(message_id, ("sent",)) == "sent"
    assert (record["method"], record["saved_to_sent_items"]) == ("draft", False)
    assert mime_of(record) == stored(relay, message_id)  # the draft is made of the bytes
    assert (record["to"], record["bcc"]) == (["ann@example.com"], ["hidden@example.com"])
    assert graph.control("GET", "drafts")["drafts"] == []


def received_length(graph, relay):
    """How many bytes the relay's Received header adds (it is the same for every message)."""
    raw = build_message()
    message_id = submit(relay, raw)
    graph.messages(wait=1)
    relay.wait_status(message_id, ("sent",))
    graph.control("POST", "reset", {"records_only": True})
    return len(stored(relay, message_id)) - len(raw)


def test_just_under_and_just_over_the_sendmail_limit(graph, m365_relay):
    relay = m365_relay(graph)
    extra = received_length(graph, relay)
    attachment = os.urandom(2 * MIB + 100_000)
    under = sized_message(3 * MIB - extra)
    over = sized_message(3 * MIB - extra + 1,
                         attachments=[("report.pdf", attachment, "application/pdf")])
    ids = [submit(relay, under), submit(relay, over)]
    records = graph.messages(wait=2)
    for message_id in ids:
        assert relay.wait_status(message_id, ("sent",)) == "sent"
    by_size = {r["mime_size"]: r for r in records}
    first = by_size[3 * MIB]  # stored: exactly the most one sendMail takes
    assert first["method"] == "mime" and strip_received(mime_of(first)) == under
    [second] = [r for r in records if r["method"] == "draft"]
    [moved] = [a for a in second["attachments"] if a["source"] == "attachments"]
    assert base64.b64decode(moved["content_b64"]) == attachment
    assert len(stored(relay, ids[1])) == 3 * MIB + 1
    assert graph.control("GET", "drafts")["drafts"] == []


def test_a_20_mb_attachment_is_reassembled_byte_exact(graph, m365_relay):
    relay = m365_relay(graph)
    content = os.urandom(20 * MIB + 4321)
    raw = build_message(attachments=[("scan 2024.pdf", content, "application/pdf")],
                        html="<p>see attached</p>")
    message_id = submit(relay, raw, ("ann@example.com", "hidden@example.com"))
    [record] = graph.messages(wait=1, timeout=120)
    assert relay.wait_status(message_id, ("sent",)) == "sent"
    assert record["method"] == "draft"
    [upload] = [a for a in record["attachments"] if a["source"] == "upload"]
    assert (upload["name"], upload["contentType"], upload["size"]) == (
        "scan 2024.pdf", "application/pdf", len(content))
    assert base64.b64decode(upload["content_b64"]) == content
    assert record["to"] == ["ann@example.com"] and record["bcc"] == ["hidden@example.com"]
    requests = graph.control("GET", "requests")["requests"]
    uploads = [r for r in requests if r["route"] == "upload"]
    assert len(uploads) == 6 and not any(r["authorization"] for r in uploads)
    assert all(r["length"] % (320 * 1024) == 0 for r in uploads[:-1])
    assert graph.control("GET", "drafts")["drafts"] == []


def test_bcc_only_recipients_are_delivered_and_invisible(graph, m365_relay):
    relay = m365_relay(graph)
    raw = build_message(to=("ann@example.com",))
    submit(relay, raw, ("ann@example.com", "secret@example.com", "audit@example.org"))
    [record] = graph.messages(wait=1)
    assert record["method"] == "mime"
    assert sorted(record["recipients"]) == ["ann@example.com", "audit@example.org",
                                            "secret@example.com"]
    delivered = base64.b64decode(record["delivered_mime_b64"])
    assert b"secret@" not in delivered and b"audit@" not in delivered
    assert strip_received(delivered) == raw


def test_header_only_recipients_are_not_delivered(graph, m365_relay):
    relay = m365_relay(graph)
    raw = build_message(to=("ann@example.com", "everyone@example.com"),
                        cc=("boss@example.com",))
    message_id = submit(relay, raw, ("ann@example.com",))
    [record] = graph.messages(wait=1)
    assert record["recipients"] == ["ann@example.com"]
    assert record["method"] == "draft"
    assert relay.wait_status(message_id, ("sent",)) == "sent"
    [(_, detail)] = attempts(relay, message_id)
    assert "not delivered to header-only everyone@example.com, boss@example.com" in detail
    assert "recipients set explicitly on the draft" in relay.log()


def parse_at(text):
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_throttling_with_retry_after_holds_the_whole_mailbox(graph, m365_relay):
    relay = m365_relay(graph)
    graph.control("POST", "faults", {"route": "sendMail", "status": 429, "retry_after": 4})
    first = submit(relay, build_message(subject="first"))
    wait_for(lambda: graph.stats()["statuses"].get("sendMail", {}).get("429"), what="the 429")
    second = submit(relay, build_message(subject="second"))
    graph.messages(wait=2, timeout=60)
    for message_id in (first, second):
        assert relay.wait_status(message_id, ("sent",)) == "sent"
    requests = [r for r in graph.control("GET", "requests")["requests"]
                if r["route"] == "sendMail"]
    throttled_at = parse_at(requests[0]["at"])
    assert requests[0]["status"] == 429
    # nothing was sent as that mailbox before Retry-After had passed
    assert all(parse_at(r["at"]) >= throttled_at + 3.9 for r in requests[1:]), requests
    assert "throttled: the whole mailbox waits" in attempts(relay, first)[0][1]


def test_a_storm_of_503s_then_recovery_loses_nothing(graph, m365_relay):
    relay = m365_relay(graph)
    graph.control("POST", "faults/storm", {"route": "sendMail", "count": 8, "status": 503,
                                           "retry_after": 1, "retry_after_every": 3})
    ids = [submit(relay, build_message(subject=f"storm {i}")) for i in range(5)]
    records = graph.messages(wait=5, timeout=90)
    for message_id in ids:
        assert relay.wait_status(message_id, ("sent",), timeout=60) == "sent"
    time.sleep(1)
    records = graph.messages()
    assert sorted(r["subject"] for r in records) == [f"storm {i}" for i in range(5)]
    assert graph.stats()["statuses"]["sendMail"]["503"] == 8


@pytest.mark.parametrize("kind", ["wrong", "expired"])
def test_a_bad_secret_defers_then_the_fixed_secret_delivers(graph, m365_relay, kind):
    value = "the-secret-in-relay.toml"
    if kind == "expired":
        graph.control("POST", f"apps/{CLIENT}/secrets",
                      {"value": value, "end": "2020-01-01T00:00:00Z"})
    relay = m365_relay(graph, secret=value)
    message_id = submit(relay, build_message())
    code = "AADSTS7000215" if kind == "wrong" else "AADSTS7000222"
    wait_for(lambda: attempts(relay, message_id), what="an attempt")
    outcome, detail = attempts(relay, message_id)[0]
    assert outcome == "temporary" and code in detail
    assert relay.query("SELECT status FROM messages WHERE id = ?",
                       (message_id,))[0][0] == "deferred"
    graph.control("POST", f"apps/{CLIENT}/secrets", {"value": value})  # the admin fixes it
    assert relay.wait_status(message_id, ("sent",), timeout=60) == "sent"
    assert len(graph.messages(wait=1)) == 1
    assert value not in relay.log(whole=True)


@pytest.mark.parametrize("sender,mailbox,code", [
    ("boss@contoso.com", MAILBOX, "ErrorSendAsDenied"),
    ("nobody@contoso.com", "nobody@contoso.com", "ErrorInvalidUser"),
])
def test_send_as_denied_and_unknown_mailbox_fail_permanently(graph, m365_relay, sender,
                                                            mailbox, code):
    relay = m365_relay(graph)
    message_id = submit(relay, build_message(sender=sender), sender=mailbox)
    assert relay.wait_status(message_id, ("failed",)) == "failed"
    [(outcome, detail)] = attempts(relay, message_id)
    assert outcome == "permanent" and code in detail
    assert graph.messages() == []


def test_certificate_credentials(graph, m365_relay, tmp_path):
    cert, key, pem = self_signed_certificate(tmp_path)
    graph.setup(secrets=(), certificates=[pem])
    relay = m365_relay(graph, secret=None,
                       provider={"certificate": str(cert), "certificate_key": str(key)})
    message_id = submit(relay, build_message())
    graph.messages(wait=1)
    assert relay.wait_status(message_id, ("sent",)) == "sent"
    [request] = graph.control("GET", "tokens")["token_requests"]
    assert request["method"] == "client_assertion" and request["ok"]
    assert request["assertion"]["alg"] == "PS256"


def test_concurrency_never_exceeds_the_configured_limit(graph, m365_relay):
    graph.control("POST", "settings", {"latency": 0.3})
    relay = m365_relay(graph, config={"delivery": {"concurrency": 2}})
    for i in range(8):
        submit(relay, build_message(subject=f"c{i}"))
    graph.messages(wait=8, timeout=90)
    stats = graph.stats()
    assert stats["max_concurrency"][MAILBOX] == 2
    assert stats["throttled"] == {}


@pytest.mark.parametrize("days,warned", [(10, True), (45, False)])
def test_secret_expiry_warnings_in_the_log(graph, m365_relay, days, warned):
    when = (datetime.datetime.now(datetime.UTC).date()
            + datetime.timedelta(days=days))
    relay = m365_relay(graph, provider={"client_secret_expires": when.isoformat()},
                       config={"monitoring": {"secret_warning_days": 30}})
    text = f"the client secret expires in {days} days ({when.isoformat()})"
    if warned:
        wait_for(lambda: text in relay.log(), what="the expiry warning")
    else:
        submit(relay, build_message())
        graph.messages(wait=1)
        assert "expires in" not in relay.log()


@pytest.mark.slow
def test_a_100_mb_message_with_bounded_memory(graph_process, m365_relay, tmp_path):
    fake = FakeGraphProcess(tmp_path / "ca-big", "--no-content")
    try:
        fake.setup(permissions=ALL_PERMISSIONS, max_send_size=150 * MIB)
        relay = m365_relay(fake)
        attachments = [(f"part{i}.bin", os.urandom(25 * MIB), "application/octet-stream")
                       for i in range(3)]
        raw = build_message(attachments=attachments)
        assert len(raw) > 100 * 1000 * 1000
        before = vm(relay.proc.pid, "VmRSS")
        message_id = submit(relay, raw)
        [record] = fake.messages(wait=1, timeout=300, content=False)
        assert relay.wait_status(message_id, ("sent",), timeout=60) == "sent"
        peak = vm(relay.proc.pid, "VmHWM")
        sent = {a["name"]: a["sha256"] for a in record["attachments"]}
        for name, data, _ in attachments:
            assert sent[name] == hashlib.sha256(data).hexdigest()
        growth = peak - before
        print(f"relay RSS before {before / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB, "
              f"growth {growth / MIB:.0f} MiB for a {len(raw) / MIB:.0f} MiB message")
        assert growth < len(raw) / 2, (before, peak)
    finally:
        fake.stop()


def vm(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(field)
