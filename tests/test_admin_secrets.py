"""Property: no secret of the configuration ever appears in an API answer or a log line.

Hypothesis picks the secrets (the admin token from the environment, SMTP user
passwords as a literal, from a file and from the environment, a provider
password given in a PUT); a real relay runs with them, every endpoint is
called (successes and failures, a configuration round trip, a refused and an
unappliable PUT, SMTP AUTH right and wrong), and then every answer (raw, and
every string inside its JSON) and the whole log are searched for each secret.
Each example starts a relay, so there are few of them; set
SMTPRELAY_SECRET_EXAMPLES for more.
"""

import base64
import json
import os
import smtplib

import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from tests.admin_client import AdminClient
from tests.relay import RelayProcess

pytestmark = pytest.mark.slow

# tokens travel in an HTTP header: visible ASCII; passwords may be anything printable
TOKEN_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
PASSWORD_CHARS = st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"),
                               blacklist_characters="\x00")


def secret(chars, tag):
    # long enough never to occur in an answer by chance; the tag keeps them apart
    return st.text(chars, min_size=10, max_size=40).map(lambda s: f"{tag}{s}{tag}")


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def leaks(secrets, text, parsed=None):
    found = [s for s in secrets if s in text]
    if parsed is not None:
        found += [s for s in secrets for v in strings(parsed) if s in v]
    return found


def login(smtp, user, password):
    """AUTH PLAIN with a UTF-8 password (smtplib's login() takes ASCII only)."""
    smtp.ehlo("client.example")
    blob = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode("utf-8"))
    return smtp.docmd("AUTH", "PLAIN " + blob.decode("ascii"))[0]


def exercise(relay, token, passwords, provider_password):
    c = AdminClient(relay.admin_port, token)
    port = relay.port
    # SMTP AUTH, right and wrong (the log records both)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        assert login(s, "literal", passwords["literal"]) == 235
        s.sendmail("app@example.com", ["x@example.org"], "Subject: s\r\n\r\nbody\r\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        assert login(s, "fromfile", passwords["literal"]) == 535
    for user in ("fromfile", "fromenv"):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            assert login(s, user, passwords[user]) == 235
    for path in ("/api/status", "/api/stats", "/api/deliveries", "/api/config",
                 "/api/openapi.json", "/metrics", "/healthz", "/",
                 "/api/deliveries?since=bad&status=bad"):
        c.get(path)
    items = c.ok("GET", "/api/deliveries")["items"]
    c.get(f"/api/deliveries/{items[0]['id']}")
    c.post("/api/provider/test")
    c.post("/api/test-mail", {"to": "admin@example.org"})
    c.post("/api/test-mail", {"to": "broken"})
    c.get("/api/status", token=token + "x")  # a wrong token in a failed request
    cfg = c.ok("GET", "/api/config")
    c.put("/api/config", cfg)
    bad = json.loads(json.dumps(cfg))
    bad["smtp"]["max_recipients"] = "lots"
    c.put("/api/config", bad)
    upstream = json.loads(json.dumps(cfg))
    upstream["provider"] = {"type": "smtp", "host": "127.0.0.1", "port": 9, "security": "none",
                            "username": "u", "password": provider_password}
    c.put("/api/config", upstream)
    c.post("/api/provider/test")
    c.put("/api/config", cfg)  # back to the outbox (if the smtp provider was applied)
    c.post("/api/smtp/stop")
    c.post("/api/smtp/start")
    c.get("/api/status")
    return c.answers


# no shrinking: every example starts a relay, and a failing one prints its secrets anyway
@settings(max_examples=int(os.environ.get("SMTPRELAY_SECRET_EXAMPLES", "5")), deadline=None,
          phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(token=secret(TOKEN_CHARS, "T~"), literal=secret(PASSWORD_CHARS, "L~"),
       fromfile=secret(PASSWORD_CHARS, "F~"), fromenv=secret(PASSWORD_CHARS, "E~"),
       provider_password=secret(PASSWORD_CHARS, "P~"))
def test_no_secret_in_any_answer_or_log_line(tmp_path_factory, token, literal, fromfile,
                                             fromenv, provider_password):
    passwords = {"literal": literal, "fromfile": fromfile, "fromenv": fromenv}
    secrets = [token, literal, fromfile, fromenv, provider_password]
    assume(not any(a is not b and a in b for a in secrets for b in secrets))
    base = tmp_path_factory.mktemp("secrets")
    (base / "pw.txt").write_text(fromfile + "\n", encoding="utf-8")
    relay = RelayProcess(base / "relay", {
        "admin": {"listen": "127.0.0.1:0", "token": {"env": "T_ADMIN_TOKEN"}},
        "smtp": {"auth": {"users": {"literal": literal,
                                    "fromfile": {"file": str(base / "pw.txt")},
                                    "fromenv": {"env": "T_USER_PW"}}}},
    }, env={"T_ADMIN_TOKEN": token, "T_USER_PW": fromenv})
    relay.start()
    try:
        answers = exercise(relay, token, passwords, provider_password)
    finally:
        relay.stop()
    assert len(answers) > 20
    for a in answers:
        is_json = a.headers.get("content-type", "").startswith("application/json")
        parsed = a.json if is_json else None
        assert not leaks(secrets, a.text, parsed), a
        assert not leaks(secrets, " ".join(f"{k}: {v}" for k, v in a.headers.items()))
    log = relay.log(whole=True)
    assert "AUTH failed for user fromfile" in log and "AUTH ok for literal" in log
    assert not leaks(secrets, log), [s for s in secrets if s in log]
