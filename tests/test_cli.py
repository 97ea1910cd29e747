"""The console script, the twistd plugin and start-up errors, as an admin meets them."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from smtprelay.passwords import PasswordHash
from tests.relay import REPO, TWISTD, RawSMTP, RelayProcess

SMTPRELAY = str(Path(sys.executable).with_name("smtprelay"))


def run(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, **kw)


def test_check_config_accepts_the_shipped_default():
    r = run([SMTPRELAY, "check-config", str(REPO / "etc" / "relay.toml")])
    assert r.returncode == 0, r.stderr
    assert "ok (provider outbox" in r.stdout


def test_check_config_lists_every_problem(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text('[smtp]\nlisten = "0.0.0.0:25"\nmax_recipients = 0\n'
                    '[provider]\ntype = "m365"\n')
    r = run([SMTPRELAY, "check-config", str(path)])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert f"{path}: smtp.max_recipients: must be at least 1" in lines
    assert f'{path}: provider.tenant_id: required for type "m365"' in lines
    assert any(line.startswith(f"{path}: smtp.open_relay: refusing to listen on 0.0.0.0:25")
               for line in lines)
    assert "Traceback" not in r.stderr


def test_hash_password_from_a_pipe():
    r = run([SMTPRELAY, "hash-password"], input="correct horse\n")
    assert r.returncode == 0, r.stderr
    assert PasswordHash.parse(r.stdout.strip()).verify(b"correct horse")
    r = run([SMTPRELAY, "hash-password"], input="\n")
    assert r.returncode == 1


def test_twistd_knows_the_plugin():
    r = run([TWISTD, "--help"])
    assert "smtprelay" in r.stdout
    r = run([TWISTD, "smtprelay", "--help"])
    assert "--config" in r.stdout


def test_start_up_refuses_a_bad_configuration(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text('[smtp]\nlisten = "0.0.0.0:2525"\n')
    r = run([TWISTD, "-n", "--pidfile=", "smtprelay", "--config", str(path)])
    assert r.returncode != 0
    assert "smtp.open_relay: refusing to listen on 0.0.0.0:2525" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr + r.stdout


def test_start_up_names_the_key_of_a_port_in_use(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    relay = RelayProcess(tmp_path / "r", {"smtp": {"listen": f"127.0.0.1:{port}"}})
    relay.start(expect_ready=False)
    code = relay.wait_exit(30)
    busy.close()
    assert code != 0
    assert f"smtp.listen: cannot listen on 127.0.0.1:{port}: Address already in use" in relay.log()


def test_json_logs_on_request_and_no_secret_in_them(tmp_path):
    secret = "literal-smtp-password-9f3a"
    relay = RelayProcess(tmp_path / "r", {
        "smtp": {"auth": {"users": {"app": secret}}},
    }, logger="smtprelay.logs.json_observer")
    relay.start()
    try:
        with RawSMTP(relay.port) as c:
            c.reply()
            c.cmd("EHLO x")
            import base64

            c.cmd("AUTH PLAIN " + base64.b64encode(b"\0app\0" + secret.encode() + b"x").decode())
            c.cmd("AUTH PLAIN " + base64.b64encode(b"\0app\0" + secret.encode()).decode())
            c.cmd("MAIL FROM:<a@example.com>")
            c.cmd("RCPT TO:<b@example.com>")
            c.cmd("DATA")
            c.send(b"Subject: json\r\n\r\nhi\r\n.\r\n")
            assert c.reply().code == 250
        relay.wait_outbox(1)
    finally:
        relay.stop()
    lines = [line for line in relay.log(whole=True).splitlines() if line.startswith("{")]
    events = [json.loads(line) for line in lines]
    assert any("accepted from" in e.get("log_format", "") for e in events)
    assert secret not in relay.log(whole=True)


def test_systemd_unit_runs_the_plugin_sandboxed():
    unit = (REPO / "etc" / "smtprelay.service").read_text()
    assert "twistd --nodaemon" in unit and "smtprelay --config" in unit
    for directive in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                      "KillSignal=SIGTERM", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE"):
        assert directive in unit


def test_default_logs_scrub_secrets_even_from_client_input(tmp_path):
    """A secret a client sends back at us (here as a user name) is scrubbed too."""
    import base64

    secret = "admin-token-literal-77c1"
    relay = RelayProcess(tmp_path / "r", {"smtp": {"auth": {"users": {"app": "pw-pw-pw"}}},
                                          "admin": {"token": secret}})
    relay.start()
    try:
        with RawSMTP(relay.port) as c:
            c.reply()
            c.cmd("EHLO x")
            r = c.cmd("AUTH PLAIN " + base64.b64encode(b"\0" + secret.encode() + b"\0x").decode())
            assert r.code == 535
    finally:
        relay.stop()
    log = relay.log(whole=True)
    assert "AUTH failed for user [redacted]" in log
    assert secret not in log
