"""The configuration: relay.toml parsed into frozen attrs classes, one problem list.

``load(path)`` reads a file; ``parse(document, base_dir)`` validates a document
(the same shape as the TOML, as the admin API's ``PUT /api/config`` sends it).
Every problem is a :class:`Problem` naming its dotted key; :class:`ConfigError`
carries all of them, so that start-up and ``check-config`` print one line each.

Secrets (``{env = ...}``, ``{file = ...}`` or a literal) become :class:`Secret`
objects whose ``repr`` never shows the value.  ``SECRET_KEYS`` and
:func:`redact` are what the admin API uses to show ``{"set": true}`` instead.
"""

import datetime
import ipaddress
import os
import socket
import tomllib
from pathlib import Path

import attr

from smtprelay import policy, units
from smtprelay.passwords import PasswordHash, is_password_hash

# ---------------------------------------------------------------------------
# values


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` says why, one key each."""

    def __init__(self, problems, source="relay.toml"):
        self.problems = list(problems)
        self.source = source
        super().__init__("\n".join(self.lines()))

    def lines(self):
        return [f"{self.source}: {p}" for p in self.problems]

    def fields(self):
        """``{dotted.key: problem}`` for an API answer."""
        out = {}
        for p in self.problems:
            out.setdefault(p.key, p.message)
        return out


@attr.frozen
class Problem:
    key: str
    message: str

    def __str__(self):
        return f"{self.key}: {self.message}" if self.key else self.message


@attr.frozen(repr=False)
class Secret:
    """A secret and where it came from; the value never reaches ``repr``/``str``."""

    source: str  # "literal" | "env" | "file"
    ref: str | None = None  # the variable name or the file path
    value: str = attr.field(default="", eq=False)

    def __repr__(self):
        where = f" {self.ref}" if self.ref else ""
        return f"<Secret from {self.source}{where}>"

    __str__ = __repr__

    def reveal(self):
        return self.value

    def bytes(self):
        return self.value.encode("utf-8")


@attr.frozen
class ListenAddress:
    host: str
    port: int

    def __str__(self):
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self):
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def interface(self):
        """The address for ``listenTCP``'s ``interface``: "" listens on all of IPv4."""
        return self.host


@attr.frozen
class User:
    name: str
    password: object  # PasswordHash | Secret (the plain password)
    allowed: policy.SenderPatterns | None = None


@attr.frozen
class AuthConfig:
    required: bool = False
    allow_plaintext: bool = False
    max_failures: int = 5
    lockout: float = 900.0
    users: dict = attr.field(factory=dict)  # name -> User


@attr.frozen
class SMTPConfig:
    listen: tuple = (ListenAddress("127.0.0.1", 2525),)
    tls_listen: tuple = ()
    hostname: str = ""
    max_message_size: int = 35_000_000
    max_recipients: int = 500
    max_connections: int = 200
    max_connections_per_address: int = 50
    idle_timeout: float = 300.0
    stress_timeout: float = 10.0
    allowed_networks: tuple = ()
    tls_certificate: str = ""
    tls_key: str = ""
    tls_minimum_version: str = "1.2"
    bare_newlines: str = "normalize"
    max_line_length: int = 65536
    open_relay: bool = False
    max_errors: int = 20
    shutdown_grace: float = 30.0
    auth: AuthConfig = attr.field(factory=AuthConfig)

    @property
    def tls_enabled(self):
        return bool(self.tls_certificate and self.tls_key)


@attr.frozen
class SenderConfig:
    default: str = ""
    allowed: policy.SenderPatterns = attr.field(factory=lambda: policy.SenderPatterns(()))
    on_disallowed: str = "reject"
    check_header_from: bool = True

    @property
    def policy(self):
        return policy.SenderPolicy(self.default, self.allowed)


@attr.frozen
class OutboxProvider:
    type = "outbox"
    directory: str = "var/outbox"


@attr.frozen
class M365Provider:
    type = "m365"
    tenant_id: str = ""
    client_id: str = ""
    client_secret: Secret | None = None
    client_secret_expires: datetime.date | None = None
    certificate: str = ""
    certificate_key: str = ""
    save_to_sent_items: bool = False
    authority: str = "https://login.microsoftonline.com"
    graph_endpoint: str = "https://graph.microsoft.com"
    ca_file: str = ""
    timeout: float = 60.0


@attr.frozen
class GmailProvider:
    type = "gmail"
    service_account_file: str = ""
    client_id: str = ""
    client_secret: Secret | None = None
    refresh_token: Secret | None = None
    token_uri: str = "https://oauth2.googleapis.com/token"
    api_endpoint: str = "https://gmail.googleapis.com"
    ca_file: str = ""
    timeout: float = 60.0


@attr.frozen
class SMTPProvider:
    type = "smtp"
    host: str = ""
    port: int = 587
    security: str = "starttls"
    username: str = ""
    password: Secret | None = None
    verify_certificate: bool = True
    ca_file: str = ""
    timeout: float = 60.0


@attr.frozen
class DeliveryConfig:
    mode: str = "queue"
    retry: tuple = (60.0, 300.0, 900.0, 3600.0, 14400.0)
    max_age: float = 5 * 86400.0
    concurrency: int = 4
    direct_timeout: float = 60.0
    lease: float = 300.0


@attr.frozen
class DatabaseConfig:
    url: str = "sqlite:///var/relay.db"
    retention: float = 90 * 86400.0

    @property
    def kind(self):
        return "postgresql" if self.url.startswith(("postgresql:", "postgres:")) else "sqlite"

    @property
    def sqlite_path(self):
        return self.url[len("sqlite:///"):]


@attr.frozen
class AdminConfig:
    listen: ListenAddress | None = ListenAddress("127.0.0.1", 8025)
    token: Secret | None = None


@attr.frozen
class MonitoringConfig:
    secret_warning_days: int = 30


@attr.frozen
class Config:
    smtp: SMTPConfig = attr.field(factory=SMTPConfig)
    sender: SenderConfig = attr.field(factory=SenderConfig)
    provider: object = attr.field(factory=OutboxProvider)
    delivery: DeliveryConfig = attr.field(factory=DeliveryConfig)
    database: DatabaseConfig = attr.field(factory=DatabaseConfig)
    admin: AdminConfig = attr.field(factory=AdminConfig)
    monitoring: MonitoringConfig = attr.field(factory=MonitoringConfig)
    # where it came from: relative paths above are already resolved against it
    path: str | None = attr.field(default=None, eq=False)
    document: dict = attr.field(factory=dict, eq=False, repr=False)

    def secrets(self):
        """Every secret value this configuration holds (for leak checks)."""
        out = []
        for s in _walk_secrets(self):
            if s.value:
                out.append(s.value)
        return out


def _walk_secrets(obj):
    if isinstance(obj, Secret):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _walk_secrets(v)
    elif attr.has(type(obj)):
        for a in attr.fields(type(obj)):
            if a.name != "document":
                yield from _walk_secrets(getattr(obj, a.name))


# ---------------------------------------------------------------------------
# reading a document

# secret keys: the admin API redacts these; "*" is any user name
SECRET_KEYS = (
    "provider.client_secret",
    "provider.password",
    "provider.refresh_token",
    "admin.token",
    "smtp.auth.users.*",
    "smtp.auth.users.*.password",
)

_MISSING = object()


class _Table:
    """One TOML table being read: typed getters, problems, unknown keys."""

    def __init__(self, reader, prefix, data):
        self.reader = reader
        self.prefix = prefix
        if data is not _MISSING and not isinstance(data, dict):
            reader.problem(prefix, "must be a table")
            data = {}
        self.data = {} if data is _MISSING else data
        self.seen = set()

    def key(self, name):
        return f"{self.prefix}.{name}" if self.prefix else name

    def has(self, name):
        return name in self.data

    def raw(self, name, default=_MISSING):
        self.seen.add(name)
        return self.data.get(name, default)

    def problem(self, name, message):
        self.reader.problem(self.key(name), message)

    def get(self, name, kind, default, check=None):
        value = self.raw(name)
        if value is _MISSING:
            return default
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            names = {str: "a string", bool: "true or false", int: "an integer",
                     float: "a number", list: "a list"}
            self.problem(name, f"must be {names.get(kind, kind.__name__)}")
            return default
        if check is not None:
            message = check(value)
            if message:
                self.problem(name, message)
                return default
        return value

    def string(self, name, default="", choices=None):
        def one_of(v):
            if v not in choices:
                return "must be one of " + ", ".join(f'"{c}"' for c in choices)

        return self.get(name, str, default, one_of if choices else None)

    def boolean(self, name, default):
        return self.get(name, bool, default)

    def integer(self, name, default, minimum=None, maximum=None):
        def check(v):
            if minimum is not None and v < minimum:
                return f"must be at least {minimum}"
            if maximum is not None and v > maximum:
                return f"must be at most {maximum}"
        return self.get(name, int, default, check)

    def duration(self, name, default, minimum=0.0):
        value = self.raw(name)
        if value is _MISSING:
            return default
        try:
            seconds = units.parse_duration(value)
        except ValueError as e:
            self.problem(name, str(e))
            return default
        if seconds < minimum:
            self.problem(name, f"must be at least {units.format_duration(minimum)}")
            return default
        return seconds

    def size(self, name, default, minimum=1):
        value = self.raw(name)
        if value is _MISSING:
            return default
        try:
            n = units.parse_size(value)
        except ValueError as e:
            self.problem(name, str(e))
            return default
        if n < minimum:
            self.problem(name, f"must be at least {minimum} bytes")
            return default
        return n

    def string_list(self, name, default=()):
        value = self.raw(name)
        if value is _MISSING:
            return tuple(default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(name, "must be a list of strings")
            return tuple(default)
        return tuple(value)

    def path(self, name, default=""):
        value = self.string(name, default)
        return self.reader.resolve(value) if value else ""

    def secret(self, name):
        value = self.raw(name)
        if value is _MISSING or value == "":
            return None
        return self.reader.secret(self.key(name), value)

    def table(self, name):
        return _Table(self.reader, self.key(name), self.raw(name))

    def finish(self, allowed_elsewhere=(), elsewhere_note=""):
        for name in self.data:
            if name in self.seen:
                continue
            if name in allowed_elsewhere:
                self.problem(name, elsewhere_note)
            else:
                self.problem(name, "unknown key")


class _Reader:
    def __init__(self, base_dir, environ):
        self.base_dir = Path(base_dir)
        self.environ = environ
        self.problems = []

    def problem(self, key, message):
        self.problems.append(Problem(key, message))

    def resolve(self, path):
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else (self.base_dir / p))

    def secret(self, key, value):
        if isinstance(value, str):
            return Secret("literal", None, value)
        if isinstance(value, dict) and len(value) == 1:
            (kind, ref), = value.items()
            if kind == "env" and isinstance(ref, str):
                if ref not in self.environ:
                    self.problem(key, f"environment variable {ref} is not set")
                    return Secret("env", ref, "")
                return Secret("env", ref, self.environ[ref])
            if kind == "file" and isinstance(ref, str):
                path = self.resolve(ref)
                try:
                    text = Path(path).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as e:
                    self.problem(key, f"cannot read secret file {path}: {_os_reason(e)}")
                    return Secret("file", ref, "")
                return Secret("file", ref, text.rstrip("\r\n"))
        self.problem(key, 'a secret is a string, { env = "NAME" } or { file = "PATH" }')
        return None


def _os_reason(e):
    return e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__


def parse_listen(text):
    """``"host:port"`` or ``"[v6]:port"`` -> ListenAddress; ValueError otherwise."""
    if not isinstance(text, str) or not text:
        raise ValueError('expected "host:port"')
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f'"{text}" is not "[address]:port"')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f'"{host}" is not an IPv6 address') from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f'"{text}" has no port; write "host:port"')
        if ":" in host:
            raise ValueError(f'"{text}": write an IPv6 address in brackets, "[::1]:2525"')
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f'"{text}": the port must be a number from 0 to 65535')
    return ListenAddress(host, int(port))


def _listens(table, name, default):
    value = table.raw(name)
    if value is _MISSING:
        return default
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        table.problem(name, 'must be "host:port" or a list of them')
        return default
    out = []
    for item in items:
        try:
            out.append(parse_listen(item))
        except ValueError as e:
            table.problem(name, str(e))
    return tuple(out)


def _networks(table, name):
    out = []
    for text in table.string_list(name):
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            table.problem(name, f'"{text}" is not a network; write e.g. "10.0.0.0/8"')
    return tuple(out)


def _patterns(table, name):
    values = table.string_list(name)
    try:
        return policy.SenderPatterns.parse(values)
    except ValueError as e:
        table.problem(name, str(e))
        return policy.SenderPatterns(())


def _address(table, name):
    value = table.string(name, "")
    if value and not policy.is_mailbox(value):
        table.problem(name, f'"{value}" is not an e-mail address')
        return ""
    return value


def _url(table, name, default):
    value = table.string(name, default)
    if value and not value.startswith("https://"):
        table.problem(name, "must be an https:// URL")
        return default
    return value.rstrip("/")


def _readable(reader, key, path):
    if path and not os.access(path, os.R_OK):
        reason = "no such file" if not os.path.exists(path) else "not readable"
        reader.problem(key, f"cannot read {path}: {reason}")
        return False
    return bool(path)


# --- sections ------------------------------------------------------------


def _smtp(reader, t):
    auth_t = t.table("auth")
    listen = _listens(t, "listen", (ListenAddress("127.0.0.1", 2525),))
    tls_listen = _listens(t, "tls_listen", ())
    hostname = t.string("hostname", "") or socket.getfqdn()
    cert = t.path("tls_certificate")
    key = t.path("tls_key")
    if key and not cert:
        t.problem("tls_key", "set without smtp.tls_certificate")
    if cert and not key:
        t.problem("tls_certificate", "set without smtp.tls_key")
    if tls_listen and not (cert and key):
        t.problem("tls_listen", "needs smtp.tls_certificate and smtp.tls_key")
    if cert and key:
        ok = _readable(reader, t.key("tls_certificate"), cert)
        ok = _readable(reader, t.key("tls_key"), key) and ok
        if ok:
            _check_keypair(reader, t.key("tls_certificate"), cert, key)
    smtp = SMTPConfig(
        listen=listen,
        tls_listen=tls_listen,
        hostname=hostname,
        max_message_size=t.size("max_message_size", 35_000_000),
        max_recipients=t.integer("max_recipients", 500, minimum=1),
        max_connections=t.integer("max_connections", 200, minimum=1),
        max_connections_per_address=t.integer("max_connections_per_address", 50, minimum=1),
        idle_timeout=t.duration("idle_timeout", 300.0, minimum=1.0),
        stress_timeout=t.duration("stress_timeout", 10.0, minimum=1.0),
        allowed_networks=_networks(t, "allowed_networks"),
        tls_certificate=cert,
        tls_key=key,
        tls_minimum_version=t.string("tls_minimum_version", "1.2",
                                     choices=("1.0", "1.1", "1.2", "1.3")),
        bare_newlines=t.string("bare_newlines", "normalize", choices=("normalize", "reject")),
        max_line_length=t.integer("max_line_length", 65536, minimum=1000),
        open_relay=t.boolean("open_relay", False),
        max_errors=t.integer("max_errors", 20, minimum=1),
        shutdown_grace=t.duration("shutdown_grace", 30.0),
        auth=_auth(reader, auth_t),
    )
    t.finish()
    if not smtp.listen and not smtp.tls_listen:
        t.problem("listen", "no listener: set smtp.listen or smtp.tls_listen")
    return smtp


def _check_keypair(reader, key, cert_path, key_path):
    from OpenSSL import SSL

    ctx = SSL.Context(SSL.TLS_METHOD)
    try:
        ctx.use_certificate_chain_file(cert_path.encode())
    except SSL.Error:
        reader.problem(key, f"{cert_path} is not a PEM certificate")
        return
    try:
        ctx.use_privatekey_file(key_path.encode())
        ctx.check_privatekey()
    except SSL.Error as e:
        if "mismatch" in str(e):
            reader.problem(key, "smtp.tls_key does not belong to this certificate")
        else:
            reader.problem("smtp.tls_key", f"{key_path} is not a PEM private key")


def _auth(reader, t):
    users_t = t.table("users")
    users = {}
    for name in list(users_t.data):
        users_t.seen.add(name)
        value = users_t.data[name]
        ukey = users_t.key(name)
        allowed = None
        if isinstance(value, dict) and ("password" in value or "allowed" in value):
            ut = _Table(reader, ukey, value)
            pw = ut.raw("password")
            if pw is _MISSING:
                ut.problem("password", "required")
                pw = None
            else:
                pw = _password(reader, ut.key("password"), pw)
            if ut.has("allowed"):
                allowed = _patterns(ut, "allowed")
            ut.finish()
        else:
            pw = _password(reader, ukey, value)
        if pw is not None:
            users[name] = User(name, pw, allowed)
    auth = AuthConfig(
        required=t.boolean("required", False),
        allow_plaintext=t.boolean("allow_plaintext", False),
        max_failures=t.integer("max_failures", 5, minimum=1),
        lockout=t.duration("lockout", 900.0),
        users=users,
    )
    t.finish()
    if auth.required and not users:
        t.problem("required", "true but smtp.auth.users is empty: nobody could send")
    return auth


def _password(reader, key, value):
    if isinstance(value, str) and is_password_hash(value):
        try:
            return PasswordHash.parse(value)
        except ValueError as e:
            reader.problem(key, str(e))
            return None
    secret = reader.secret(key, value)
    if secret is not None and secret.source != "literal" and not secret.value and not any(
        p.key == key for p in reader.problems
    ):
        reader.problem(key, "the password is empty")
    if secret is not None and secret.source == "literal" and not secret.value:
        reader.problem(key, "the password is empty")
        return None
    return secret


def _sender(t):
    default = _address(t, "default")
    s = SenderConfig(
        default=default,
        allowed=_patterns(t, "allowed"),
        on_disallowed=t.string("on_disallowed", "reject", choices=("reject", "rewrite")),
        check_header_from=t.boolean("check_header_from", True),
    )
    if s.on_disallowed == "rewrite" and not s.default:
        t.problem("on_disallowed", '"rewrite" needs sender.default')
    t.finish()
    return s


_PROVIDER_KEYS = {
    "m365": {"tenant_id", "client_id", "client_secret", "client_secret_expires",
             "certificate", "certificate_key", "save_to_sent_items", "authority",
             "graph_endpoint", "ca_file", "timeout"},
    "gmail": {"service_account_file", "client_id", "client_secret", "refresh_token",
              "token_uri", "api_endpoint", "ca_file", "timeout"},
    "smtp": {"host", "port", "security", "username", "password", "verify_certificate",
             "ca_file", "timeout"},
    "outbox": {"directory"},
}
_ALL_PROVIDER_KEYS = set().union(*_PROVIDER_KEYS.values())


def _provider(reader, t, sender):
    kind = t.string("type", "outbox", choices=tuple(_PROVIDER_KEYS))
    if kind in ("m365", "gmail") and not sender.default:
        reader.problem("sender.default", f'required for provider type "{kind}"')
    if kind == "m365":
        p = _m365(reader, t)
    elif kind == "gmail":
        p = _gmail(reader, t)
    elif kind == "smtp":
        p = _smtp_provider(reader, t)
    else:
        p = OutboxProvider(directory=t.path("directory", "var/outbox"))
    t.finish(_ALL_PROVIDER_KEYS - _PROVIDER_KEYS[kind], f'not a key for type "{kind}"')
    return p


def _required(t, name, kind):
    value = t.string(name, "")
    if not value and not any(p.key == t.key(name) for p in t.reader.problems):
        t.problem(name, f'required for type "{kind}"')
    return value


def _m365(reader, t):
    tenant = _required(t, "tenant_id", "m365")
    client = _required(t, "client_id", "m365")
    secret = t.secret("client_secret")
    expires = t.raw("client_secret_expires")
    if expires is _MISSING or expires == "":
        expires = None
    elif isinstance(expires, str):
        try:
            expires = datetime.date.fromisoformat(expires)
        except ValueError:
            t.problem("client_secret_expires", "must be a date, e.g. 2027-06-30")
            expires = None
    elif isinstance(expires, datetime.datetime):
        expires = expires.date()
    elif not isinstance(expires, datetime.date):
        t.problem("client_secret_expires", "must be a date, e.g. 2027-06-30")
        expires = None
    cert = t.path("certificate")
    key = t.path("certificate_key")
    if secret is not None and (cert or key):
        t.problem("client_secret", "set either client_secret or certificate + certificate_key, not both")
    elif secret is None and not (cert or key):
        if not any(p.key == t.key("client_secret") for p in reader.problems):
            t.problem("client_secret", 'required for type "m365" (or certificate + certificate_key)')
    elif bool(cert) != bool(key):
        t.problem("certificate_key" if cert else "certificate",
                  "certificate and certificate_key go together")
    else:
        _readable(reader, t.key("certificate"), cert)
        _readable(reader, t.key("certificate_key"), key)
    ca = t.path("ca_file")
    _readable(reader, t.key("ca_file"), ca)
    return M365Provider(
        tenant_id=tenant,
        client_id=client,
        client_secret=secret,
        client_secret_expires=expires,
        certificate=cert,
        certificate_key=key,
        save_to_sent_items=t.boolean("save_to_sent_items", False),
        authority=_url(t, "authority", "https://login.microsoftonline.com"),
        graph_endpoint=_url(t, "graph_endpoint", "https://graph.microsoft.com"),
        ca_file=ca,
        timeout=t.duration("timeout", 60.0, minimum=1.0),
    )


def _gmail(reader, t):
    sa = t.path("service_account_file")
    client = t.string("client_id", "")
    secret = t.secret("client_secret")
    refresh = t.secret("refresh_token")
    oauth = bool(client or secret or refresh)
    if sa and oauth:
        t.problem("service_account_file",
                  "set either service_account_file or client_id + client_secret + refresh_token")
    elif sa:
        _readable(reader, t.key("service_account_file"), sa)
    elif oauth:
        for name, value in (("client_id", client), ("client_secret", secret),
                            ("refresh_token", refresh)):
            if not value and not any(p.key == t.key(name) for p in reader.problems):
                t.problem(name, "required for user OAuth (client_id, client_secret, refresh_token)")
    else:
        t.problem("service_account_file",
                  'required for type "gmail" (or client_id + client_secret + refresh_token)')
    ca = t.path("ca_file")
    _readable(reader, t.key("ca_file"), ca)
    return GmailProvider(
        service_account_file=sa,
        client_id=client,
        client_secret=secret,
        refresh_token=refresh,
        token_uri=_url(t, "token_uri", "https://oauth2.googleapis.com/token"),
        api_endpoint=_url(t, "api_endpoint", "https://gmail.googleapis.com"),
        ca_file=ca,
        timeout=t.duration("timeout", 60.0, minimum=1.0),
    )


_DEFAULT_PORTS = {"starttls": 587, "tls": 465, "none": 25}


def _smtp_provider(reader, t):
    host = _required(t, "host", "smtp")
    security = t.string("security", "starttls", choices=("starttls", "tls", "none"))
    port = t.integer("port", _DEFAULT_PORTS[security], minimum=1, maximum=65535)
    username = t.string("username", "")
    password = t.secret("password")
    if username and password is None and not any(
        p.key == t.key("password") for p in reader.problems
    ):
        t.problem("password", "required when provider.username is set")
    if password is not None and not username:
        t.problem("username", "required when provider.password is set")
    ca = t.path("ca_file")
    _readable(reader, t.key("ca_file"), ca)
    return SMTPProvider(
        host=host,
        port=port,
        security=security,
        username=username,
        password=password,
        verify_certificate=t.boolean("verify_certificate", True),
        ca_file=ca,
        timeout=t.duration("timeout", 60.0, minimum=1.0),
    )


def _delivery(t):
    retry_texts = t.string_list("retry", ("1m", "5m", "15m", "1h", "4h"))
    retry = []
    for text in retry_texts:
        try:
            retry.append(units.parse_duration(text))
        except ValueError as e:
            t.problem("retry", str(e))
    if not retry_texts:
        t.problem("retry", "needs at least one wait")
    d = DeliveryConfig(
        mode=t.string("mode", "queue", choices=("queue", "direct")),
        retry=tuple(retry) or (60.0, 300.0, 900.0, 3600.0, 14400.0),
        max_age=t.duration("max_age", 5 * 86400.0, minimum=1.0),
        concurrency=t.integer("concurrency", 4, minimum=1, maximum=1000),
        direct_timeout=t.duration("direct_timeout", 60.0, minimum=1.0),
        lease=t.duration("lease", 300.0, minimum=10.0),
    )
    t.finish()
    return d


def _database(reader, t):
    url = t.string("url", "sqlite:///var/relay.db")
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not path:
            t.problem("url", 'names no file; write "sqlite:///var/relay.db"')
        elif path != ":memory:":
            url = "sqlite:///" + reader.resolve(path)
    elif not url.startswith(("postgresql://", "postgres://")):
        t.problem("url", 'must start with "sqlite:///" or "postgresql://"')
    d = DatabaseConfig(url=url, retention=t.duration("retention", 90 * 86400.0, minimum=3600.0))
    t.finish()
    return d


def _admin(reader, t):
    listen = ListenAddress("127.0.0.1", 8025)
    value = t.raw("listen")
    if value is not _MISSING:
        if value == "":
            listen = None
        else:
            try:
                listen = parse_listen(value)
            except ValueError as e:
                t.problem("listen", str(e))
    token = t.secret("token")
    if listen is not None and not listen.is_loopback and not (token and token.value):
        if not any(p.key == t.key("token") for p in reader.problems):
            t.problem("token", f"required when admin.listen ({listen}) is not loopback")
    t.finish()
    return AdminConfig(listen=listen, token=token)


def _open_relay_guard(reader, smtp):
    if smtp.open_relay or smtp.auth.required or smtp.allowed_networks:
        return
    exposed = [a for a in smtp.listen + smtp.tls_listen if not a.is_loopback]
    if exposed:
        reader.problem(
            "smtp.open_relay",
            f"refusing to listen on {exposed[0]} as an open relay: set smtp.auth.required, "
            "smtp.allowed_networks, or smtp.open_relay = true",
        )


def _sender_sanity(reader, config):
    users_lists = [u for u in config.smtp.auth.users.values() if u.allowed is not None]
    for user in users_lists:
        if not user.allowed.patterns:
            reader.problem(f"smtp.auth.users.{user.name}.allowed",
                           "is empty: this user could send as nobody")


def parse(document, base_dir=".", environ=None, source="relay.toml"):
    """Validate a document (a dict shaped like relay.toml) -> Config or ConfigError."""
    reader = _Reader(base_dir, os.environ if environ is None else environ)
    root = _Table(reader, "", document)
    smtp = _smtp(reader, root.table("smtp"))
    sender = _sender(root.table("sender"))
    provider = _provider(reader, root.table("provider"), sender)
    delivery = _delivery(root.table("delivery"))
    database = _database(reader, root.table("database"))
    admin = _admin(reader, root.table("admin"))
    mon_t = root.table("monitoring")
    monitoring = MonitoringConfig(
        secret_warning_days=mon_t.integer("secret_warning_days", 30, minimum=0)
    )
    mon_t.finish()
    root.finish()
    config = Config(smtp=smtp, sender=sender, provider=provider, delivery=delivery,
                    database=database, admin=admin, monitoring=monitoring,
                    document=document)
    _open_relay_guard(reader, smtp)
    _sender_sanity(reader, config)
    if reader.problems:
        raise ConfigError(reader.problems, source)
    return config


def load(path, environ=None):
    """Read and validate a configuration file -> Config, or raise ConfigError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError([Problem("", f"cannot read the file: {_os_reason(e)}")], str(path))
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError([Problem("", f"not valid TOML: {e}")], str(path))
    config = parse(document, path.resolve().parent, environ, source=str(path))
    return attr.evolve(config, path=str(path.resolve()))


# ---------------------------------------------------------------------------
# redaction, for the admin API


def _is_secret_key(key):
    for pattern in SECRET_KEYS:
        p = pattern.split(".")
        k = key.split(".")
        if len(p) == len(k) and all(a == "*" or a == b for a, b in zip(p, k)):
            return True
    return False


def redact(document, prefix=""):
    """A copy of ``document`` with every secret replaced by ``{"set": bool}``."""
    out = {}
    for name, value in document.items():
        key = f"{prefix}.{name}" if prefix else name
        is_user_table = (
            key.startswith("smtp.auth.users.") and key.count(".") == 3
            and isinstance(value, dict) and ("password" in value or "allowed" in value)
        )
        if _is_secret_key(key) and not is_user_table:
            out[name] = {"set": value not in (None, "", {})}
        elif isinstance(value, dict):
            out[name] = redact(value, key)
        else:
            out[name] = value
    return out


def unredact(new, current, prefix=""):
    """``new`` with every ``{"set": true}`` secret taken from ``current``."""
    out = {}
    for name, value in new.items():
        key = f"{prefix}.{name}" if prefix else name
        if _is_secret_key(key) and value == {"set": True}:
            old = current.get(name) if isinstance(current, dict) else None
            if old is None:
                out[name] = value  # parse() will say it is not a secret form
            else:
                out[name] = old
        elif _is_secret_key(key) and value == {"set": False}:
            continue
        elif isinstance(value, dict):
            cur = current.get(name, {}) if isinstance(current, dict) else {}
            out[name] = unredact(value, cur if isinstance(cur, dict) else {}, key)
        else:
            out[name] = value
    return out
