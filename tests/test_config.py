"""Configuration: every key of relay.toml, secrets, one problem per key, the open-relay guard."""

import datetime
import tomllib
from pathlib import Path

import pytest

from smtprelay import config
from smtprelay.config import ConfigError, ListenAddress, Secret, parse, parse_listen
from smtprelay.passwords import PasswordHash, hash_password

# the contract's reference file (a copy: CI clones the repository on its own)
SPEC = Path(__file__).resolve().parent / "data" / "spec-relay.toml"


def problems(document, **kw):
    with pytest.raises(ConfigError) as info:
        parse(document, **kw)
    return {p.key: p.message for p in info.value.problems}


def test_defaults_are_the_contract():
    c = parse({})
    assert c.smtp.listen == (ListenAddress("127.0.0.1", 2525),)
    assert c.smtp.tls_listen == ()
    assert c.smtp.max_message_size == 35_000_000
    assert c.smtp.max_recipients == 500
    assert c.smtp.max_connections == 200
    assert c.smtp.idle_timeout == 300
    assert c.smtp.tls_minimum_version == "1.2"
    assert c.smtp.bare_newlines == "normalize"
    assert c.smtp.max_line_length == 65536
    assert c.smtp.open_relay is False
    assert c.smtp.auth.required is False and c.smtp.auth.allow_plaintext is False
    assert c.smtp.auth.max_failures == 5 and c.smtp.auth.lockout == 900
    assert c.sender.on_disallowed == "reject" and c.sender.check_header_from is True
    assert c.provider.type == "outbox"
    assert c.delivery.mode == "queue"
    assert c.delivery.retry == (60, 300, 900, 3600, 14400)
    assert c.delivery.max_age == 5 * 86400 and c.delivery.concurrency == 4
    assert c.delivery.direct_timeout == 60
    assert c.database.retention == 90 * 86400
    assert c.admin.listen == ListenAddress("127.0.0.1", 8025)
    assert c.monitoring.secret_warning_days == 30


def test_the_reference_file_parses_with_every_documented_key(tmp_path):
    """The spec's own relay.toml (outbox section active) is a valid configuration."""
    document = tomllib.loads(SPEC.read_text())
    c = parse(document, base_dir=tmp_path)
    assert c.smtp.hostname == "relay.example.com"
    assert c.provider.directory == str(tmp_path / "var/outbox")
    assert c.database.url == f"sqlite:///{tmp_path / 'var/relay.db'}"


def test_listen_forms():
    assert parse_listen("0.0.0.0:25") == ListenAddress("0.0.0.0", 25)
    assert parse_listen("[::1]:2525") == ListenAddress("::1", 2525)
    assert str(ListenAddress("::1", 2525)) == "[::1]:2525"
    c = parse({"smtp": {"listen": ["127.0.0.1:25", "[::1]:25"]}})
    assert [str(a) for a in c.smtp.listen] == ["127.0.0.1:25", "[::1]:25"]
    for bad in ("2525", "::1:25", "host:99999", "[nope]:25", "a:b"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_one_line_per_problem_naming_the_key():
    p = problems({
        "smtp": {"listen": "localhost", "max_recipients": "many", "bogus": 1,
                 "bare_newlines": "strip", "tls_minimum_version": "1.4"},
        "sender": {"default": "not an address", "allowed": ["@", "ok@example.com"]},
        "delivery": {"retry": ["1x"], "mode": "later"},
        "database": {"url": "mysql://x"},
        "monitoring": {"secret_warning_days": -1},
        "extra": {},
    })
    assert set(p) == {
        "smtp.listen", "smtp.max_recipients", "smtp.bogus", "smtp.bare_newlines",
        "smtp.tls_minimum_version", "sender.default", "sender.allowed", "delivery.retry",
        "delivery.mode", "database.url", "monitoring.secret_warning_days", "extra",
    }
    assert p["smtp.bogus"] == "unknown key"
    assert "integer" in p["smtp.max_recipients"]


def test_error_lines_name_the_file():
    with pytest.raises(ConfigError) as info:
        parse({"provider": {"type": "m365"}}, source="relay.toml")
    lines = info.value.lines()
    assert 'relay.toml: provider.tenant_id: required for type "m365"' in lines
    assert 'relay.toml: sender.default: required for provider type "m365"' in lines


def test_provider_keys_belong_to_their_type():
    p = problems({"provider": {"type": "outbox", "host": "mail.example.com"}})
    assert p == {"provider.host": 'not a key for type "outbox"'}
    p = problems({"provider": {"type": "smtp", "host": "x", "tenant_id": "t"}})
    assert p == {"provider.tenant_id": 'not a key for type "smtp"'}


def test_m365_forms(tmp_path):
    base = {"sender": {"default": "a@example.com"},
            "provider": {"type": "m365", "tenant_id": "t", "client_id": "c"}}
    p = problems(base)
    assert "provider.client_secret" in p
    c = parse({**base, "provider": {**base["provider"], "client_secret": "s3cret!",
                                    "client_secret_expires": datetime.date(2027, 6, 30)}})
    assert c.provider.client_secret.reveal() == "s3cret!"
    assert c.provider.client_secret_expires == datetime.date(2027, 6, 30)
    assert c.provider.authority == "https://login.microsoftonline.com"
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("y")
    c = parse({**base, "provider": {**base["provider"], "certificate": "c.pem",
                                    "certificate_key": "k.pem"}}, base_dir=tmp_path)
    assert c.provider.certificate == str(cert)
    p = problems({**base, "provider": {**base["provider"], "client_secret": "x",
                                       "certificate": "c.pem", "certificate_key": "k.pem"}},
                 base_dir=tmp_path)
    assert "provider.client_secret" in p
    p = problems({**base, "provider": {**base["provider"], "client_secret": "x",
                                       "authority": "http://login.example"}})
    assert p == {"provider.authority": "must be an https:// URL"}


def test_gmail_forms(tmp_path):
    base = {"sender": {"default": "a@example.com"}, "provider": {"type": "gmail"}}
    assert "provider.service_account_file" in problems(base)
    p = problems({**base, "provider": {"type": "gmail", "client_id": "x"}})
    assert set(p) == {"provider.client_secret", "provider.refresh_token"}
    (tmp_path / "sa.json").write_text("{}")
    c = parse({**base, "provider": {"type": "gmail", "service_account_file": "sa.json"}},
              base_dir=tmp_path)
    assert c.provider.service_account_file == str(tmp_path / "sa.json")
    p = problems({**base, "provider": {"type": "gmail", "service_account_file": "missing.json"}},
                 base_dir=tmp_path)
    assert "no such file" in p["provider.service_account_file"]


def test_smtp_provider_forms():
    c = parse({"provider": {"type": "smtp", "host": "mail.example.com"}})
    assert (c.provider.port, c.provider.security, c.provider.verify_certificate) == (
        587, "starttls", True)
    tls = parse({"provider": {"type": "smtp", "host": "h", "security": "tls"}})
    assert tls.provider.port == 465
    p = problems({"provider": {"type": "smtp", "host": "h", "username": "u"}})
    assert p == {"provider.password": "required when provider.username is set"}
    assert "provider.host" in problems({"provider": {"type": "smtp"}})


def test_secrets_three_ways(tmp_path):
    (tmp_path / "pw").write_text("from-a-file\n")
    doc = {"provider": {"type": "smtp", "host": "h", "username": "u",
                        "password": {"file": "pw"}}}
    c = parse(doc, base_dir=tmp_path)
    assert c.provider.password.reveal() == "from-a-file"
    doc["provider"]["password"] = {"env": "RELAY_PW"}
    assert parse(doc, environ={"RELAY_PW": "from-env"}).provider.password.reveal() == "from-env"
    p = problems(doc, environ={})
    assert p == {"provider.password": "environment variable RELAY_PW is not set"}
    doc["provider"]["password"] = {"file": "missing"}
    assert "cannot read secret file" in problems(doc, base_dir=tmp_path)["provider.password"]
    doc["provider"]["password"] = {"vault": "x"}
    assert "a secret is" in problems(doc)["provider.password"]


def test_a_secret_never_shows_in_repr_or_errors():
    s = Secret("literal", None, "hunter2-very-secret")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s)
    c = parse({"provider": {"type": "smtp", "host": "h", "username": "u",
                            "password": "hunter2-very-secret"}})
    assert "hunter2" not in repr(c)
    assert c.secrets() == ["hunter2-very-secret"]
    # a broken configuration with a secret in it: the error text does not carry it
    with pytest.raises(ConfigError) as info:
        parse({"provider": {"type": "smtp", "host": "h", "username": "u",
                            "password": "hunter2-very-secret", "port": "x"}})
    assert "hunter2" not in str(info.value)


def test_users_hash_secret_or_table():
    h = hash_password(b"pw", ln=4)
    c = parse({"smtp": {"auth": {"users": {
        "a": h,
        "b": "plain-literal",
        "c": {"password": h, "allowed": ["@example.com"]},
        "d": {"password": {"env": "PW_D"}},
    }}}}, environ={"PW_D": "x"})
    users = c.smtp.auth.users
    assert isinstance(users["a"].password, PasswordHash) and users["a"].allowed is None
    assert isinstance(users["b"].password, Secret)
    assert users["c"].allowed.matches("x@example.com") and not users["c"].allowed.matches("x@b.c")
    assert users["d"].password.reveal() == "x"
    p = problems({"smtp": {"auth": {"users": {"e": {"allowed": ["@x.com"]}, "f": "$scrypt$bad"}}}})
    assert set(p) == {"smtp.auth.users.e.password", "smtp.auth.users.f"}


def test_contradictions():
    assert problems({"smtp": {"auth": {"required": True}}}) == {
        "smtp.auth.required": "true but smtp.auth.users is empty: nobody could send"}
    p = problems({"smtp": {"tls_key": "k.pem"}})
    assert "smtp.tls_key" in p
    p = problems({"smtp": {"tls_listen": ["127.0.0.1:465"]}})
    assert "smtp.tls_listen" in p
    p = problems({"sender": {"on_disallowed": "rewrite"}})
    assert p == {"sender.on_disallowed": '"rewrite" needs sender.default'}
    p = problems({"admin": {"listen": "0.0.0.0:8025"}})
    assert p == {"admin.token": "required when admin.listen (0.0.0.0:8025) is not loopback"}


def test_tls_files_are_checked(ca, tmp_path):
    c = parse({"smtp": {"tls_certificate": str(ca.server_cert), "tls_key": str(ca.server_key)}})
    assert c.smtp.tls_enabled
    _other_cert, other_key = ca.issue("other.test")
    p = problems({"smtp": {"tls_certificate": str(ca.server_cert), "tls_key": str(other_key)}})
    assert "does not belong" in p["smtp.tls_certificate"]
    p = problems({"smtp": {"tls_certificate": str(tmp_path / "no.pem"),
                           "tls_key": str(ca.server_key)}})
    assert "no such file" in p["smtp.tls_certificate"]


@pytest.mark.parametrize("listen", ["0.0.0.0:25", "10.1.2.3:25", "[::]:25", ":25"])
def test_open_relay_guard_refuses_exposed_listeners(listen):
    p = problems({"smtp": {"listen": listen}})
    assert list(p) == ["smtp.open_relay"]
    assert "open relay" in p["smtp.open_relay"]


def test_open_relay_guard_is_satisfied_by_auth_networks_or_explicit_consent():
    h = hash_password(b"pw", ln=4)
    parse({"smtp": {"listen": "0.0.0.0:25", "auth": {"required": True, "users": {"u": h}}}})
    parse({"smtp": {"listen": "0.0.0.0:25", "allowed_networks": ["10.0.0.0/8"]}})
    parse({"smtp": {"listen": "0.0.0.0:25", "open_relay": True}})
    parse({"smtp": {"listen": ["127.0.0.1:25", "[::1]:25", "localhost:26"]}})
    p = problems({"smtp": {"tls_listen": ["0.0.0.0:465"]}})
    assert "smtp.open_relay" in p


def test_sizes_and_durations():
    c = parse({"smtp": {"max_message_size": "512KB", "idle_timeout": "90s"},
               "delivery": {"retry": ["30s", "1h30m"], "max_age": "2d"},
               "database": {"retention": "4w"}})
    assert c.smtp.max_message_size == 512_000
    assert c.smtp.idle_timeout == 90
    assert c.delivery.retry == (30, 5400)
    assert c.delivery.max_age == 172800
    assert c.database.retention == 28 * 86400
    assert "smtp.max_message_size" in problems({"smtp": {"max_message_size": "lots"}})


def test_load_reports_the_file(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text("[smtp\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.lines()[0].startswith(f"{path}: not valid TOML")
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "missing.toml")
    assert "cannot read the file" in str(info.value)


def test_redaction_and_unredaction():
    doc = {"provider": {"type": "smtp", "host": "h", "username": "u", "password": "pw1"},
           "admin": {"token": {"env": "TOKEN"}},
           "smtp": {"auth": {"users": {"a": "$scrypt$x",
                                       "b": {"password": "p", "allowed": ["*"]}}}}}
    red = config.redact(doc)
    assert red["provider"]["password"] == {"set": True}
    assert red["admin"]["token"] == {"set": True}
    assert red["smtp"]["auth"]["users"]["a"] == {"set": True}
    assert red["smtp"]["auth"]["users"]["b"] == {"password": {"set": True}, "allowed": ["*"]}
    assert "pw1" not in repr(red) and "TOKEN" not in repr(red)
    back = config.unredact(red, doc)
    assert back == doc


def test_parsing_is_pure_given_the_gathered_facts(tmp_path):
    """parse_document reads nothing: what it needs from outside comes in the Facts."""
    from smtprelay.config import Facts, gather, parse_document
    from smtprelay.config.secrets import KEYPAIR_MISMATCH, SecretFile

    doc = {"provider": {"type": "smtp", "host": "mail.example.com", "username": "u",
                        "password": {"file": "pw"}, "ca_file": "ca.pem"},
           "admin": {"token": {"env": "RELAY_TOKEN"}},
           "smtp": {"hostname": "", "tls_certificate": "c.pem", "tls_key": "k.pem"}}
    base = str(tmp_path / "nowhere")
    path = lambda name: str(tmp_path / "nowhere" / name)  # noqa: E731
    facts = Facts(base_dir=base, environ={"RELAY_TOKEN": "tok"},
                  files={path("pw"): SecretFile("from-the-facts\n")},
                  access={path("ca.pem"): "", path("c.pem"): "", path("k.pem"): ""},
                  keypairs={(path("c.pem"), path("k.pem")): KEYPAIR_MISMATCH},
                  fqdn="gathered.example.com")
    with pytest.raises(ConfigError) as info:
        parse_document(doc, facts)
    assert [str(p) for p in info.value.problems] == [
        "smtp.tls_certificate: smtp.tls_key does not belong to this certificate"]
    del doc["smtp"]["tls_certificate"], doc["smtp"]["tls_key"]
    c = parse_document(doc, facts)
    assert c.provider.password.reveal() == "from-the-facts"
    assert c.admin.token.reveal() == "tok" and c.smtp.hostname == "gathered.example.com"
    assert c.provider.ca_file == path("ca.pem")
    # gathering looks only where the document points, and only at the variables it names
    (tmp_path / "pw").write_text("from-a-file\n")
    gathered = gather(doc, tmp_path, {"RELAY_TOKEN": "t", "OTHER": "o"})
    assert gathered.environ == {"RELAY_TOKEN": "t"}
    assert set(gathered.files) == {str(tmp_path / "pw")}
    assert gathered.files[str(tmp_path / "pw")].text == "from-a-file\n"
    assert gathered.access == {str(tmp_path / "ca.pem"): "no such file"}
    assert "from-a-file" not in repr(gathered)
