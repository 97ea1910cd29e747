"""IProvider, the message a provider is given, and the connection-test result.

A provider turns one stored message into one :class:`~smtprelay.model.Outcome`
(sent / temporary / permanent, with a one-line detail), never raises for a
delivery problem (an unexpected exception is the queue's to classify as
temporary), and knows nothing of the store or of SMTP clients.
"""

from __future__ import annotations

import datetime
from typing import IO, TYPE_CHECKING, Any

import attr
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from smtprelay.model import Outcome


class IProvider(Interface):
    type = Attribute('"m365" | "gmail" | "smtp" | "outbox"')

    def send(message: OutgoingMessage) -> Deferred[Outcome]:
        """Deliver an :class:`OutgoingMessage` -> Deferred[Outcome]."""

    def check() -> Deferred[CheckResult]:
        """Test the connection without sending -> Deferred[CheckResult]."""

    def credential_status() -> CredentialStatus:
        """-> CredentialStatus (what is known now, without I/O)."""

    def warnings() -> list[str]:
        """-> [str] things an administrator should know now."""

    def start() -> Deferred[None] | None:
        """Begin background work (token prefetch, expiry checks) -> Deferred|None."""

    def stop() -> Deferred[None] | None:
        """Release connections and threads -> Deferred|None."""


@attr.frozen
class OutgoingMessage:
    """One message as a provider sees it; ``body`` is a seekable binary file
    (canonical CRLF, the relay's Received header first)."""

    id: str
    sender: str  # envelope sender (may be "" for a null sender)
    mailbox: str  # the mailbox to send as
    recipients: tuple[str, ...]  # exactly who must receive it (pending recipients)
    size: int
    body: IO[bytes]
    attempt: int = 1


@attr.frozen
class Step:
    name: str
    ok: bool
    detail: str = ""


@attr.frozen
class CheckResult:
    steps: tuple[Step, ...]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok,
                "steps": [{"name": s.name, "ok": s.ok, "detail": s.detail} for s in self.steps]}


@attr.frozen
class CredentialStatus:
    """What is known of the credential's lifetime (None: nothing expires)."""

    expires: datetime.date | None = None
    source: str = ""  # "configured", "graph", "certificate", ...
    problem: str | None = None  # e.g. "the client secret was rejected (AADSTS7000215)"


class ProviderBase:
    """Defaults for the optional parts of IProvider."""

    def credential_status(self) -> CredentialStatus:
        return CredentialStatus()

    def warnings(self) -> list[str]:
        return []

    def start(self) -> Deferred[None] | None:
        return None

    def stop(self) -> Deferred[None] | None:
        return None
