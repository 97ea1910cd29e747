"""No secret in any log line, at any level, tracebacks included: with hostile providers.

For each provider a real relay runs with every kind of secret the configuration
knows, each from a different source (literal, ``{ env }``, ``{ file }``): the
admin token, SMTP users' plain passwords, and the provider's password /
client_secret / refresh token.  The secrets hold ``+ / = & %`` so that their
encodings differ from them.  Then everything that makes a relay talk about
its credentials happens:

- clients AUTH right and wrong, with a secret as the user name, over PLAIN and
  LOGIN; admin API calls with the right and a wrong token; the provider test
  and a test mail while the provider is failing;
- the provider first is hostile (:mod:`tests.echo_servers`): it refuses the
  credentials quoting everything it was sent (the AUTH lines in base64, the
  token request's form body, the headers); then an admin switches the relay
  (``PUT /api/config``, secrets kept as ``{"set": true}``) to the real upstream
  or fake, behind the fault proxy, which resets connections; mail then flows.

Then the whole log (text or JSON lines), the delivery log in the database and
every admin API answer are searched for each secret in every form it may take
on the way: as is, base64 at each of the three alignments (an AUTH PLAIN
payload holds the password after the user name), URL-encoded (a form body) and
JSON-escaped.  ``secrets leaked`` in the report counts what was found: 0.
"""

import base64
import json
import smtplib
import time
from urllib.parse import quote, quote_plus

import pytest

from tests import torture
from tests.admin_client import AdminClient
from tests.echo_servers import EchoHTTPS, EchoSMTP
from tests.faultproxy import FaultProxy
from tests.hostile import marker, message, settle, submit
from tests.relay import RelayProcess

pytestmark = [pytest.mark.slow, pytest.mark.torture]

ODD = "+/=&%"
ADMIN_TOKEN = f"Adm1n-t0ken{ODD}x7"
USERS = {"lit": f"Lit3ral-pw{ODD}a1", "env": f"Env1ron-pw{ODD}b2", "file": f"F1le-pw{ODD}c3"}
SMTP_PASSWORD = f"Upstr3am-pw{ODD}d4"
CLIENT_SECRET = f"Q~x8-client-secret{ODD}e5"
GMAIL_SECRET = f"GOCSPX-secret{ODD}f6"
REFRESH_TOKEN = f"1//0refresh-token{ODD}g7"


def forms(secret):
    """Every way ``secret`` may be written down on its way to a log line."""
    raw = secret.encode("utf-8")
    out = {"as is": secret}
    for r in range(3):
        encoded = base64.b64encode(b"\0" * r + raw).decode()
        # only the 4-character groups made of the secret alone: the same wherever it sits
        start = 4 if r else 0
        end = len(encoded) - (4 if (r + len(raw)) % 3 else 0)
        if end - start >= 8:
            out[f"base64 at offset {r}"] = encoded[start:end]
    out["base64"] = base64.b64encode(raw).decode().rstrip("=")
    for name, value in (("url-encoded", quote_plus(secret)), ("percent-encoded", quote(secret)),
                        ("json-escaped", json.dumps(secret)[1:-1])):
        if value != secret:
            out[name] = value
    return out


def leaks(text, secrets):
    return [(name, kind) for name, secret in secrets.items()
            for kind, form in forms(secret).items() if form in text]


def auth_plain(user, password):
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()


def smtp_clients(relay):
    """AUTH right and wrong, PLAIN and LOGIN, a secret as the user name; one message."""
    port = relay.port
    for user, password in USERS.items():
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("client.test")
            assert s.docmd("AUTH", "PLAIN " + auth_plain(user, password + "x"))[0] == 535
            assert s.docmd("AUTH", "PLAIN " + auth_plain(user, password))[0] == 235
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("client.test")
            assert s.docmd("AUTH", "LOGIN " + base64.b64encode(user.encode()).decode())[0] == 334
            assert s.docmd(base64.b64encode(password.encode()).decode())[0] == 235
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        # a secret typed into the user name field
        assert s.docmd("AUTH", "PLAIN " + auth_plain(USERS["env"], USERS["lit"]))[0] == 535
        assert s.docmd("AUTH", "LOGIN " + base64.b64encode(ADMIN_TOKEN.encode()).decode())[0] \
            == 334
        assert s.docmd(base64.b64encode(SMTP_PASSWORD.encode()).decode())[0] == 535


def admin_calls(relay, token):
    c = AdminClient(relay.admin_port, token)
    c.get("/api/status", token=token + "x")
    c.get("/api/status", token=USERS["lit"])
    for path in ("/api/status", "/api/stats", "/api/deliveries", "/api/config", "/metrics"):
        c.get(path)
    c.post("/api/provider/test")
    c.post("/api/test-mail", {"to": "admin@example.org"})
    return c


def switch_provider(client, **changes):
    """An admin points the provider elsewhere; its secrets stay ``{"set": true}``."""
    document = client.ok("GET", "/api/config")
    assert all(v == {"set": True} for k, v in document["provider"].items()
               if k in ("password", "client_secret", "refresh_token"))
    document["provider"].update(changes)
    client.ok("PUT", "/api/config", document)


def start(tmp_path, provider, admin_token, env=None, logger=None, extra=None):
    (tmp_path / "pw.txt").write_text(USERS["file"] + "\n")
    config = {
        "admin": {"listen": "127.0.0.1:0", "token": admin_token},
        "smtp": {"auth": {"max_failures": 50,
                          "users": {"lit": USERS["lit"], "env": {"env": "T_USER_PW"},
                                    "file": {"file": str(tmp_path / "pw.txt")}}}},
        "delivery": {"retry": ["1s"], "max_age": "60s"},
    }
    for key, value in (extra or {}).items():
        config[key] = {**config.get(key, {}), **value}
    relay = RelayProcess(tmp_path / "relay", config,
                         env={"T_USER_PW": USERS["env"], "T_ADMIN": ADMIN_TOKEN, **(env or {})},
                         logger=logger)
    relay.config["provider"] = provider
    return relay.start()


def audit(relay, client, secrets):
    """Search the log, the delivery log and the admin answers; count into the report."""
    log = relay.log(whole=True)
    delivery_log = json.dumps(relay.query("SELECT detail FROM attempts")
                              + relay.query("SELECT error FROM messages"))
    answers = " ".join(a.text + json.dumps(a.headers) for a in client.answers)
    found = {"log": leaks(log, secrets), "delivery log": leaks(delivery_log, secrets),
             "admin answers": leaks(answers, secrets)}
    torture.figures["secrets leaked"] += sum(len(v) for v in found.values())
    torture.figures["secret forms searched"] += sum(len(forms(s)) for s in secrets.values())
    torture.figures["tracebacks in the log (searched too)"] += log.count("Traceback")
    assert found == {"log": [], "delivery log": [], "admin answers": []}, found
    return log


def all_secrets(**provider):
    return {"admin token": ADMIN_TOKEN, **{f"user {k}": v for k, v in USERS.items()},
            **provider}


def wait_for(predicate, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------------------- smtp

def test_no_secret_leaks_through_the_smtp_provider(tmp_path, ca):
    from tests.upstream import Upstream

    echo = EchoSMTP()
    upstream = Upstream(ca, users={"relayuser": SMTP_PASSWORD}).start()
    proxy = FaultProxy(upstream.port)
    relay = start(tmp_path, {"type": "smtp", "host": "127.0.0.1", "port": echo.port,
                             "security": "none", "username": "relayuser",
                             "password": {"env": "T_SMTP_PW"}, "timeout": "3s"},
                  ADMIN_TOKEN, env={"T_SMTP_PW": SMTP_PASSWORD})
    try:
        smtp_clients(relay)
        first = {marker("secrets-smtp", n): None for n in range(2)}
        for mark in first:
            first[mark] = submit(relay, "app@example.com", ["to@example.net"],
                                 message("app@example.com", "to@example.net", mark))
        wait_for(lambda: len(echo.auth_lines) >= 4, what="AUTH echoed back")
        client = admin_calls(relay, ADMIN_TOKEN)
        proxy.arm("reset", ("reset_after", 300), "abort_tls")
        switch_provider(client, port=proxy.port, security="starttls", ca_file=str(ca.ca_path))
        assert {r[0] for r in settle(relay, first.values(), 60).values()} == {"sent"}
        assert upstream.messages and all(m.auth == b"relayuser" for m in upstream.messages)
        torture.figures["faults injected"] += proxy.faults + len(echo.auth_lines)
        log = audit(relay, client, all_secrets(**{"smtp password": SMTP_PASSWORD}))
        assert "you sent" in log  # the echo did reach the log, scrubbed
    finally:
        relay.stop()
        proxy.stop()
        upstream.stop()
        echo.stop()


# ----------------------------------------------------------------------------- m365

def test_no_secret_leaks_through_the_m365_provider(tmp_path, ca):
    from tests.graph_support import CLIENT, MAILBOX, TENANT, FakeGraphProcess

    echo = EchoHTTPS(ca)
    fake = FakeGraphProcess(tmp_path / "graph-ca")
    fake.setup(secrets=(CLIENT_SECRET,))
    proxy = FaultProxy(fake.port)
    fake.control("POST", "settings", {"proxy_ports": [proxy.port]})
    (tmp_path / "client_secret").write_text(CLIENT_SECRET + "\n")
    relay = start(tmp_path, {
        "type": "m365", "tenant_id": TENANT, "client_id": CLIENT,
        "client_secret": {"file": str(tmp_path / "client_secret")},
        "authority": echo.url, "graph_endpoint": echo.url, "ca_file": str(ca.ca_path),
        "timeout": "3s"}, {"env": "T_ADMIN"}, logger="smtprelay.logs.json_observer",
        extra={"sender": {"default": MAILBOX, "allowed": ["*"]}})
    try:
        smtp_clients(relay)
        first = {marker("secrets-m365", n): None for n in range(2)}
        for mark in first:
            first[mark] = submit(relay, MAILBOX, ["ann@example.com"],
                                 message(MAILBOX, "ann@example.com", mark))
        wait_for(lambda: any("client_secret" in r for r in echo.requests),
                 what="the secret echoed back")
        client = admin_calls(relay, ADMIN_TOKEN)
        fake.control("POST", "faults/storm", {"route": "sendMail", "count": 2, "status": 503})
        fake.control("POST", "faults", {"route": "sendMail", "action": "accept_then_drop"})
        proxy.arm("reset", "abort_tls")
        url = f"https://127.0.0.1:{proxy.port}"
        switch_provider(client, authority=url, graph_endpoint=url, ca_file=str(fake.ca_file))
        assert {r[0] for r in settle(relay, first.values(), 60).values()} == {"sent"}
        torture.figures["faults injected"] += proxy.faults + 3 + len(echo.requests)
        audit(relay, client, all_secrets(**{"client secret": CLIENT_SECRET}))
    finally:
        relay.stop()
        proxy.stop()
        fake.stop()
        echo.stop()


# ----------------------------------------------------------------------------- gmail

def test_no_secret_leaks_through_the_gmail_provider(tmp_path, ca):
    from tests.fakes.google_accounts import OAuthUser
    from tests.gmail_support import FakeGoogleProcess

    echo = EchoHTTPS(ca)
    fake = FakeGoogleProcess(ca.directory, tmp_path / "fake.log")
    sender = "relay@example.com"
    user = OAuthUser(sender, "123456789012-abc.apps.googleusercontent.com", GMAIL_SECRET,
                     REFRESH_TOKEN)
    fake.control("POST", "reset")
    fake.control("POST", "mailboxes", {"address": sender})
    fake.control("POST", "oauth-clients", user.client_registration())
    fake.control("POST", "refresh-tokens", user.token_registration())
    proxy = FaultProxy(fake.port)
    (tmp_path / "admin_token").write_text(ADMIN_TOKEN + "\n")
    relay = start(tmp_path, {
        "type": "gmail", "client_id": user.client_id, "client_secret": GMAIL_SECRET,
        "refresh_token": {"env": "T_REFRESH"}, "token_uri": f"{echo.url}/token",
        "api_endpoint": echo.url, "ca_file": str(ca.ca_path), "timeout": "3s"},
        {"file": str(tmp_path / "admin_token")}, env={"T_REFRESH": REFRESH_TOKEN},
        extra={"sender": {"default": sender, "allowed": ["*"]}})
    try:
        smtp_clients(relay)
        first = {marker("secrets-gmail", n): None for n in range(2)}
        for mark in first:
            first[mark] = submit(relay, sender, ["alice@example.org"],
                                 message(sender, "alice@example.org", mark))
        wait_for(lambda: any("refresh_token" in r for r in echo.requests),
                 what="the refresh token echoed back")
        client = admin_calls(relay, ADMIN_TOKEN)
        fake.control("POST", "faults", {"route": "send", "status": 500, "count": 2})
        fake.control("POST", "faults", {"route": "send", "kind": "drop", "process": True})
        proxy.arm("reset", "abort_tls")
        url = f"https://127.0.0.1:{proxy.port}"
        switch_provider(client, token_uri=f"{url}/token", api_endpoint=url)
        assert {r[0] for r in settle(relay, first.values(), 60).values()} == {"sent"}
        torture.figures["faults injected"] += proxy.faults + 3 + len(echo.requests)
        audit(relay, client, all_secrets(**{"client secret": GMAIL_SECRET,
                                            "refresh token": REFRESH_TOKEN}))
    finally:
        relay.stop()
        proxy.stop()
        fake.stop()
        echo.stop()


# ----------------------------------------------------------------------------- the scrubbing itself

SECRETS = {"admin token": ADMIN_TOKEN, "client secret": CLIENT_SECRET, **USERS,
           "short": "abcd"}


def test_every_form_of_a_secret_is_scrubbed_from_tracebacks_at_every_level():
    """In-process: an exception quoting each form of each secret, logged as a failure
    (a traceback) and at every level, through the text and the JSON observers."""
    import io

    from twisted.logger import Logger, LogLevel, LogPublisher

    from smtprelay import logs, scrub

    scrub.set_secrets(SECRETS.values())
    try:
        for make in (logs.text_observer, logs.json_observer):
            out = io.StringIO()
            publisher = LogPublisher(make(out))
            log = Logger(observer=publisher)
            for _name, secret in SECRETS.items():
                for kind, form in forms(secret).items():
                    quoted = f"AUTH PLAIN {form} | client_secret={form} | {kind}"
                    try:
                        raise ValueError(f"the provider said: {quoted}")
                    except ValueError:
                        log.failure("delivery failed for {who}", who=quoted)
                    for level in LogLevel.iterconstants():
                        log.emit(level, "{what}", what=quoted, extra={"nested": [quoted]})
            text = out.getvalue()
            assert "Traceback" in text or "traceback" in text
            found = leaks(text, {k: v for k, v in SECRETS.items() if k != "short"})
            torture.figures["secrets leaked"] += len(found)
            assert found == [], found
            # a short secret is scrubbed as is (its base64 runs are too short to be told
            # from other text)
            assert "abcd" not in text
    finally:
        scrub.set_secrets([])


def test_a_provider_quoting_credentials_is_scrubbed_before_the_delivery_log():
    from smtprelay import scrub
    from smtprelay.admin.shapes import safe_reason
    from smtprelay.model import Outcome, Result
    from smtprelay.queue import scrubbed

    scrub.set_secrets([SMTP_PASSWORD])
    try:
        echoed = "535 you sent: AUTH PLAIN " + auth_plain("relayuser", SMTP_PASSWORD)
        outcome = scrubbed(Outcome.temporary(
            echoed, recipients={"a@example.org": (Result.TEMPORARY, echoed)}))
        assert leaks(outcome.detail + outcome.recipients["a@example.org"][1],
                     {"p": SMTP_PASSWORD}) == []
        assert "[redacted]" in outcome.detail
        clean = Outcome.sent("250 ok")
        assert scrubbed(clean) is clean
        assert leaks(safe_reason(f"client_secret={quote_plus(SMTP_PASSWORD)}", [SMTP_PASSWORD]),
                     {"p": SMTP_PASSWORD}) == []
    finally:
        scrub.set_secrets([])
