"""The admin API against the real relay: twistd runs the plugin, HTTP over loopback.

Every endpoint of admin-api.md, its status codes and fields, the token on every
protected path, validation errors naming their fields, and figures checked
against the SQLite database the relay writes (messages sent over real SMTP).
Configuration changes have their own file: tests/test_admin_config.py.
"""

import re
import smtplib
import socket
import time
import uuid

import pytest

from smtprelay.admin import openapi
from tests.admin_client import AdminClient
from tests.relay import RelayProcess, deep_merge, parse_outbox

TOKEN = "admin-token-for-the-tests"
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
UNKNOWN_ID = "01M85GVWJQPH0EKX4M4ZZ6EVW4"

pytestmark = pytest.mark.slow


def admin_config(extra=None):
    return deep_merge({"admin": {"listen": "127.0.0.1:0", "token": TOKEN}}, extra or {})


def send(port, subject="hello", sender="app@example.com", to=("someone@example.org",),
         login=None):
    mid = f"<{uuid.uuid4().hex}@test.example>"
    text = (f"From: {sender}\r\nTo: {', '.join(to)}\r\nSubject: {subject}\r\n"
            f"Message-ID: {mid}\r\n\r\nbody of {subject}\r\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        if login:
            s.login(*login)
        s.sendmail(sender, list(to), text)
    return mid


def message_rows(relay):
    return relay.query("SELECT id, status FROM messages ORDER BY id DESC")


def execute(relay, sql, params=()):
    """A write to the relay's database, committed (to set up states that are hard to catch)."""
    conn = relay.db()
    try:
        conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


def db_counts(relay):
    return dict(relay.query("SELECT status, COUNT(*) FROM messages GROUP BY status"))


def wait_settled(relay, timeout=20):
    """No message queued or in flight (sent, failed or deferred)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = db_counts(relay)
        if not counts.get("queued") and not counts.get("active"):
            return counts
        time.sleep(0.05)
    raise AssertionError(f"the queue did not settle: {db_counts(relay)}")


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    r = RelayProcess(tmp_path_factory.mktemp("admin-api"), admin_config())
    r.start()
    yield r
    r.stop()


@pytest.fixture
def client(relay):
    return AdminClient(relay.admin_port, TOKEN)


# --- access ------------------------------------------------------------------------------------


def test_health_and_page_need_no_token(relay, client):
    a = client.get("/healthz", token=None)
    assert a.status == 200 and a.json == {"status": "ok"}
    page = client.get("/", token=None)
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert b"<title>smtprelay administration</title>" in page.body
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        a = client.get(f"/static/{name}", token=None)
        assert a.status == 200 and a.headers["content-type"].startswith(kind), name
    assert client.get("/static/nope.js", token=None).status == 404
    assert client.get("/static/..%2fapi.py", token=None).status == 404


def protected_calls():
    """(method, path) of every route that needs the token, from the OpenAPI document."""
    out = []
    for path, ops in openapi.document()["paths"].items():
        for method, op in ops.items():
            if op.get("security") != []:
                out.append((method.upper(), path.replace("{id}", UNKNOWN_ID)))
    return out


def test_every_protected_path_needs_the_token(relay, client):
    calls = protected_calls()
    assert ("GET", "/metrics") in calls and ("PUT", "/api/config") in calls
    assert len(calls) >= 15
    for method, path in calls:
        for token in (None, "wrong-token", TOKEN + "x", TOKEN[:-1], ""):
            a = client.call(method, path, token=token,
                            body={} if method in ("PUT", "POST") else None)
            assert a.status == 401, (method, path, token, a)
            assert a.json == {"error": "unauthorized"}
            assert a.headers["www-authenticate"].startswith("Bearer")
        a = client.call(method, path, token=None, headers={"Authorization": f"Basic {TOKEN}"})
        assert a.status == 401, (method, path)


def test_unknown_path_wrong_method_large_body_bad_json(relay, client):
    a = client.get("/api/nothing-here")
    assert a.status == 404 and a.json["error"]
    assert client.get("/nothing").status == 404
    a = client.delete("/api/stats")
    assert a.status == 405 and a.json["error"] and "GET" in a.headers["allow"]
    assert client.post("/api/config", {}).status == 405
    assert client.get("/api/smtp/stop").status == 405
    big = b'{"x": "' + b"a" * 1_100_000 + b'"}'
    a = client.call("PUT", "/api/config", raw=big, headers={"Content-Type": "application/json"})
    assert a.status == 413 and "larger than" in a.json["error"]
    a = client.call("POST", "/api/test-mail", raw=b"{not json",
                    headers={"Content-Type": "application/json"})
    assert a.status == 400 and a.json["error"] == "the body is not valid JSON"
    a = client.call("PUT", "/api/config", raw=b"[1, 2]")
    assert a.status == 400 and "object" in a.json["error"]
    a = client.call("POST", "/api/test-mail", raw=b"")
    assert a.status == 400
    # the relay still answers after all that
    assert client.get("/api/status").status == 200


# --- status, stats, metrics -----------------------------------------------------------------------


def test_status(relay, client):
    s = client.ok("GET", "/api/status")
    assert s["state"] == "running"
    assert s["version"] and TIME.match(s["started_at"])
    assert isinstance(s["uptime_seconds"], int) and s["uptime_seconds"] >= 0
    assert s["listen"] == [f"127.0.0.1:{relay.port}"]
    assert s["admin_listen"] == f"127.0.0.1:{relay.admin_port}"
    assert s["provider"] == {"type": "outbox", "sender_default": "relay@example.com",
                             "credential_expires": None, "credential_days_left": None}
    assert s["warnings"] == []
    (instance,) = relay.query("SELECT id FROM instances WHERE state = 'running'")
    assert s["instance"]["id"] == instance[0]
    assert next(i for i in s["instances"] if i["this"])["id"] == instance[0]


def test_stats_are_the_store_figures(relay, client):
    for i in range(5):
        send(relay.port, subject=f"stats {i}")
    wait_settled(relay)
    s = client.ok("GET", "/api/stats")
    counts = db_counts(relay)
    assert s["received"] == sum(counts.values())
    assert s["sent"] == counts.get("sent", 0) >= 5
    assert s["failed"] == counts.get("failed", 0)
    assert s["queued"] == counts.get("queued", 0) + counts.get("active", 0)
    assert s["deferred"] == counts.get("deferred", 0)
    assert s["received"] == s["sent"] + s["failed"] + s["queued"] + s["deferred"]
    total = s["sent"] + s["failed"]
    assert s["error_rate"] == (round(s["failed"] / total, 4) if total else 0)
    assert s["last_error"] is None
    assert isinstance(s["uptime_seconds"], int)


def test_stats_survive_a_restart(tmp_path):
    r = RelayProcess(tmp_path / "r", admin_config())
    r.start()
    try:
        send(r.port, subject="before")
        wait_settled(r)
        before = AdminClient(r.admin_port, TOKEN).ok("GET", "/api/stats")
        r.restart()
        after = AdminClient(r.admin_port, TOKEN).ok("GET", "/api/stats")
    finally:
        r.stop()
    assert before["sent"] == after["sent"] == 1
    assert after["received"] == before["received"] == 1


def metric(text, name, labels=""):
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_metrics(relay, client):
    send(relay.port, subject="metrics")
    wait_settled(relay)
    a = client.get("/metrics")
    assert a.status == 200 and a.headers["content-type"].startswith("text/plain")
    text = a.text
    smtp_received = relay.query(
        "SELECT COUNT(*), SUM(size) FROM messages WHERE helo != 'admin-api'")[0]
    assert (metric(text, "smtprelay_received_messages_total", '{provider="outbox"}')
            == smtp_received[0])
    assert (metric(text, "smtprelay_received_bytes_total", '{provider="outbox"}')
            == smtp_received[1])
    sent = relay.query("SELECT COUNT(*), SUM(size) FROM messages WHERE status = 'sent'")[0]
    assert metric(text, "smtprelay_sent_messages_total", '{provider="outbox"}') == sent[0]
    assert metric(text, "smtprelay_sent_bytes_total", '{provider="outbox"}') == sent[1]
    for name in ("smtprelay_smtp_accept_latency_seconds_count",
                 "smtprelay_uptime_seconds", "smtprelay_smtp_sessions"):
        assert metric(text, name) is not None, name
    assert metric(text, "smtprelay_provider_call_latency_seconds_count",
                  '{provider="outbox"}') >= 1
    assert metric(text, "smtprelay_queue_depth", '{status="queued"}') == 0
    assert "# TYPE smtprelay_failed_messages_total counter" in text
    assert "# TYPE smtprelay_credential_expiry_days gauge" in text
    # nothing expires for the outbox: the gauge has no sample rather than a false 0
    assert not re.search(r"^smtprelay_credential_expiry_days\{", text, re.M)


# --- the delivery log ----------------------------------------------------------------------------


def test_delivery_log_filters_and_pages_match_the_store(relay, client):
    tag = uuid.uuid4().hex[:8]
    send(relay.port, subject=f"Invoice {tag} 1", sender="billing@example.com",
         to=("alice@example.org",))
    send(relay.port, subject=f"Invoice {tag} 2", sender="billing@example.com",
         to=("bob@example.org", "carol@example.net"))
    mid = send(relay.port, subject=f"Report {tag}", sender="reports@example.com",
               to=("alice@example.org",))
    wait_settled(relay)

    def ids(**params):
        query = "&".join(f"{k}={v}" for k, v in params.items())
        body = client.ok("GET", f"/api/deliveries?{query}")
        return [d["id"] for d in body["items"]], body

    everything = [r[0] for r in message_rows(relay)]
    got, body = ids(limit=500)
    assert got == everything and body["next"] is None
    invoices, _ = ids(q=f"Invoice%20{tag}")
    assert invoices == [r[0] for r in relay.query(
        "SELECT id FROM messages WHERE subject LIKE ? ORDER BY id DESC", (f"Invoice {tag}%",))]
    assert len(invoices) == 2
    by_mid, _ = ids(q=mid.strip("<>").split("@")[0])
    assert len(by_mid) == 1
    billing, _ = ids(sender="BILLING@", q=tag)
    assert billing == invoices
    carol, _ = ids(recipient="carol@example.net")
    assert carol == [invoices[0]]
    alice, _ = ids(recipient="alice@", q=tag)
    assert len(alice) == 2
    sent, _ = ids(status="sent", limit=500)
    assert sent == [r[0] for r in relay.query(
        "SELECT id FROM messages WHERE status = 'sent' ORDER BY id DESC")]
    assert ids(status="failed")[0] == []
    # time window: the received_at of the newest of the three
    (received_at,) = relay.query("SELECT received_at FROM messages WHERE subject = ?",
                                 (f"Report {tag}",))[0]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(received_at)))
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(received_at) + 1))
    window, _ = ids(since=stamp, until=later, q=tag)
    assert by_mid[0] in window
    assert ids(since=later, q=tag)[0] == []
    # pages of 2 walk the whole log, newest first, each exactly once
    walked, cursor = [], None
    while True:
        body = client.ok("GET", "/api/deliveries?limit=2" + (f"&cursor={cursor}" if cursor else ""))
        assert len(body["items"]) <= 2
        walked += [d["id"] for d in body["items"]]
        cursor = body["next"]
        if cursor is None:
            break
    assert walked == everything


def test_delivery_shape(relay, client):
    send(relay.port, subject="shape", to=("one@example.org", "two@example.org"))
    wait_settled(relay)
    item = client.ok("GET", "/api/deliveries?q=shape&limit=1")["items"][0]
    for key in ("id", "received_at", "finished_at", "status", "sender", "recipients",
                "header_from", "subject", "message_id", "size", "provider", "attempts_count",
                "next_attempt_at", "error", "client_address", "auth_user"):
        assert key in item, key
    assert item["status"] == "sent" and item["recipients"] == ["one@example.org", "two@example.org"]
    assert TIME.match(item["received_at"]) and TIME.match(item["finished_at"])
    assert item["next_attempt_at"] is None and item["error"] is None
    assert item["provider"] == "outbox" and item["client_address"] == "127.0.0.1"
    one = client.ok("GET", f"/api/deliveries/{item['id']}")
    assert {k: v for k, v in one.items() if k != "attempts"} == item
    (attempt,) = one["attempts"]
    assert set(attempt) >= {"at", "outcome", "detail", "duration_ms"}
    assert TIME.match(attempt["at"]) and attempt["outcome"] == "sent"
    assert isinstance(attempt["duration_ms"], int)
    (size,) = relay.query("SELECT size FROM messages WHERE id = ?", (item["id"],))[0]
    assert item["size"] == size


def test_unknown_deliveries_are_404(relay, client):
    for path in (f"/api/deliveries/{UNKNOWN_ID}", "/api/deliveries/not-an-id",
                 "/api/deliveries/..%2F..%2Fetc"):
        assert client.get(path).status == 404, path
    assert client.post(f"/api/deliveries/{UNKNOWN_ID}/retry").status == 404
    assert client.delete(f"/api/deliveries/{UNKNOWN_ID}").status == 404
    assert client.delete("/api/deliveries/nope").status == 404


@pytest.mark.parametrize("query,field", [
    ("status=bogus", "status"), ("limit=501", "limit"), ("limit=0", "limit"),
    ("since=yesterday", "since"), ("until=2026-01-01", "until"), ("cursor=%21%21", "cursor"),
    ("colour=blue", "colour"),
])
def test_delivery_query_errors_name_the_field(relay, client, query, field):
    a = client.get(f"/api/deliveries?{query}")
    assert a.status == 400, a
    assert a.json["error"] and field in a.json["fields"]


# --- provider test, test mail ---


def test_provider_test(relay, client):
    a = client.ok("POST", "/api/provider/test")
    assert a["ok"] is True
    assert a["steps"] == [{"name": "outbox writable", "ok": True,
                           "detail": relay.config["provider"]["directory"]}]


def test_test_mail_is_a_real_message_through_the_provider(relay, client):
    before = len(relay.outbox_files())
    a = client.ok("POST", "/api/test-mail", {"to": "admin@example.org", "subject": "Relay check ✓"})
    assert a["ok"] is True and a["delivery_id"] and "written to new/" in a["detail"]
    files = relay.outbox_files()
    assert len(files) == before + 1
    env_from, env_to, data = parse_outbox(files[-1])
    assert env_from == "relay@example.com" and env_to == ["admin@example.org"]
    from email import message_from_bytes, policy
    m = message_from_bytes(data, policy=policy.default)
    assert m["Subject"] == "Relay check ✓"
    assert m["To"] == "admin@example.org"
    assert m["From"].addresses[0].addr_spec == "relay@example.com"
    assert m["Date"] and m["Message-ID"].startswith(f"<{a['delivery_id']}.")
    assert data.startswith(b"Received: from admin-api ([127.0.0.1])\r\n"
                           b"\tby relay.test (smtprelay) with HTTP")
    # it is in the delivery log like any other message
    d = client.ok("GET", f"/api/deliveries/{a['delivery_id']}")
    assert d["status"] == "sent" and d["recipients"] == ["admin@example.org"]
    assert d["subject"] == "Relay check ✓" and d["sender"] == "relay@example.com"
    assert d["attempts"][0]["outcome"] == "sent"
    listed = client.ok("GET", "/api/deliveries?q=Relay%20check")["items"]
    assert [x["id"] for x in listed] == [a["delivery_id"]]


@pytest.mark.parametrize("body,field", [
    ({}, "to"), ({"to": "not an address"}, "to"), ({"to": "a@b.c\r\nBcc: x@y.z"}, "to"),
    ({"to": "a@example.org", "subject": "two\nlines"}, "subject"),
    ({"to": "a@example.org", "bcc": "x@y.z"}, "bcc"),
])
def test_test_mail_validation(relay, client, body, field):
    a = client.post("/api/test-mail", body)
    assert a.status == 400 and field in a.json["fields"], a


# --- SMTP on and off ---


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_smtp_stop_lets_sessions_finish_and_start_listens_again(relay, client):
    port = relay.port
    session = smtplib.SMTP("127.0.0.1", port, timeout=30)
    session.ehlo("client.example")
    session.mail("app@example.com")
    session.rcpt("late@example.org")
    s = client.ok("POST", "/api/smtp/stop")
    assert s["state"] == "stopped"
    assert refused(port)
    h = client.get("/healthz", token=None)
    assert h.status == 503 and h.json["status"] == "unavailable" and "stopped" in h.json["error"]
    assert client.ok("GET", "/api/status")["state"] == "stopped"
    # the session in progress finishes its message
    code, _ = session.data(b"Subject: late\r\n\r\nstill accepted\r\n")
    assert code == 250
    session.close()
    # the queue keeps delivering while SMTP is stopped
    wait_settled(relay)
    assert relay.query("SELECT status FROM messages WHERE subject = 'late'") == [("sent",)]
    assert client.ok("POST", "/api/smtp/stop")["state"] == "stopped"  # twice is fine
    s = client.ok("POST", "/api/smtp/start")
    assert s["state"] == "running"
    (new,) = s["listen"]
    relay.smtp_ports = [int(new.rsplit(":", 1)[1])]  # port 0 was asked: a new one
    send(relay.port, subject="after restart of SMTP")
    assert client.get("/healthz", token=None).status == 200
    assert client.ok("POST", "/api/smtp/start")["state"] == "running"


def test_openapi_document_is_served(relay, client):
    doc = client.ok("GET", "/api/openapi.json")
    assert doc == openapi.document()


# --- retry and cancel, with a provider that fails ---


@pytest.fixture(scope="module")
def failing(tmp_path_factory):
    """A relay whose outbox cannot be written (its folder is under a file)."""
    base = tmp_path_factory.mktemp("failing")
    (base / "blocker").write_text("not a folder")
    r = RelayProcess(base / "relay", admin_config({
        "provider": {"directory": str(base / "blocker" / "outbox")},
        "delivery": {"retry": ["1h"]},
        "smtp": {"auth": {"users": {"app": "app-password-1"}, "max_failures": 2,
                          "lockout": "2s"}},
    }))
    r.good_outbox = base / "good-outbox"
    r.start()
    yield r
    r.stop()


def wait_for(relay, message_id, *statuses, timeout=20):
    return relay.wait_status(message_id, statuses, timeout)


def test_retry_and_cancel(failing):
    r = failing
    client = AdminClient(r.admin_port, TOKEN)
    for i in range(3):
        send(r.port, subject=f"retry {i}")
    ids = [row[0] for row in r.query("SELECT id FROM messages ORDER BY id")]
    for mid in ids:
        wait_for(r, mid, "deferred")
    a, b, c = ids

    # the failing provider is a warning, in the status and in the log
    status = client.wait(lambda: (lambda s: s if s["warnings"] else None)(
        client.ok("GET", "/api/status")))
    assert "provider-failing" in status["warning_codes"]
    assert any("failing since" in w for w in status["warnings"])
    client.wait(lambda: "warning: Deliveries through outbox are failing" in r.log())

    # cancel a deferred one: it fails, "cancelled by admin"
    assert client.delete(f"/api/deliveries/{a}").status == 204
    d = client.ok("GET", f"/api/deliveries/{a}")
    assert d["status"] == "failed" and d["error"] == "cancelled by admin"
    assert d["attempts"][-1]["outcome"] == "cancelled" and TIME.match(d["finished_at"])
    again = client.delete(f"/api/deliveries/{a}")
    assert again.status == 409 and "failed" in again.json["error"]
    stats = client.ok("GET", "/api/stats")
    assert stats["failed"] == 1 and stats["deferred"] == 2 and stats["error_rate"] == 1
    assert stats["last_error"]["delivery_id"] == a
    assert stats["last_error"]["message"] == "cancelled by admin"

    # a failed one goes back to the queue, is attempted at once and defers again
    attempts = len(d["attempts"])
    answer = client.post(f"/api/deliveries/{a}/retry")
    assert answer.status == 202 and answer.json["previous_status"] == "failed"
    client.wait(lambda: len(client.ok("GET", f"/api/deliveries/{a}")["attempts"]) >= attempts + 2)
    wait_for(r, a, "deferred")
    requeued = client.ok("GET", f"/api/deliveries/{a}")["attempts"][-2]
    assert requeued["outcome"] == "requeued" and requeued["detail"] == "retry requested by admin"
    # asking for a retry is not an error; the attempt that followed is
    last = client.ok("GET", "/api/stats")["last_error"]
    assert last["delivery_id"] == a and "retry requested" not in last["message"]
    assert last["message"].startswith("cannot write to the outbox")

    # SMTP stopped: the queue still delivers once the provider is fixed
    assert client.ok("POST", "/api/smtp/stop")["state"] == "stopped"
    cfg = client.ok("GET", "/api/config")
    cfg["provider"]["directory"] = str(r.good_outbox)
    client.ok("PUT", "/api/config", cfg)
    assert client.post(f"/api/deliveries/{b}/retry").status == 202
    wait_for(r, b, "sent")
    # c is deferred for an hour: not retried by itself, retried now on request
    time.sleep(0.5)
    assert r.query("SELECT status FROM messages WHERE id = ?", (c,)) == [("deferred",)]
    assert client.post(f"/api/deliveries/{c}/retry").status == 202
    wait_for(r, c, "sent")
    assert client.post(f"/api/deliveries/{a}/retry").status == 202
    wait_for(r, a, "sent")
    assert len(list(r.good_outbox.joinpath("new").iterdir())) == 3

    # sent: neither retried nor cancelled
    for mid in (a, b, c):
        assert client.post(f"/api/deliveries/{mid}/retry").status == 409
        assert client.delete(f"/api/deliveries/{mid}").status == 409
    # in flight (leased by another instance): neither
    execute(r, "UPDATE messages SET status = 'active', lease_owner = 'elsewhere/1/x', "
               "lease_until = ? WHERE id = ?", (time.time() + 3600, b))
    try:
        busy = client.post(f"/api/deliveries/{b}/retry")
        assert busy.status == 409 and "in flight" in busy.json["error"]
        assert client.delete(f"/api/deliveries/{b}").status == 409
        assert client.ok("GET", f"/api/deliveries/{b}")["state"] == "active"
    finally:
        execute(r, "UPDATE messages SET status = 'sent', lease_owner = NULL, lease_until = NULL "
                   "WHERE id = ?", (b,))

    stats = client.ok("GET", "/api/stats")
    counts = db_counts(r)
    assert stats["sent"] == counts["sent"] == 3 and stats["failed"] == counts.get("failed", 0) == 0
    assert stats["error_rate"] == 0
    assert client.ok("POST", "/api/smtp/start")["state"] == "running"
    r.smtp_ports = [int(client.ok("GET", "/api/status")["listen"][0].rsplit(":", 1)[1])]
    # the provider works again: the warning clears
    client.wait(lambda: "provider-failing" not in client.ok("GET", "/api/status")["warning_codes"])


def test_cancel_a_queued_delivery(failing):
    r = failing
    client = AdminClient(r.admin_port, TOKEN)
    # a message that waits: the outbox is broken again, and the first attempt deferred it
    cfg = client.ok("GET", "/api/config")
    cfg["provider"]["directory"] = str(r.good_outbox.parent / "blocker" / "outbox")
    client.ok("PUT", "/api/config", cfg)
    send(r.port, subject="to cancel")
    (mid,) = r.query("SELECT id FROM messages WHERE subject = 'to cancel'")[0]
    wait_for(r, mid, "deferred")
    # "queued" (as if never attempted, due in an hour): a retry makes it due now
    execute(r, "UPDATE messages SET status = 'queued', attempts_count = 0, "
               "next_attempt_at = ? WHERE id = ?", (time.time() + 3600, mid))
    answer = client.post(f"/api/deliveries/{mid}/retry")
    assert answer.status == 202 and answer.json["previous_status"] == "queued"
    client.wait(lambda: client.ok("GET", f"/api/deliveries/{mid}")["attempts_count"] == 1)
    wait_for(r, mid, "deferred")
    # and a queued one can be cancelled as a deferred one
    execute(r, "UPDATE messages SET status = 'queued', next_attempt_at = ? WHERE id = ?",
            (time.time() + 3600, mid))
    assert client.ok("GET", f"/api/deliveries/{mid}")["status"] == "queued"
    assert client.delete(f"/api/deliveries/{mid}").status == 204
    assert r.query("SELECT status, error FROM messages WHERE id = ?", (mid,)) == [
        ("failed", "cancelled by admin")]


def test_auth_lockouts_are_a_warning(failing):
    r = failing
    client = AdminClient(r.admin_port, TOKEN)
    # smtplib tries PLAIN, then LOGIN: two failures, and max_failures is 2
    with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as s:
        with pytest.raises(smtplib.SMTPException):
            s.login("app", "wrong password")
    with pytest.raises(smtplib.SMTPConnectError):
        smtplib.SMTP("127.0.0.1", r.port, timeout=30)
    status = client.ok("GET", "/api/status")
    assert "auth-lockouts" in status["warning_codes"]
    assert any("SMTP AUTH lockout" in w and "127.0.0.1" in w for w in status["warnings"])
    client.wait(lambda: "warning: 1 SMTP AUTH lockout in the last hour" in r.log())
    time.sleep(2.1)  # the lockout (2s) is over; the warning stays for the hour
    send(r.port, subject="after lockout", login=("app", "app-password-1"))
    assert "auth-lockouts" in client.ok("GET", "/api/status")["warning_codes"]


def test_no_token_means_loopback_and_same_origin_only(tmp_path):
    r = RelayProcess(tmp_path / "open", {"admin": {"listen": "127.0.0.1:0"}})
    r.start()
    try:
        c = AdminClient(r.admin_port, None)
        assert c.ok("GET", "/api/status")["state"] == "running"
        a = c.get("/api/status", headers={"Host": "relay.evil.example"})
        assert a.status == 403 and "loopback" in a.json["error"]
        a = c.post("/api/smtp/stop", headers={"Origin": "http://evil.example",
                                              "Sec-Fetch-Site": "cross-site"})
        assert a.status == 403 and "cross" in a.json["error"]
        assert c.get("/api/status", headers={"Origin": "http://evil.example"}).status == 403
        assert c.ok("GET", "/api/status")["state"] == "running"
        same = f"http://127.0.0.1:{r.admin_port}"
        assert c.get("/api/status", headers={"Origin": same,
                                             "Sec-Fetch-Site": "same-origin"}).status == 200
    finally:
        r.stop()


def test_admin_listen_beyond_loopback_needs_a_token(tmp_path):
    r = RelayProcess(tmp_path / "exposed", {"admin": {"listen": "0.0.0.0:0"}})
    r.start(expect_ready=False)
    assert r.wait_exit(30) != 0
    assert "admin.token: required when admin.listen (0.0.0.0:0) is not loopback" in r.log()


def test_admin_api_disabled(tmp_path):
    r = RelayProcess(tmp_path / "off", {})
    r.start()
    try:
        assert r.admin_port is None and "admin API on" not in r.log()
    finally:
        r.stop()
