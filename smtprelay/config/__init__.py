"""The configuration: relay.toml parsed into frozen attrs classes, one problem list.

Three parts: :mod:`~smtprelay.config.model` (the values), :mod:`~smtprelay.config.secrets`
(the I/O validation needs: environment variables, secret files, readable paths,
the TLS key pair), :mod:`~smtprelay.config.parsing` (pure: a document and those
facts -> Config or ConfigError), and :mod:`~smtprelay.config.redact` for the
admin API, which shows ``{"set": true}`` instead of a secret.

``load(path)`` reads a file, gathers, parses; ``parse(document, base_dir)``
gathers and parses a document (the same shape as the TOML, as the admin API's
``PUT /api/config`` sends it).  Every problem is a :class:`Problem` naming its
dotted key; :class:`ConfigError` carries all of them, so that start-up and
``check-config`` print one line each.  Secrets (``{env = ...}``, ``{file = ...}``
or a literal) become :class:`Secret` objects whose ``repr`` never shows the value.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attr

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
    secrets_in,
)
from smtprelay.config.parsing import parse_document, parse_listen
from smtprelay.config.redact import SECRET_KEYS, redact, unredact
from smtprelay.config.secrets import Facts, gather

__all__ = [
    "SECRET_KEYS",
    "AdminConfig",
    "AuthConfig",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "DeliveryConfig",
    "Facts",
    "GmailProvider",
    "ListenAddress",
    "M365Provider",
    "MonitoringConfig",
    "OutboxProvider",
    "Problem",
    "ProviderConfig",
    "SMTPConfig",
    "SMTPProvider",
    "Secret",
    "SenderConfig",
    "User",
    "gather",
    "load",
    "parse",
    "parse_document",
    "parse_listen",
    "redact",
    "secrets_in",
    "unredact",
]


def parse(document: Any, base_dir: str | os.PathLike[str] = ".",
          environ: Mapping[str, str] | None = None, source: str = "relay.toml") -> Config:
    """Blocking: gather what ``document`` needs (secret files, ...) and validate it.

    -> Config, or ConfigError.  Off the reactor thread, run :func:`gather` in a
    thread and :func:`parse_document` (pure) on the reactor instead.
    """
    return parse_document(document, gather(document, base_dir, environ), source)


def _os_reason(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Blocking: read and validate a configuration file -> Config, or raise ConfigError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError([Problem("", f"cannot read the file: {_os_reason(e)}")], str(path)) \
            from None
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError([Problem("", f"not valid TOML: {e}")], str(path)) from None
    config = parse(document, path.resolve().parent, environ, source=str(path))
    return attr.evolve(config, path=str(path.resolve()))
