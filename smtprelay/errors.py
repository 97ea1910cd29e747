"""Errors of applying a configuration, shared by the service and the admin API.

A module of its own so that ``smtprelay.admin.api`` can name them without
importing ``smtprelay.service`` (which imports the admin site, which imports
the API: a cycle).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smtprelay.config import ListenAddress


class ListenError(Exception):
    """A listener could not be bound; the message names the key."""

    # the SMTP listener (key, address, implicit TLS) that failed, when it was one
    spec: tuple[str, ListenAddress, bool] | None = None

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ApplyError(Exception):
    """A new configuration could not be applied; the old one keeps running.

    ``fields`` (dotted key -> problem) when the problem belongs to a key."""

    def __init__(self, message: str, fields: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.fields = dict(fields or {})
