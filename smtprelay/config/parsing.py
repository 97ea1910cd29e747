"""Validating a configuration document: pure, one problem per dotted key.

:func:`parse_document` turns a document (a dict shaped like relay.toml, as
``tomllib`` or the admin API's ``PUT /api/config`` gives it) and the
:class:`~smtprelay.config.secrets.Facts` gathered beforehand (environment
variables, secret files' contents, readable paths, the TLS key pair check)
into a :class:`~smtprelay.config.model.Config`, or raises
:class:`~smtprelay.config.model.ConfigError` listing every problem in the
order the document is read.  No I/O here: what needs the outside world was
looked up by :func:`smtprelay.config.secrets.gather`.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smtprelay import policy, units
from smtprelay.config.model import (
    AdminConfig,
    AuthConfig,
    Config,
    ConfigError,
    DatabaseConfig,
    DeliveryConfig,
    GmailProvider,
    ListenAddress,
    M365Provider,
    MonitoringConfig,
    OutboxProvider,
    Problem,
    ProviderConfig,
    Secret,
    SenderConfig,
    SMTPConfig,
    SMTPProvider,
    User,
)
from smtprelay.passwords import PasswordHash, is_password_hash

if TYPE_CHECKING:
    from smtprelay.config.secrets import Facts


def resolve(base_dir: str, path: str) -> str:
    """``path`` (``~`` expanded) against the configuration's folder."""
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (Path(base_dir) / p))


_MISSING: Any = object()
_KIND_NAMES = {str: "a string", bool: "true or false", int: "an integer", float: "a number",
               list: "a list"}


class _Table:
    """One TOML table being read: typed getters, problems, unknown keys."""

    def __init__(self, reader: _Reader, prefix: str, data: Any) -> None:
        self.reader = reader
        self.prefix = prefix
        if data is not _MISSING and not isinstance(data, dict):
            reader.problem(prefix, "must be a table")
            data = {}
        self.data: dict[str, Any] = {} if data is _MISSING else data
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        self.seen.add(name)
        return self.data.get(name, default)

    def problem(self, name: str, message: str) -> None:
        self.reader.problem(self.key(name), message)

    def get(self, name: str, kind: type, default: Any,
            check: Callable[[Any], str | None] | None = None) -> Any:
        value = self.raw(name)
        if value is _MISSING:
            return default
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            self.problem(name, f"must be {_KIND_NAMES.get(kind, kind.__name__)}")
            return default
        if check is not None:
            message = check(value)
            if message:
                self.problem(name, message)
                return default
        return value

    def string(self, name: str, default: str = "",
               choices: tuple[str, ...] | None = None) -> str:
        def one_of(v: str) -> str | None:
            if choices is not None and v not in choices:
                return "must be one of " + ", ".join(f'"{c}"' for c in choices)
            return None

        return self.get(name, str, default, one_of if choices else None)

    def boolean(self, name: str, default: bool) -> bool:
        value: bool = self.get(name, bool, default)
        return value

    def integer(self, name: str, default: int, minimum: int | None = None,
                maximum: int | None = None) -> int:
        def check(v: int) -> str | None:
            if minimum is not None and v < minimum:
                return f"must be at least {minimum}"
            if maximum is not None and v > maximum:
                return f"must be at most {maximum}"
            return None
        value: int = self.get(name, int, default, check)
        return value

    def duration(self, name: str, default: float, minimum: float = 0.0) -> float:
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

    def size(self, name: str, default: int, minimum: int = 1) -> int:
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

    def string_list(self, name: str, default: Iterable[str] = ()) -> tuple[str, ...]:
        value = self.raw(name)
        if value is _MISSING:
            return tuple(default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(name, "must be a list of strings")
            return tuple(default)
        return tuple(value)

    def path(self, name: str, default: str = "") -> str:
        value = self.string(name, default)
        return self.reader.resolve(value) if value else ""

    def secret(self, name: str) -> Secret | None:
        value = self.raw(name)
        if value is _MISSING or value == "":
            return None
        return self.reader.secret(self.key(name), value)

    def table(self, name: str) -> _Table:
        return _Table(self.reader, self.key(name), self.raw(name))

    def finish(self, allowed_elsewhere: Iterable[str] = (), elsewhere_note: str = "") -> None:
        for name in self.data:
            if name in self.seen:
                continue
            if name in allowed_elsewhere:
                self.problem(name, elsewhere_note)
            else:
                self.problem(name, "unknown key")


class _Reader:
    """The problems found so far, and the gathered facts the document is checked against."""

    def __init__(self, facts: Facts) -> None:
        self.facts = facts
        self.problems: list[Problem] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(Problem(key, message))

    def has_problem(self, key: str) -> bool:
        return any(p.key == key for p in self.problems)

    def resolve(self, path: str) -> str:
        return resolve(self.facts.base_dir, path)

    def secret(self, key: str, value: Any) -> Secret | None:
        if isinstance(value, str):
            return Secret("literal", None, value)
        if isinstance(value, dict) and len(value) == 1:
            (kind, ref), = value.items()
            if kind == "env" and isinstance(ref, str):
                return self._env_secret(key, ref)
            if kind == "file" and isinstance(ref, str):
                return self._file_secret(key, ref)
        self.problem(key, 'a secret is a string, { env = "NAME" } or { file = "PATH" }')
        return None

    def _env_secret(self, key: str, name: str) -> Secret:
        if name not in self.facts.environ:
            self.problem(key, f"environment variable {name} is not set")
            return Secret("env", name, "")
        return Secret("env", name, self.facts.environ[name])

    def _file_secret(self, key: str, ref: str) -> Secret:
        path = self.resolve(ref)
        read = self.facts.files[path]
        if read.text is None:
            self.problem(key, f"cannot read secret file {path}: {read.reason}")
            return Secret("file", ref, "")
        return Secret("file", ref, read.text.rstrip("\r\n"))


def parse_listen(text: object) -> ListenAddress:
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


def _listens(table: _Table, name: str,
             default: tuple[ListenAddress, ...]) -> tuple[ListenAddress, ...]:
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


def _networks(table: _Table,
              name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for text in table.string_list(name):
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            table.problem(name, f'"{text}" is not a network; write e.g. "10.0.0.0/8"')
    return tuple(out)


def _patterns(table: _Table, name: str) -> policy.SenderPatterns:
    values = table.string_list(name)
    try:
        return policy.SenderPatterns.parse(values)
    except ValueError as e:
        table.problem(name, str(e))
        return policy.SenderPatterns(())


def _address(table: _Table, name: str) -> str:
    value = table.string(name, "")
    if value and not policy.is_mailbox(value):
        table.problem(name, f'"{value}" is not an e-mail address')
        return ""
    return value


def _url(table: _Table, name: str, default: str) -> str:
    value = table.string(name, default)
    if value and not value.startswith("https://"):
        table.problem(name, "must be an https:// URL")
        return default
    return value.rstrip("/")


def _readable(reader: _Reader, key: str, path: str) -> bool:
    if not path:
        return False
    reason = reader.facts.access[path]
    if reason:
        reader.problem(key, f"cannot read {path}: {reason}")
        return False
    return True


# --- sections ------------------------------------------------------------


def _tls_files(reader: _Reader, t: _Table, tls_listen: tuple[ListenAddress, ...]
               ) -> tuple[str, str]:
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
    return cert, key


def _smtp(reader: _Reader, t: _Table) -> SMTPConfig:
    auth_t = t.table("auth")
    listen = _listens(t, "listen", (ListenAddress("127.0.0.1", 2525),))
    tls_listen = _listens(t, "tls_listen", ())
    hostname = t.string("hostname", "") or reader.facts.fqdn
    cert, key = _tls_files(reader, t, tls_listen)
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


def _check_keypair(reader: _Reader, key: str, cert_path: str, key_path: str) -> None:
    outcome = reader.facts.keypairs[(cert_path, key_path)]
    if outcome == "certificate":
        reader.problem(key, f"{cert_path} is not a PEM certificate")
    elif outcome == "mismatch":
        reader.problem(key, "smtp.tls_key does not belong to this certificate")
    elif outcome == "key":
        reader.problem("smtp.tls_key", f"{key_path} is not a PEM private key")


def _user(reader: _Reader, users_t: _Table, name: str) -> User | None:
    users_t.seen.add(name)
    value = users_t.data[name]
    ukey = users_t.key(name)
    allowed = None
    pw: PasswordHash | Secret | None
    if isinstance(value, dict) and ("password" in value or "allowed" in value):
        ut = _Table(reader, ukey, value)
        raw = ut.raw("password")
        if raw is _MISSING:
            ut.problem("password", "required")
            pw = None
        else:
            pw = _password(reader, ut.key("password"), raw)
        if ut.has("allowed"):
            allowed = _patterns(ut, "allowed")
        ut.finish()
    else:
        pw = _password(reader, ukey, value)
    return User(name, pw, allowed) if pw is not None else None


def _auth(reader: _Reader, t: _Table) -> AuthConfig:
    users_t = t.table("users")
    users = {}
    for name in list(users_t.data):
        user = _user(reader, users_t, name)
        if user is not None:
            users[name] = user
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


def _password(reader: _Reader, key: str, value: Any) -> PasswordHash | Secret | None:
    if isinstance(value, str) and is_password_hash(value):
        try:
            return PasswordHash.parse(value)
        except ValueError as e:
            reader.problem(key, str(e))
            return None
    secret = reader.secret(key, value)
    if (secret is not None and secret.source != "literal" and not secret.value
            and not reader.has_problem(key)):
        reader.problem(key, "the password is empty")
    if secret is not None and secret.source == "literal" and not secret.value:
        reader.problem(key, "the password is empty")
        return None
    return secret


def _sender(t: _Table) -> SenderConfig:
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


PROVIDER_KEYS = {
    "m365": {"tenant_id", "client_id", "client_secret", "client_secret_expires",
             "certificate", "certificate_key", "save_to_sent_items", "authority",
             "graph_endpoint", "ca_file", "timeout"},
    "gmail": {"service_account_file", "client_id", "client_secret", "refresh_token",
              "token_uri", "api_endpoint", "ca_file", "timeout"},
    "smtp": {"host", "port", "security", "username", "password", "verify_certificate",
             "ca_file", "timeout"},
    "outbox": {"directory"},
}
_ALL_PROVIDER_KEYS: set[str] = set().union(*PROVIDER_KEYS.values())


def _provider(reader: _Reader, t: _Table, sender: SenderConfig) -> ProviderConfig:
    kind = t.string("type", "outbox", choices=tuple(PROVIDER_KEYS))
    if kind in ("m365", "gmail") and not sender.default:
        reader.problem("sender.default", f'required for provider type "{kind}"')
    p: ProviderConfig
    if kind == "m365":
        p = _m365(reader, t)
    elif kind == "gmail":
        p = _gmail(reader, t)
    elif kind == "smtp":
        p = _smtp_provider(reader, t)
    else:
        p = OutboxProvider(directory=t.path("directory", "var/outbox"))
    t.finish(_ALL_PROVIDER_KEYS - PROVIDER_KEYS[kind], f'not a key for type "{kind}"')
    return p


def _required(t: _Table, name: str, kind: str) -> str:
    value = t.string(name, "")
    if not value and not t.reader.has_problem(t.key(name)):
        t.problem(name, f'required for type "{kind}"')
    return value


def _expiry_date(t: _Table, name: str) -> datetime.date | None:
    expires = t.raw(name)
    if expires is _MISSING or expires == "":
        return None
    if isinstance(expires, str):
        try:
            return datetime.date.fromisoformat(expires)
        except ValueError:
            t.problem(name, "must be a date, e.g. 2027-06-30")
            return None
    if isinstance(expires, datetime.datetime):
        return expires.date()
    if not isinstance(expires, datetime.date):
        t.problem(name, "must be a date, e.g. 2027-06-30")
        return None
    return expires


def _m365_credential(reader: _Reader, t: _Table, secret: Secret | None,
                     cert: str, key: str) -> None:
    if secret is not None and (cert or key):
        t.problem("client_secret",
                  "set either client_secret or certificate + certificate_key, not both")
    elif secret is None and not (cert or key):
        if not reader.has_problem(t.key("client_secret")):
            t.problem("client_secret",
                      'required for type "m365" (or certificate + certificate_key)')
    elif bool(cert) != bool(key):
        t.problem("certificate_key" if cert else "certificate",
                  "certificate and certificate_key go together")
    else:
        _readable(reader, t.key("certificate"), cert)
        _readable(reader, t.key("certificate_key"), key)


def _m365(reader: _Reader, t: _Table) -> M365Provider:
    tenant = _required(t, "tenant_id", "m365")
    client = _required(t, "client_id", "m365")
    secret = t.secret("client_secret")
    expires = _expiry_date(t, "client_secret_expires")
    cert = t.path("certificate")
    key = t.path("certificate_key")
    _m365_credential(reader, t, secret, cert, key)
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


def _gmail_credential(reader: _Reader, t: _Table, sa: str, client: str,
                      secret: Secret | None, refresh: Secret | None) -> None:
    oauth = bool(client or secret or refresh)
    if sa and oauth:
        t.problem("service_account_file",
                  "set either service_account_file or client_id + client_secret + refresh_token")
    elif sa:
        _readable(reader, t.key("service_account_file"), sa)
    elif oauth:
        for name, value in (("client_id", client), ("client_secret", secret),
                            ("refresh_token", refresh)):
            if not value and not reader.has_problem(t.key(name)):
                t.problem(name, "required for user OAuth (client_id, client_secret, refresh_token)")
    else:
        t.problem("service_account_file",
                  'required for type "gmail" (or client_id + client_secret + refresh_token)')


def _gmail(reader: _Reader, t: _Table) -> GmailProvider:
    sa = t.path("service_account_file")
    client = t.string("client_id", "")
    secret = t.secret("client_secret")
    refresh = t.secret("refresh_token")
    _gmail_credential(reader, t, sa, client, secret, refresh)
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


def _smtp_provider(reader: _Reader, t: _Table) -> SMTPProvider:
    host = _required(t, "host", "smtp")
    security = t.string("security", "starttls", choices=("starttls", "tls", "none"))
    port = t.integer("port", _DEFAULT_PORTS[security], minimum=1, maximum=65535)
    username = t.string("username", "")
    password = t.secret("password")
    if username and password is None and not reader.has_problem(t.key("password")):
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


def _delivery(t: _Table) -> DeliveryConfig:
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


def _database(reader: _Reader, t: _Table) -> DatabaseConfig:
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


def _admin(reader: _Reader, t: _Table) -> AdminConfig:
    listen: ListenAddress | None = ListenAddress("127.0.0.1", 8025)
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
        if not reader.has_problem(t.key("token")):
            t.problem("token", f"required when admin.listen ({listen}) is not loopback")
    t.finish()
    return AdminConfig(listen=listen, token=token)


def _open_relay_guard(reader: _Reader, smtp: SMTPConfig) -> None:
    if smtp.open_relay or smtp.auth.required or smtp.allowed_networks:
        return
    exposed = [a for a in smtp.listen + smtp.tls_listen if not a.is_loopback]
    if exposed:
        reader.problem(
            "smtp.open_relay",
            f"refusing to listen on {exposed[0]} as an open relay: set smtp.auth.required, "
            "smtp.allowed_networks, or smtp.open_relay = true",
        )


def _sender_sanity(reader: _Reader, config: Config) -> None:
    users_lists = [u for u in config.smtp.auth.users.values() if u.allowed is not None]
    for user in users_lists:
        if user.allowed is not None and not user.allowed.patterns:
            reader.problem(f"smtp.auth.users.{user.name}.allowed",
                           "is empty: this user could send as nobody")


def _monitoring(t: _Table) -> MonitoringConfig:
    monitoring = MonitoringConfig(
        secret_warning_days=t.integer("secret_warning_days", 30, minimum=0)
    )
    t.finish()
    return monitoring


def parse_document(document: Any, facts: Facts, source: str = "relay.toml") -> Config:
    """Validate a document (a dict shaped like relay.toml) against gathered facts.

    Pure: -> Config, or ConfigError with every problem, in the order the document is read.
    """
    reader = _Reader(facts)
    root = _Table(reader, "", document)
    smtp = _smtp(reader, root.table("smtp"))
    sender = _sender(root.table("sender"))
    provider = _provider(reader, root.table("provider"), sender)
    delivery = _delivery(root.table("delivery"))
    database = _database(reader, root.table("database"))
    admin = _admin(reader, root.table("admin"))
    monitoring = _monitoring(root.table("monitoring"))
    root.finish()
    config = Config(smtp=smtp, sender=sender, provider=provider, delivery=delivery,
                    database=database, admin=admin, monitoring=monitoring,
                    document=document)
    _open_relay_guard(reader, smtp)
    _sender_sanity(reader, config)
    if reader.problems:
        raise ConfigError(reader.problems, source)
    return config
