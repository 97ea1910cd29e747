"""The admin side's pure parts: warnings, query validation, wire shapes, the token
check, the TOML writer, the test message, and the OpenAPI document against the
Klein routes.  No sockets here; tests/test_admin_api.py runs the real relay."""

import datetime
import email
import email.policy
import json
import os
import re
import tomllib
from pathlib import Path

import attr
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtprelay import config as configuration
from smtprelay.admin import auth, configfile, openapi, shapes, testmail
from smtprelay.admin import warnings as w
from smtprelay.admin.api import AdminAPI
from smtprelay.model import Status
from smtprelay.store import (
    AttemptRow,
    DeliveryQuery,
    DeliveryRow,
    InstanceRow,
    LastError,
    RecipientRow,
    Stats,
    encode_cursor,
)

HERE = Path(__file__).resolve()
# the contract's reference file (a checkout beside shared/, or a worktree one level down)
SPEC = next((p / "shared" / "spec" / "relay.toml" for p in HERE.parents[1:4]
             if (p / "shared" / "spec" / "relay.toml").exists()), None)
SAMPLE = """\
# smtprelay: the runnable default.
# an administrator's notes

[smtp]
listen = "127.0.0.1:2525"
hostname = "localhost"
max_message_size = "35MB"

[smtp.auth]
required = false                     # nobody logs in yet
users = { }                          # e.g. { relay_user = "$scrypt$..." }

[sender]
default = "relay@localhost"
allowed = ["*"]          # any sender: fine for a trial

[provider]
type = "outbox"
directory = "../var/outbox"

[delivery]
mode = "queue"

[admin]
listen = "127.0.0.1:8025"            # REST API, web page and /metrics; "" disables
token = ""                           # secret

[monitoring]
secret_warning_days = 30             # warn this many days before
"""
NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
TODAY = datetime.date(2027, 1, 15)


# --- warnings ---------------------------------------------------------------------------


def codes(snapshot):
    return [x.code for x in w.collect(snapshot)]


def test_no_warning_when_all_is_well():
    assert w.collect(w.Snapshot(now=NOW, provider_type="m365")) == []


@pytest.mark.parametrize("days,code", [
    (-3, "credential-expired"), (0, "credential-expiring"), (1, "credential-expiring"),
    (30, "credential-expiring"), (31, None), (400, None),
])
def test_credential_expiry_thresholds(days, code):
    s = w.Snapshot(now=NOW, provider_type="m365", secret_warning_days=30,
                   credential_expires=TODAY + datetime.timedelta(days=days))
    assert codes(s) == ([code] if code else [])


def test_credential_messages_say_when():
    soon = w.collect(w.Snapshot(now=NOW, provider_type="m365",
                                credential_expires=TODAY + datetime.timedelta(days=1)))
    assert "expires on 2027-01-16 (in 1 day)" in soon[0].message
    today = w.collect(w.Snapshot(now=NOW, provider_type="m365", credential_expires=TODAY))
    assert "(today)" in today[0].message
    gone = w.collect(w.Snapshot(now=NOW, provider_type="m365",
                                credential_expires=TODAY - datetime.timedelta(days=2)))
    assert "expired on 2027-01-13 (2 days ago)" in gone[0].message


def test_secret_warning_days_is_honoured():
    s = w.Snapshot(now=NOW, credential_expires=TODAY + datetime.timedelta(days=50),
                   secret_warning_days=60)
    assert codes(s) == ["credential-expiring"]
    assert codes(w.Snapshot(now=NOW, credential_expires=TODAY, secret_warning_days=0)) == [
        "credential-expiring"]


def test_rejected_credential_and_provider_warnings():
    s = w.Snapshot(now=NOW, provider_type="m365",
                   credential_problem="the client secret was rejected (AADSTS7000215)",
                   provider_warnings=("mailbox throttled",))
    found = w.collect(s)
    assert [x.code for x in found] == ["credential-rejected", "provider:mailbox throttled"]
    assert "AADSTS7000215" in found[0].message


def test_provider_failing_now():
    s = w.Snapshot(now=NOW, provider_type="smtp",
                   provider_failing=(NOW - 120, "connection refused"))
    (found,) = w.collect(s)
    assert found.code == "provider-failing"
    assert "since 2027-01-15T07:58:00Z: connection refused" in found.message


def test_old_messages_in_the_queue():
    young = w.Snapshot(now=NOW, pending=3, oldest_pending_at=NOW - 3599)
    old = w.Snapshot(now=NOW, pending=3, oldest_pending_at=NOW - 7200)
    assert codes(young) == []
    (found,) = w.collect(old)
    assert (found.code == "queue-old" and "3 messages" in found.message
            and "2.0 hours" in found.message)


def test_queue_growing_needs_time_and_size():
    def snap(history, pending):
        return w.Snapshot(now=NOW, pending=pending, pending_history=tuple(history))

    assert codes(snap([(NOW - 900, 10)], 200)) == ["queue-growing"]
    assert codes(snap([(NOW - 900, 10)], 40)) == []  # +30: under GROWTH_MIN
    assert codes(snap([(NOW - 900, 300)], 500)) == []  # not doubled
    assert codes(snap([(NOW - 60, 0)], 500)) == []  # too recent to tell
    assert codes(snap([], 500)) == []
    (found,) = w.collect(snap([(NOW - 1200, 0), (NOW - 700, 30), (NOW - 30, 90)], 120))
    assert "up from 30 11 minutes ago" in found.message


def test_auth_lockouts_in_the_last_hour():
    s = w.Snapshot(now=NOW, lockouts=((NOW - 4000, "10.0.0.9"), (NOW - 60, "10.0.0.1"),
                                      (NOW - 30, "10.0.0.2")))
    (found,) = w.collect(s)
    assert found.code == "auth-lockouts"
    assert "2 SMTP AUTH lockouts" in found.message and "10.0.0.9" not in found.message


@given(st.builds(
    w.Snapshot,
    now=st.just(NOW),
    provider_type=st.sampled_from(["m365", "gmail", "smtp", "outbox"]),
    credential_expires=st.none() | st.dates(datetime.date(2020, 1, 1), datetime.date(2035, 1, 1)),
    credential_problem=st.none() | st.text(max_size=30),
    secret_warning_days=st.integers(0, 400),
    provider_warnings=st.lists(st.text(max_size=20), max_size=3).map(tuple),
    provider_failing=st.none() | st.tuples(st.floats(NOW - 1e6, NOW), st.text(max_size=20)),
    pending=st.integers(0, 10_000),
    oldest_pending_at=st.none() | st.floats(NOW - 1e6, NOW),
    pending_history=st.lists(st.tuples(st.floats(NOW - 3600, NOW), st.integers(0, 10_000)),
                             max_size=5).map(lambda h: tuple(sorted(h))),
    lockouts=st.lists(st.tuples(st.floats(NOW - 7200, NOW), st.ip_addresses().map(str)),
                      max_size=8).map(tuple),
))
def test_collect_is_total_and_codes_are_unique(snapshot):
    found = w.collect(snapshot)
    assert len({x.code for x in found}) == len(found)
    assert all(isinstance(x.message, str) and x.message for x in found)


# --- times and the delivery-log query ---------------------------------------------------------


def test_rfc3339_both_ways():
    assert shapes.rfc3339(NOW) == "2027-01-15T08:00:00Z"
    assert shapes.rfc3339(NOW + 0.9) == "2027-01-15T08:00:00Z"
    assert shapes.rfc3339(None) is None
    assert shapes.parse_rfc3339("2027-01-15T08:00:00Z") == NOW
    assert shapes.parse_rfc3339("2027-01-15t09:00:00+01:00") == NOW
    assert shapes.parse_rfc3339("2027-01-15 08:00:00.5Z") == NOW + 0.5
    assert shapes.parse_rfc3339("2027-01-15T08:00:00.123456789Z") == pytest.approx(NOW + 0.123456)
    for bad in ("2027-01-15", "2027-01-15T08:00:00", "yesterday", "2027-13-01T00:00:00Z",
                "2027-01-15T08:00Z", "", "1800000000"):
        with pytest.raises(ValueError):
            shapes.parse_rfc3339(bad)


@given(st.datetimes(datetime.datetime(1971, 1, 1), datetime.datetime(2200, 1, 1)))
def test_rfc3339_round_trip(moment):
    seconds = moment.replace(tzinfo=datetime.UTC, microsecond=0).timestamp()
    text = shapes.rfc3339(seconds)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", text)
    assert shapes.parse_rfc3339(text) == seconds


def test_days_left():
    assert shapes.days_left(None, NOW) is None
    assert shapes.days_left(TODAY, NOW) == 0
    assert shapes.days_left(datetime.date(2027, 2, 14), NOW) == 30
    assert shapes.days_left(datetime.date(2027, 1, 10), NOW) == -5


def q(**args):
    return shapes.delivery_query({k: v if isinstance(v, list) else [v] for k, v in args.items()})


def test_delivery_query_defaults_and_values():
    assert q() == DeliveryQuery(limit=50)
    cursor = encode_cursor("01M85GVWJQPH0EKX4M4ZZ6EVW4")
    got = q(status="failed", sender="a@b", recipient="c@d", q="Invoice", limit="500",
            since="2027-01-15T08:00:00Z", until="2027-01-16T08:00:00Z", cursor=cursor)
    assert got == DeliveryQuery(status="failed", sender="a@b", recipient="c@d", q="Invoice",
                                since=NOW, until=NOW + 86400, limit=500, cursor=cursor)
    assert q(sender="", q="").sender is None


@pytest.mark.parametrize("args,field", [
    ({"status": "active"}, "status"), ({"status": "SENT"}, "status"),
    ({"limit": "0"}, "limit"), ({"limit": "501"}, "limit"), ({"limit": "ten"}, "limit"),
    ({"limit": "-1"}, "limit"), ({"since": "yesterday"}, "since"),
    ({"until": "2027-01-15"}, "until"), ({"cursor": "!!"}, "cursor"),
    ({"sender": "x" * 321}, "sender"), ({"order": "asc"}, "order"),
    ({"status": ["sent", "failed"]}, "status"),
    ({"since": "2027-01-16T00:00:00Z", "until": "2027-01-15T00:00:00Z"}, "until"),
])
def test_delivery_query_names_the_bad_field(args, field):
    with pytest.raises(shapes.ValidationError) as info:
        q(**args)
    assert field in info.value.fields


def test_delivery_query_reports_every_bad_field_at_once():
    with pytest.raises(shapes.ValidationError) as info:
        q(status="x", limit="x", since="x")
    assert set(info.value.fields) == {"status", "limit", "since"}


def delivery_row(**kw):
    fields = dict(
        id="X", status=Status.DEFERRED, received_at=NOW, finished_at=None, sender="s@x",
        original_sender="o@x", mailbox="m@x", header_from="h@x", subject="Hi",
        message_id="<1@x>", size=12, attempts_count=1, next_attempt_at=NOW + 60,
        error="451 later", client_address="127.0.0.1", auth_user=None, provider_id=None,
        mode="queue", helo="client",
        recipients=(RecipientRow("a@x", "sent", "250 ok"), RecipientRow("b@x", "pending")),
        attempts=(AttemptRow(at=NOW + 1, outcome="sent", detail="ok", duration_ms=3,
                             instance="i"),),
    )
    fields.update(kw)
    return DeliveryRow(**fields)


def test_delivery_json_times():
    item = delivery_row()
    out = shapes.delivery_json(item, "outbox")
    assert out["received_at"] == "2027-01-15T08:00:00Z" and out["finished_at"] is None
    assert out["next_attempt_at"] == "2027-01-15T08:01:00Z"
    assert out["attempts"][0]["at"] == "2027-01-15T08:00:01Z"
    assert item.received_at == NOW  # not changed in place


def test_delivery_json_keys_in_order():
    out = shapes.delivery_json(delivery_row(), "m365")
    expected = {
        "id": "X", "received_at": "2027-01-15T08:00:00Z", "finished_at": None,
        "status": "deferred", "state": "deferred", "sender": "s@x", "original_sender": "o@x",
        "mailbox": "m@x", "recipients": ["a@x", "b@x"],
        "recipient_status": [{"address": "a@x", "status": "sent", "detail": "250 ok"},
                             {"address": "b@x", "status": "pending", "detail": None}],
        "header_from": "h@x", "subject": "Hi", "message_id": "<1@x>", "size": 12,
        "provider": "m365", "attempts_count": 1, "next_attempt_at": "2027-01-15T08:01:00Z",
        "error": "451 later", "client_address": "127.0.0.1", "auth_user": None,
        "provider_id": None, "mode": "queue", "helo": "client",
        "attempts": [{"at": "2027-01-15T08:00:01Z", "outcome": "sent", "detail": "ok",
                      "duration_ms": 3, "instance": "i"}],
    }
    assert out == expected
    assert list(out) == list(expected)  # the keys in the order they always had
    assert json.loads(json.dumps(out)) == expected


def test_delivery_json_in_flight_and_without_history():
    out = shapes.delivery_json(delivery_row(status=Status.ACTIVE, attempts=None), "smtp")
    assert (out["status"], out["state"]) == ("queued", "active")
    assert out["next_attempt_at"] is None  # only while waiting for an attempt
    assert "attempts" not in out  # a page of the log carries no history
    sent = shapes.delivery_json(delivery_row(status=Status.SENT, finished_at=NOW + 2), "smtp")
    assert sent["next_attempt_at"] is None and sent["finished_at"] == "2027-01-15T08:00:02Z"
    assert type(sent["status"]) is str and type(sent["state"]) is str


def test_instance_json():
    row = InstanceRow(id="h/1/ab", hostname="h", pid=1, started_at=NOW, heartbeat_at=NOW + 5,
                      state="running", version="1.0", uptime_seconds=9.0,
                      heartbeat_age_seconds=4.0)
    out = shapes.instance_json(row, this=True)
    assert list(out) == ["id", "hostname", "pid", "started_at", "heartbeat_at", "state",
                         "version", "uptime_seconds", "heartbeat_age_seconds", "this"]
    assert out["started_at"] == "2027-01-15T08:00:00Z"
    assert out["heartbeat_at"] == "2027-01-15T08:00:05Z"
    assert (out["uptime_seconds"], out["this"]) == (9.0, True)


def test_is_delivery_id():
    assert shapes.is_delivery_id("01M85GVWJQPH0EKX4M4ZZ6EVW4")
    for bad in ("01M85GVWJQPH0EKX4M4ZZ6EVW", "01m85gvwjqph0ekx4m4zz6evw4", "../../etc/passwd",
                "01M85GVWJQPH0EKX4M4ZZ6EVWU"):
        assert not shapes.is_delivery_id(bad)


def test_stats_shape_and_error_rate():
    stats = Stats(received=10, sent=6, failed=2, queued=1, deferred=0, active=1,
                  last_error=LastError(message="boom", at=NOW, delivery_id="X"),
                  oldest_pending_at=NOW - 5)
    out = shapes.stats_json(stats, 12.7)
    assert out["received"] == out["sent"] + out["failed"] + out["queued"] + out["deferred"]
    assert out["queued"] == 2 and out["in_flight"] == 1 and out["uptime_seconds"] == 12
    assert out["error_rate"] == 0.25
    assert out["last_error"] == {"message": "boom", "at": "2027-01-15T08:00:00Z",
                                 "delivery_id": "X"}
    empty = attr.evolve(stats, sent=0, failed=0, last_error=None)
    assert shapes.stats_json(empty, 0)["error_rate"] == 0
    assert shapes.stats_json(empty, 0)["last_error"] is None


def test_test_mail_request():
    assert shapes.test_mail_request({"to": "a@b.c"}) == ("a@b.c", shapes.DEFAULT_SUBJECT)
    assert shapes.test_mail_request({"to": "a@b.c", "subject": "Hi é"}) == ("a@b.c", "Hi é")
    for body, field in [({}, "to"), ({"to": ""}, "to"), ({"to": "nobody"}, "to"),
                        ({"to": 5}, "to"), ({"to": "a@b.c\r\nBcc: x@y.z"}, "to"),
                        ({"to": "a@b.c, x@y.z"}, "to"), ({"to": "é@b.c"}, "to"),
                        ({"to": "a@b.c", "subject": "x\ny"}, "subject"),
                        ({"to": "a@b.c", "subject": "x" * 201}, "subject"),
                        ({"to": "a@b.c", "subject": 3}, "subject"),
                        ({"to": "a@b.c", "cc": "x@y.z"}, "cc")]:
        with pytest.raises(shapes.ValidationError) as info:
            shapes.test_mail_request(body)
        assert field in info.value.fields, body
    with pytest.raises(shapes.ValidationError):
        shapes.test_mail_request(["a@b.c"])


def test_json_document_dates():
    doc = {"provider": {"client_secret_expires": datetime.date(2027, 6, 30), "x": [1]}}
    assert shapes.json_document(doc) == {"provider": {"client_secret_expires": "2027-06-30",
                                                      "x": [1]}}


def test_user_passwords_follow_a_change_of_form():
    current = {"smtp": {"auth": {"users": {
        "plain": "$scrypt$a", "table": {"password": {"env": "PW"}, "allowed": ["@a.b"]}}}}}
    new = {"smtp": {"auth": {"users": {
        "plain": {"password": {"set": True}, "allowed": ["@x.y"]},
        "table": {"set": True},
        "fresh": {"set": True}}}}}
    out = shapes.carry_user_passwords(new, current)
    users = out["smtp"]["auth"]["users"]
    assert users["plain"] == {"password": "$scrypt$a", "allowed": ["@x.y"]}
    assert users["table"] == {"env": "PW"}
    assert users["fresh"] == {"set": True}  # nothing to keep: parse() says so
    assert new["smtp"]["auth"]["users"]["table"] == {"set": True}  # not changed in place
    assert shapes.carry_user_passwords({"smtp": {}}, current) == {"smtp": {}}


# --- the token and the origin guard -------------------------------------------------------------


def test_bearer_parsing():
    assert auth.bearer(b"Bearer abc") == "abc"
    assert auth.bearer("bearer   abc ") == "abc"
    assert auth.bearer("Basic abc") is None
    assert auth.bearer("Bearer") is None
    assert auth.bearer(None) is None
    assert auth.bearer(b"Bearer \xff") is None


def test_token_ok():
    assert auth.token_ok(None, "")  # no token configured
    assert auth.token_ok(b"Bearer s3cret", "s3cret")
    for header in (None, b"", b"Bearer", b"Bearer s3cre", b"Bearer s3cret2", b"Basic s3cret",
                   b"s3cret", "Bearer sécret".encode()):
        assert not auth.token_ok(header, "s3cret"), header


def test_token_compare_is_constant_time():
    source = Path(auth.__file__).read_text()
    assert "hmac.compare_digest" in source


def test_foreign_requests():
    ok = auth.foreign_request
    # with a token: the token is the guard (a proxy may rewrite Host and Origin)
    assert ok("127.0.0.1:8025", "https://admin.example.com", "cross-site", True) is None
    # without one: same origin and loopback names only
    assert ok("127.0.0.1:8025", None, None, False) is None
    assert ok("127.0.0.1:8025", "http://127.0.0.1:8025", "same-origin", False) is None
    assert ok("localhost:8025", None, "none", False) is None
    assert ok("[::1]:8025", None, None, False) is None
    assert ok("127.0.0.1:8025", "http://evil.example", "cross-site", False)
    assert ok("127.0.0.1:8025", "http://evil.example", None, False)
    assert ok("127.0.0.1:8025", "null", None, False)
    assert ok("127.0.0.1:8025", None, "same-site", False)
    # DNS rebinding: a foreign name pointing at 127.0.0.1
    assert ok("evil.example:8025", None, None, False)


# --- the configuration file ---


def test_render_unchanged_document_is_byte_identical():
    texts = [SAMPLE] + ([SPEC.read_text()] if SPEC else [])
    for text in texts:
        assert configfile.render(text, tomllib.loads(text)) == text


def test_render_keeps_comments_and_changes_values():
    text = SAMPLE.replace('[smtp]\nlisten = "127.0.0.1:2525"',
                          '[smtp]\nlisten = "127.0.0.1:2525"            # "host:port" or a list')
    doc = tomllib.loads(text)
    doc["smtp"]["listen"] = "0.0.0.0:2626"
    doc["smtp"]["max_message_size"] = "10MB"
    doc["smtp"]["auth"]["users"] = {"app": "$scrypt$ln=15,r=8,p=1$x$y",
                                    "scanner": {"password": {"env": "PW"}, "allowed": ["@a.b"]}}
    doc["provider"] = {"type": "smtp", "host": "mail.example.com", "port": 587,
                       "username": "u", "password": {"file": "pw.txt"}}
    doc["sender"]["default"] = "relay@example.com"
    del doc["monitoring"]
    doc["admin"]["token"] = {"env": "TOKEN"}
    out = configfile.render(text, doc)
    assert tomllib.loads(out) == doc
    # comments survive, the ones on changed values too, in their column
    for line in ("# smtprelay: the runnable default.", "# an administrator's notes",
                 "# REST API, web page and /metrics; \"\" disables",
                 "# nobody logs in yet"):
        assert line in out
    listen_line = next(x for x in out.splitlines() if x.startswith('listen = "0.0.0.0'))
    assert listen_line.endswith('# "host:port" or a list')
    assert listen_line.index("#") == next(
        x for x in text.splitlines() if x.startswith("listen = ")).index("#")
    assert "[monitoring]" not in out


def test_render_writes_dates_as_toml_dates():
    doc = {"provider": {"type": "m365", "client_secret_expires": "2027-06-30"}}
    out = configfile.render("[provider]\ntype = \"m365\"\n", doc)
    assert tomllib.loads(out)["provider"]["client_secret_expires"] == datetime.date(2027, 6, 30)
    again = configfile.render(out, doc)
    assert again == out


def test_prepare_and_commit_are_atomic(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text("# mine\n[smtp]\nlisten = \"127.0.0.1:2525\"  # here\n")
    os.chmod(path, 0o640)
    pending = configfile.prepare(str(path), {"smtp": {"listen": "127.0.0.1:2626"}})
    # nothing changed yet, the new text waits beside it
    assert "2525" in path.read_text()
    assert Path(pending.temp_path).parent == tmp_path
    assert "2626" in Path(pending.temp_path).read_text()
    pending.commit()
    assert path.read_text() == "# mine\n[smtp]\nlisten = \"127.0.0.1:2626\"  # here\n"
    assert oct(path.stat().st_mode & 0o777) == oct(0o640)
    assert [p.name for p in tmp_path.iterdir()] == ["relay.toml"]
    aborted = configfile.prepare(str(path), {"smtp": {"listen": "127.0.0.1:1"}})
    aborted.abort()
    assert "2626" in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["relay.toml"]


# --- the test message ---


def test_test_message_is_proper_rfc5322():
    data = testmail.build("01M85GVWJQPH0EKX4M4ZZ6EVW4", "relay@example.com", "to@example.org",
                          "Prüfung ✓", "relay.test", "192.0.2.1", "outbox", NOW)
    assert data.startswith(b"Received: from admin-api ([192.0.2.1])\r\n\tby relay.test "
                           b"(smtprelay) with HTTP id 01M85GVWJQPH0EKX4M4ZZ6EVW4;")
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    data.decode("ascii")  # 7-bit on the wire: RFC 2047 subject, quoted-printable body
    m = email.message_from_bytes(data, policy=email.policy.default)
    assert m["From"].addresses[0].addr_spec == "relay@example.com"
    assert m["To"] == "to@example.org"
    assert m["Subject"] == "Prüfung ✓"
    assert m["Message-ID"] == "<01M85GVWJQPH0EKX4M4ZZ6EVW4.test@relay.test>"
    assert email.utils.parsedate_to_datetime(m["Date"]).timestamp() == NOW
    assert "relay.test" in m.get_content()


# --- OpenAPI against the routes ---


def klein_routes():
    out = {}
    for rule in AdminAPI.app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        path = path.replace("{delivery_id}", "{id}")
        methods = {m.lower() for m in rule.methods} - {"head", "options"}
        out.setdefault(path, set()).update(methods)
    return out


def test_openapi_describes_every_route_and_nothing_else():
    doc = openapi.document()
    described = {path: set(ops) for path, ops in doc["paths"].items()}
    assert described == klein_routes()


def test_openapi_is_consistent():
    doc = openapi.document()
    assert doc["openapi"].startswith("3.")
    schemas = doc["components"]["schemas"]
    text = repr(doc)
    for ref in re.findall(r"#/components/schemas/(\w+)", text):
        assert ref in schemas
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["responses"], (path, method)
            needs_token = getattr(getattr(AdminAPI, _handler_name(path, method)),
                                  "token_required", False)
            public = op.get("security") == []
            assert public == (not needs_token), (path, method)
            if needs_token:
                assert "401" in op["responses"], (path, method)
            for p in op.get("parameters", []):
                if p["in"] == "path":
                    assert "{" + p["name"] + "}" in path


def _handler_name(path, method):
    for rule in AdminAPI.app.url_map.iter_rules():
        p = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule).replace("{delivery_id}", "{id}")
        if p == path and method.upper() in rule.methods:
            return rule.endpoint
    raise AssertionError((path, method))


def test_the_contract_fields_are_in_the_schemas():
    schemas = openapi.document()["components"]["schemas"]
    assert set(schemas["Status"]["required"]) == {
        "state", "version", "started_at", "uptime_seconds", "listen", "provider", "warnings"}
    assert set(schemas["Stats"]["required"]) == {
        "uptime_seconds", "received", "sent", "failed", "queued", "deferred", "error_rate",
        "last_error"}
    assert set(schemas["Delivery"]["required"]) == {
        "id", "received_at", "finished_at", "status", "sender", "recipients", "header_from",
        "subject", "message_id", "size", "provider", "attempts_count", "next_attempt_at",
        "error", "client_address", "auth_user"}
    assert set(schemas["Attempt"]["required"]) == {"at", "outcome", "detail", "duration_ms"}


def test_redaction_of_every_secret_key_form():
    doc = {"provider": {"type": "gmail", "client_id": "c", "client_secret": "s1",
                        "refresh_token": {"env": "R"}},
           "admin": {"token": ""}}
    red = configuration.redact(doc)
    assert red["provider"]["client_secret"] == {"set": True}
    assert red["provider"]["refresh_token"] == {"set": True}
    assert red["admin"]["token"] == {"set": False}
    assert red["provider"]["client_id"] == "c"


@settings(max_examples=50)
@given(st.text(min_size=1, max_size=40))
def test_token_ok_only_for_the_token(token):
    header = ("Bearer " + token).encode("utf-8")
    usable = token.isascii() and token.strip() == token and bool(token)
    assert auth.token_ok(header, token) == usable
    assert not auth.token_ok(b"Bearer x" + header, token)


def test_safe_reason_scrubs_secrets_and_keeps_one_line():
    e = RuntimeError("login as bob with hunter2hunter2 failed\nTraceback: hunter2hunter2")
    assert shapes.safe_reason(e, ["hunter2hunter2", ""]) == "login as bob with [redacted] failed"
    assert shapes.safe_reason("plain text", ["x" * 10]) == "plain text"
    assert shapes.safe_reason(RuntimeError()) == "RuntimeError"
    missing = ImportError("No module named 'smtprelay.providers.smtp'",
                          name="smtprelay.providers.smtp")
    assert shapes.safe_reason(missing) == (
        "not available in this installation (smtprelay.providers.smtp)")


def test_a_non_loopback_admin_listener_needs_a_token():
    with pytest.raises(configuration.ConfigError) as info:
        configuration.parse({"admin": {"listen": "0.0.0.0:8025"}})
    assert "admin.token" in info.value.fields()
    configuration.parse({"admin": {"listen": "0.0.0.0:8025", "token": "t" * 20}})
