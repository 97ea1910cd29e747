"""Configuration over the admin API, against the real relay and its real file.

GET redacts every secret; PUT is validated as at start-up, written back with
the administrator's comments, applied without a restart (listeners rebound,
provider rebuilt), and when it cannot be applied the old configuration keeps
running and the file is not touched.
"""

import importlib.util
import smtplib
import socket
import threading
import tomllib

import pytest
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from smtprelay import config as configuration
from smtprelay.admin.api import AdminAPI, ApiError
from smtprelay.config import secrets as config_secrets
from smtprelay.passwords import hash_password
from tests.admin_client import AdminClient
from tests.relay import RelayProcess

pytestmark = pytest.mark.slow

TOKEN = "config-test-token-7"
ENV_PASSWORD = "env-password-for-scanner-1"
FILE_PASSWORD = "file-password-for-printer-2"
LITERAL_PASSWORD = "literal-password-for-app-3"
HASHED_PASSWORD = "hashed-password-for-erp-4"


def commented_file(directory, smtp_port=0, admin_port=0):
    """A relay.toml as an administrator writes one: comments, secrets of every form."""
    (directory / "printer.secret").write_text(FILE_PASSWORD + "\n")
    users = (f'users = {{ app = "{LITERAL_PASSWORD}", scanner = {{ env = "SCANNER_PW" }}, '
             f'printer = {{ file = "printer.secret" }}, '
             f'erp = {{ password = "{hash_password(HASHED_PASSWORD.encode(), ln=4)}", '
             f'allowed = ["@example.com"] }} }}')
    return f"""\
# relay.toml of the test relay -- kept by hand, edited by the admin page
[smtp]
listen = "127.0.0.1:{smtp_port}"        # where the printers send
hostname = "relay.test"
idle_timeout = "30s"                    # printers are slow

[smtp.auth]
# the four users, one of each kind
{users}

[sender]
default = "relay@example.com"           # test mail comes from here
allowed = ["*"]

[provider]
type = "outbox"
directory = "{directory / 'outbox'}"   # nothing leaves

[delivery]
retry = ["1s", "2s"]

[database]
url = "sqlite:///{directory / 'relay.db'}"

[admin]
listen = "127.0.0.1:{admin_port}"
token = {{ env = "ADMIN_TOKEN" }}       # from the unit file
"""


class FileRelay(RelayProcess):
    """A RelayProcess that runs the file as written here, not one made from a dict."""

    def __init__(self, directory, text):
        super().__init__(directory, env={"SCANNER_PW": ENV_PASSWORD, "ADMIN_TOKEN": TOKEN})
        self.text = text
        doc = tomllib.loads(text)
        self.config = doc

    def write_config(self):
        if not self.config_path.exists():
            self.config_path.write_text(self.text)


@pytest.fixture
def relay(tmp_path):
    r = FileRelay(tmp_path, commented_file(tmp_path))
    r.start()
    yield r
    r.stop()


@pytest.fixture
def client(relay):
    return AdminClient(relay.admin_port, TOKEN)


def smtp_login(port, user, password):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.login(user, password)
        s.sendmail("app@example.com", ["x@example.org"], f"Subject: from {user}\r\n\r\nhi\r\n")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def accepts(port):
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            return s.noop()[0] == 250
    except (ConnectionRefusedError, smtplib.SMTPConnectError):
        return False


SECRETS = (TOKEN, ENV_PASSWORD, FILE_PASSWORD, LITERAL_PASSWORD)


def test_get_redacts_every_secret(relay, client):
    cfg = client.ok("GET", "/api/config")
    users = cfg["smtp"]["auth"]["users"]
    assert users["app"] == {"set": True}
    assert users["scanner"] == {"set": True}
    assert users["printer"] == {"set": True}
    assert users["erp"] == {"password": {"set": True}, "allowed": ["@example.com"]}
    assert cfg["admin"]["token"] == {"set": True}
    assert cfg["smtp"]["listen"] == "127.0.0.1:0"
    assert cfg["sender"]["default"] == "relay@example.com"
    text = client.get("/api/config").text
    for secret in SECRETS + ("$scrypt$", "SCANNER_PW", "printer.secret", "ADMIN_TOKEN"):
        assert secret not in text


def test_put_of_what_get_gave_changes_nothing(relay, client):
    before = relay.config_path.read_bytes()
    cfg = client.ok("GET", "/api/config")
    assert client.ok("PUT", "/api/config", cfg) == cfg
    assert relay.config_path.read_bytes() == before
    assert client.ok("GET", "/api/config") == cfg
    assert accepts(relay.port)


def test_put_keeps_secrets_given_as_set_and_the_comments(relay, client):
    cfg = client.ok("GET", "/api/config")
    cfg["smtp"]["idle_timeout"] = "45s"
    cfg["sender"]["allowed"] = ["@example.com", "*@example.org"]
    cfg["smtp"]["auth"]["users"]["erp"]["allowed"] = ["@example.com", "@example.net"]
    new = client.ok("PUT", "/api/config", cfg)
    assert new == cfg
    text = relay.config_path.read_text()
    for comment in ("# relay.toml of the test relay -- kept by hand",
                    "# the four users, one of each kind", "# where the printers send",
                    "# test mail comes from here", "# nothing leaves", "# from the unit file"):
        assert comment in text, comment
    assert 'idle_timeout = "45s"                    # printers are slow' in text
    doc = tomllib.loads(text)
    users = doc["smtp"]["auth"]["users"]
    assert users["app"] == LITERAL_PASSWORD
    assert users["scanner"] == {"env": "SCANNER_PW"}
    assert users["printer"] == {"file": "printer.secret"}
    assert users["erp"]["password"].startswith("$scrypt$")
    assert users["erp"]["allowed"] == ["@example.com", "@example.net"]
    assert doc["admin"]["token"] == {"env": "ADMIN_TOKEN"}
    # every credential still works, without a restart
    smtp_login(relay.port, "app", LITERAL_PASSWORD)
    smtp_login(relay.port, "scanner", ENV_PASSWORD)
    smtp_login(relay.port, "printer", FILE_PASSWORD)
    assert client.get("/api/status").status == 200


def test_put_changes_users_and_the_token_at_once(relay, client):
    cfg = client.ok("GET", "/api/config")
    hashed = client.ok("POST", "/api/users/hash-password", {"password": "new-user-pass-5"})["hash"]
    assert hashed.startswith("$scrypt$") and "new-user-pass-5" not in hashed
    cfg["smtp"]["auth"]["users"]["newbie"] = hashed
    del cfg["smtp"]["auth"]["users"]["app"]
    cfg["smtp"]["auth"]["users"]["scanner"] = {"password": {"set": True},
                                               "allowed": ["@example.com"]}
    cfg["admin"]["token"] = "a-brand-new-token-6"
    client.ok("PUT", "/api/config", cfg)
    assert client.get("/api/status").status == 401
    assert client.get("/api/status", token="a-brand-new-token-6").status == 200
    smtp_login(relay.port, "newbie", "new-user-pass-5")
    with pytest.raises(smtplib.SMTPAuthenticationError):
        smtp_login(relay.port, "app", LITERAL_PASSWORD)
    smtp_login(relay.port, "scanner", ENV_PASSWORD)  # its password followed it into a table
    doc = tomllib.loads(relay.config_path.read_text())
    assert doc["smtp"]["auth"]["users"]["scanner"] == {"password": {"env": "SCANNER_PW"},
                                                       "allowed": ["@example.com"]}
    assert doc["admin"]["token"] == "a-brand-new-token-6"


@pytest.mark.parametrize("change,field", [
    (lambda c: c["smtp"].update(listen="127.0.0.1:99999"), "smtp.listen"),
    (lambda c: c["smtp"].update(max_recipients="many"), "smtp.max_recipients"),
    (lambda c: c["smtp"].update(colour="blue"), "smtp.colour"),
    (lambda c: c["provider"].update(type="smtp", port=99999, host="mail.example.com"),
     "provider.port"),
    (lambda c: c["provider"].update(type="m365"), "provider.tenant_id"),
    (lambda c: c["sender"].update(default="not an address"), "sender.default"),
    (lambda c: c["smtp"]["auth"].update(required=True, users={}), "smtp.auth.required"),
    (lambda c: c["smtp"]["auth"]["users"].update(ghost={"set": True}), "smtp.auth.users.ghost"),
    (lambda c: c["admin"].update(listen="0.0.0.0:8025", token={"set": False}), "admin.token"),
    (lambda c: c["database"].update(url="sqlite:///elsewhere.db"), "database.url"),
])
def test_put_invalid_names_the_field_and_changes_nothing(relay, client, change, field):
    before = relay.config_path.read_bytes()
    cfg = client.ok("GET", "/api/config")
    change(cfg)
    a = client.put("/api/config", cfg)
    assert a.status == 400, a
    assert field in a.json["fields"], a.json
    assert a.json["error"]
    assert relay.config_path.read_bytes() == before
    assert client.ok("GET", "/api/config")["smtp"]["listen"] == "127.0.0.1:0"
    assert accepts(relay.port)


def test_put_with_a_port_in_use_keeps_the_old_configuration(relay, client):
    before = relay.config_path.read_bytes()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        cfg = client.ok("GET", "/api/config")
        cfg["smtp"]["listen"] = f"127.0.0.1:{busy.getsockname()[1]}"
        cfg["sender"]["default"] = "changed@example.com"
        a = client.put("/api/config", cfg)
    finally:
        busy.close()
    assert a.status == 400, a
    assert "Address already in use" in a.json["fields"]["smtp.listen"]
    assert relay.config_path.read_bytes() == before
    status = client.ok("GET", "/api/status")
    assert status["listen"] == [f"127.0.0.1:{relay.port}"]
    assert status["provider"]["sender_default"] == "relay@example.com"
    assert accepts(relay.port)
    assert "configuration applied" not in relay.log()


def test_put_rebinds_listeners_and_rebuilds_the_provider(relay, client, tmp_path):
    old_port = relay.port
    new_port = free_port()
    cfg = client.ok("GET", "/api/config")
    cfg["smtp"]["listen"] = [f"127.0.0.1:{new_port}", "127.0.0.1:0"]
    cfg["provider"]["directory"] = str(tmp_path / "second-outbox")
    cfg["sender"]["default"] = "second@example.com"
    client.ok("PUT", "/api/config", cfg)
    status = client.ok("GET", "/api/status")
    # the listener that did not change ("127.0.0.1:0") is kept as it was
    assert status["listen"] == [f"127.0.0.1:{new_port}", f"127.0.0.1:{old_port}"]
    assert status["provider"]["sender_default"] == "second@example.com"
    smtp_login(new_port, "app", LITERAL_PASSWORD)
    smtp_login(old_port, "app", LITERAL_PASSWORD)
    relay.wait_status(relay.query("SELECT id FROM messages ORDER BY id DESC LIMIT 1")[0][0],
                      ("sent",))
    assert len(list((tmp_path / "second-outbox" / "new").iterdir())) == 2
    assert client.ok("POST", "/api/test-mail", {"to": "x@example.org"})["ok"]
    assert len(list((tmp_path / "second-outbox" / "new").iterdir())) == 3
    # a listener dropped from the list closes
    cfg["smtp"]["listen"] = f"127.0.0.1:{new_port}"
    client.ok("PUT", "/api/config", cfg)
    assert client.ok("GET", "/api/status")["listen"] == [f"127.0.0.1:{new_port}"]
    assert not accepts(old_port)
    # the file says the same, and a restart runs it
    doc = tomllib.loads(relay.config_path.read_text())
    assert doc["smtp"]["listen"] == f"127.0.0.1:{new_port}"
    relay.restart()
    assert relay.smtp_ports[0] == new_port
    assert AdminClient(relay.admin_port, TOKEN).ok("GET", "/api/status")["provider"][
        "sender_default"] == "second@example.com"


def test_put_moves_the_admin_listener(relay, client):
    new_port = free_port()
    cfg = client.ok("GET", "/api/config")
    cfg["admin"]["listen"] = f"127.0.0.1:{new_port}"
    assert client.ok("PUT", "/api/config", cfg)["admin"]["listen"] == f"127.0.0.1:{new_port}"
    moved = AdminClient(new_port, TOKEN)
    assert moved.ok("GET", "/api/status")["admin_listen"] == f"127.0.0.1:{new_port}"
    with pytest.raises(ConnectionRefusedError):
        client.get("/api/status")


def test_put_a_provider_this_installation_lacks(relay, client):
    before = relay.config_path.read_bytes()
    cfg = client.ok("GET", "/api/config")
    cfg["provider"] = {"type": "smtp", "host": "127.0.0.1", "port": 2, "security": "none",
                       "username": "u", "password": "upstream-secret-8"}
    a = client.put("/api/config", cfg)
    if importlib.util.find_spec("smtprelay.providers.smtp") is None:
        assert a.status == 409 and "not available" in a.json["error"]
        assert relay.config_path.read_bytes() == before
        assert client.ok("GET", "/api/status")["provider"]["type"] == "outbox"
    else:
        assert a.status == 200
        assert a.json["provider"]["password"] == {"set": True}
        assert client.ok("GET", "/api/status")["provider"]["type"] == "smtp"
    assert "upstream-secret-8" not in a.text and "upstream-secret-8" not in relay.log()


def test_the_relay_refuses_a_put_without_its_file(relay, client):
    relay.config_path.unlink()
    cfg = client.ok("GET", "/api/config")
    cfg["smtp"]["idle_timeout"] = "50s"
    a = client.put("/api/config", cfg)
    assert a.status == 409 and "cannot write the configuration file" in a.json["error"]
    assert not relay.config_path.exists()
    assert client.ok("GET", "/api/config")["smtp"]["idle_timeout"] == "30s"


def tls_handshake(port, ca, maximum=None):
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca.ca_path))
    if maximum:
        ctx.maximum_version = maximum
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.recv(100)


def test_put_rebinds_a_listener_whose_address_the_old_one_holds(tmp_path, ca):
    """127.0.0.1:P -> 0.0.0.0:P: the new socket can only bind once the old one is closed;
    and a TLS setting changed rebinds the implicit-TLS listener on the same port."""
    import ssl

    port, tls_port = free_port(), free_port()
    r = RelayProcess(tmp_path / "r", {
        "admin": {"listen": "127.0.0.1:0", "token": TOKEN},
        "smtp": {"listen": f"127.0.0.1:{port}", "tls_listen": [f"127.0.0.1:{tls_port}"],
                 "tls_certificate": str(ca.server_cert), "tls_key": str(ca.server_key),
                 "allowed_networks": ["127.0.0.0/8"]},
    })
    r.start()
    try:
        client = AdminClient(r.admin_port, TOKEN)
        assert tls_handshake(tls_port, ca, ssl.TLSVersion.TLSv1_2).startswith(b"220 ")
        cfg = client.ok("GET", "/api/config")
        cfg["smtp"]["listen"] = f"0.0.0.0:{port}"
        cfg["smtp"]["tls_minimum_version"] = "1.3"
        client.ok("PUT", "/api/config", cfg)
        assert client.ok("GET", "/api/status")["listen"] == [f"0.0.0.0:{port}",
                                                             f"127.0.0.1:{tls_port}"]
        assert accepts(port)
        assert tls_handshake(tls_port, ca).startswith(b"220 ")
        with pytest.raises(ssl.SSLError):
            tls_handshake(tls_port, ca, ssl.TLSVersion.TLSv1_2)
    finally:
        r.stop()


def test_put_with_a_new_file_secret(relay, client, tmp_path):
    (tmp_path / "newcomer.secret").write_text("newcomer-file-password-9\n")
    cfg = client.ok("GET", "/api/config")
    cfg["smtp"]["auth"]["users"]["newcomer"] = {"file": "newcomer.secret"}
    answer = client.ok("PUT", "/api/config", cfg)
    assert answer["smtp"]["auth"]["users"]["newcomer"] == {"set": True}
    smtp_login(relay.port, "newcomer", "newcomer-file-password-9")
    doc = tomllib.loads(relay.config_path.read_text())
    assert doc["smtp"]["auth"]["users"]["newcomer"] == {"file": "newcomer.secret"}
    cfg["smtp"]["auth"]["users"]["newcomer"] = {"file": "missing.secret"}
    a = client.put("/api/config", cfg)
    assert a.status == 400
    assert a.json["fields"]["smtp.auth.users.newcomer"].startswith("cannot read secret file ")


# --- in-process: where the gathering runs ----------------------------------------------


class ThreadPool:
    """Runs each call in a thread of its own (joined at once) and says which thread."""

    def __init__(self):
        self.threads = []

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        outcome = []

        def run():
            self.threads.append(threading.get_ident())
            try:
                outcome.append((True, f(*args, **kwargs)))
            except BaseException:
                outcome.append((False, Failure()))

        t = threading.Thread(target=run)
        t.start()
        t.join()
        on_result(*outcome[0])


class Reactor:
    def __init__(self):
        self.pool = ThreadPool()

    def getThreadPool(self):
        return self.pool

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class Relay:
    """What ``_put_config`` uses of the RelayService: config, reactor, reconfigure."""

    def __init__(self, config):
        self.config = config
        self.reactor = Reactor()
        self.applied = []

    def reconfigure(self, new, pending):
        pending.commit()
        self.config = new
        self.applied.append(new)
        return None


@pytest.fixture
def reads(monkeypatch):
    """The threads secret files were read in."""
    threads = []
    read = config_secrets._read_secret_file

    def recording(path):
        threads.append(threading.get_ident())
        return read(path)

    monkeypatch.setattr(config_secrets, "_read_secret_file", recording)
    return threads


def put(api, document):
    d = api._put_config(DummyRequest([b"api", b"config"]), document)
    results = []
    d.addBoth(results.append)
    assert results, "the PUT did not finish"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def test_put_gathers_file_secrets_in_a_thread_and_parses_on_the_reactor(tmp_path, reads):
    (tmp_path / "alice.secret").write_text("alice-file-password-10\n")
    (tmp_path / "relay.toml").write_text(
        '[smtp]\nlisten = "127.0.0.1:0"\n\n[admin]\nlisten = ""\n')
    relay = Relay(configuration.load(tmp_path / "relay.toml"))
    api = AdminAPI(relay, clock=None)
    document = configuration.redact(relay.config.document)
    document["smtp"]["auth"] = {"users": {"alice": {"file": "alice.secret"}}}
    put(api, document)
    (new,) = relay.applied
    assert new.smtp.auth.users["alice"].password.reveal() == "alice-file-password-10"
    assert reads and threading.get_ident() not in reads
    assert set(reads) <= set(relay.reactor.pool.threads)
    assert tomllib.loads((tmp_path / "relay.toml").read_text())["smtp"]["auth"] == {
        "users": {"alice": {"file": "alice.secret"}}}
    # an unreadable one is a problem of its key, found in the thread too
    document["smtp"]["auth"] = {"users": {"alice": {"file": "gone.secret"}}}
    reads.clear()
    with pytest.raises(ApiError) as info:
        put(api, document)
    assert info.value.code == 400
    assert info.value.fields == {"smtp.auth.users.alice": (
        f"cannot read secret file {tmp_path / 'gone.secret'}: No such file or directory")}
    assert reads and threading.get_ident() not in reads
