"""What the store answers its readers with: frozen row objects, no JSON.

The admin API, the monitor and the metrics read the delivery log, the
statistics and the instances as these values; how they look on the wire
(times as RFC 3339, the provider label, "active" shown as queued) is the
admin's business (``smtprelay.admin.shapes``).  Times are epoch seconds as
stored.
"""

from __future__ import annotations

import attr

from smtprelay.model import Status


@attr.frozen
class RecipientRow:
    """One recipient of a delivery, in envelope order."""

    address: str
    status: str  # "pending" | "sent" | "failed" (recipients.status)
    detail: str | None = None


@attr.frozen
class AttemptRow:
    """One line of a delivery's history, oldest first."""

    at: float
    outcome: str  # "sent" | "temporary" | "partial" | "cancelled" | "requeued" | ...
    detail: str
    duration_ms: int = 0
    instance: str = ""


@attr.frozen
class DeliveryRow:
    """One message of the delivery log as stored (``status`` is the stored state,
    ACTIVE included; ``next_attempt_at`` as stored, whatever the state)."""

    id: str
    status: Status
    received_at: float
    finished_at: float | None
    sender: str
    original_sender: str
    mailbox: str
    header_from: str
    subject: str
    message_id: str
    size: int
    attempts_count: int
    next_attempt_at: float | None
    error: str | None
    client_address: str
    auth_user: str | None
    provider_id: str | None
    mode: str
    helo: str
    recipients: tuple[RecipientRow, ...] = ()
    # the history: read by ``IStore.delivery`` only; None in a page of the log
    attempts: tuple[AttemptRow, ...] | None = None


@attr.frozen
class DeliveryPage:
    """One page of the delivery log, newest first; ``next_cursor`` reads the next
    (None on the last page)."""

    items: tuple[DeliveryRow, ...]
    next_cursor: str | None = None


@attr.frozen
class LastError:
    """The latest attempt that did not send (nor was an admin's requeue)."""

    message: str
    at: float
    delivery_id: str


@attr.frozen
class Stats:
    """Counts of messages by stored state, all instances together."""

    received: int
    sent: int
    failed: int
    queued: int
    deferred: int
    active: int
    last_error: LastError | None = None
    oldest_pending_at: float | None = None

    @property
    def pending(self) -> int:
        """Waiting for delivery: queued, deferred or in flight."""
        return self.queued + self.deferred + self.active


@attr.frozen
class InstanceRow:
    """A relay process that used the database (any host).  ``state`` is
    "running", "stopped" or "dead"; the two ages are as of the ``now`` the
    caller gave."""

    id: str
    hostname: str
    pid: int
    started_at: float
    heartbeat_at: float
    state: str
    version: str
    uptime_seconds: float
    heartbeat_age_seconds: float
