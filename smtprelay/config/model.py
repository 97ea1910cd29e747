"""The configuration's values: frozen attrs classes, the problems and the error.

Everything here is plain data: :class:`Config` and its sections, :class:`Secret`
(whose ``repr`` never shows the value), :class:`ListenAddress`, and
:class:`Problem` / :class:`ConfigError`, which carry one message per dotted key.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable, Iterator
from typing import TypeAlias

import attr

from smtprelay import policy
from smtprelay.passwords import PasswordHash


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` says why, one key each."""

    def __init__(self, problems: Iterable[Problem], source: str = "relay.toml") -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"{self.source}: {p}" for p in self.problems]

    def fields(self) -> dict[str, str]:
        """``{dotted.key: problem}`` for an API answer."""
        out: dict[str, str] = {}
        for p in self.problems:
            out.setdefault(p.key, p.message)
        return out


@attr.frozen
class Problem:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


@attr.frozen(repr=False)
class Secret:
    """A secret and where it came from; the value never reaches ``repr``/``str``."""

    source: str  # "literal" | "env" | "file"
    ref: str | None = None  # the variable name or the file path
    value: str = attr.field(default="", eq=False)

    def __repr__(self) -> str:
        where = f" {self.ref}" if self.ref else ""
        return f"<Secret from {self.source}{where}>"

    __str__ = __repr__

    def reveal(self) -> str:
        return self.value

    def bytes(self) -> bytes:
        return self.value.encode("utf-8")


@attr.frozen
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def interface(self) -> str:
        """The address for ``listenTCP``'s ``interface``: "" listens on all of IPv4."""
        return self.host


@attr.frozen
class User:
    name: str
    password: PasswordHash | Secret  # a Secret holds the plain password
    allowed: policy.SenderPatterns | None = None


@attr.frozen
class AuthConfig:
    required: bool = False
    allow_plaintext: bool = False
    max_failures: int = 5
    lockout: float = 900.0
    users: dict[str, User] = attr.field(factory=dict)  # name -> User


@attr.frozen
class SMTPConfig:
    listen: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", 2525),)
    tls_listen: tuple[ListenAddress, ...] = ()
    hostname: str = ""
    max_message_size: int = 35_000_000
    max_recipients: int = 500
    max_connections: int = 200
    max_connections_per_address: int = 50
    idle_timeout: float = 300.0
    stress_timeout: float = 10.0
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
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
    def tls_enabled(self) -> bool:
        return bool(self.tls_certificate and self.tls_key)


def _no_patterns() -> policy.SenderPatterns:
    return policy.SenderPatterns(())


@attr.frozen
class SenderConfig:
    default: str = ""
    allowed: policy.SenderPatterns = attr.field(factory=_no_patterns)
    on_disallowed: str = "reject"
    check_header_from: bool = True

    @property
    def policy(self) -> policy.SenderPolicy:
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


ProviderConfig: TypeAlias = OutboxProvider | M365Provider | GmailProvider | SMTPProvider


@attr.frozen
class DeliveryConfig:
    mode: str = "queue"
    retry: tuple[float, ...] = (60.0, 300.0, 900.0, 3600.0, 14400.0)
    max_age: float = 5 * 86400.0
    concurrency: int = 4
    direct_timeout: float = 60.0
    lease: float = 300.0


@attr.frozen
class DatabaseConfig:
    url: str = "sqlite:///var/relay.db"
    retention: float = 90 * 86400.0

    @property
    def kind(self) -> str:
        return "postgresql" if self.url.startswith(("postgresql:", "postgres:")) else "sqlite"

    @property
    def sqlite_path(self) -> str:
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
    provider: ProviderConfig = attr.field(factory=OutboxProvider)
    delivery: DeliveryConfig = attr.field(factory=DeliveryConfig)
    database: DatabaseConfig = attr.field(factory=DatabaseConfig)
    admin: AdminConfig = attr.field(factory=AdminConfig)
    monitoring: MonitoringConfig = attr.field(factory=MonitoringConfig)
    # where it came from: relative paths above are already resolved against it
    path: str | None = attr.field(default=None, eq=False)
    document: dict[str, object] = attr.field(factory=dict, eq=False, repr=False)

    def secrets(self) -> list[str]:
        """Every secret value this configuration holds (for leak checks)."""
        out = []
        for s in secrets_in(self):
            if s.value:
                out.append(s.value)
        return out


def secrets_in(obj: object) -> Iterator[Secret]:
    """Every :class:`Secret` inside ``obj`` (a Config, a section, a dict of them)."""
    if isinstance(obj, Secret):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from secrets_in(v)
    elif attr.has(type(obj)):
        for a in attr.fields(type(obj)):  # type: ignore[arg-type]  # has() narrows nothing
            if a.name != "document":
                yield from secrets_in(getattr(obj, a.name))
