"""Values that move between the rooms of the relay: frozen, no behaviour beyond
what their own fields imply.

``Envelope`` is what the SMTP side hands to the store at end of data;
``Claim`` is what the store hands to the queue runner; ``Outcome`` is what a
provider answers; ``Attempt`` is one line of a delivery's history.
"""

from __future__ import annotations

import enum
import os
import time

import attr


class Status(str, enum.Enum):
    """The explicit places a message can be (one transition per store call)."""

    QUEUED = "queued"  # accepted, waiting for its first attempt
    ACTIVE = "active"  # claimed by an instance, an attempt in flight (a lease)
    DEFERRED = "deferred"  # an attempt failed temporarily; waiting for the next
    SENT = "sent"  # every recipient accepted
    FAILED = "failed"  # permanently failed, expired or cancelled

    def __str__(self) -> str:
        return self.value


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_message_id(now: float | None = None) -> str:
    """A 26-character ULID: time-ordered (milliseconds), then 80 random bits.

    Sorting ids sorts by acceptance time, which the delivery log's cursor
    pagination relies on.
    """
    ms = int((time.time() if now is None else now) * 1000)
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    out = []
    for _ in range(26):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


@attr.frozen
class Envelope:
    """Everything about an accepted message but its bytes."""

    id: str
    sender: str  # the envelope sender to send as ("" only without sender.default)
    original_sender: str  # MAIL FROM as received (before a rewrite)
    mailbox: str  # the sending mailbox the providers act as
    recipients: tuple[str, ...]
    received_at: float
    size: int
    client_address: str = ""
    helo: str = ""
    auth_user: str | None = None
    header_from: str = ""
    subject: str = ""
    message_id: str = ""
    mode: str = "queue"  # "queue" | "direct"
    instance: str = ""


@attr.frozen
class Claim:
    """A message leased to one instance for one delivery attempt."""

    id: str
    sender: str
    mailbox: str
    recipients: tuple[str, ...]  # those still pending: not yet sent, not failed
    age_from: float  # delivery.max_age counts from here (acceptance, or an admin's retry)
    size: int
    attempts: int  # attempts made before this one
    mode: str = "queue"


class Result(str, enum.Enum):
    SENT = "sent"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"

    def __str__(self) -> str:
        return self.value


@attr.frozen
class Outcome:
    """A provider's answer for one attempt.

    ``recipients`` maps an address to ``(Result, detail)`` when the provider
    knows per-recipient results (SMTP upstream); otherwise every pending
    recipient shares ``result``.  ``not_before`` (epoch seconds) is the
    earliest next attempt the provider asked for (Retry-After); ``mailbox_wide``
    says it applies to every message of the mailbox.  ``ambiguous`` marks a
    failure after the message may have been accepted (the answer was lost).
    """

    result: Result
    detail: str
    recipients: dict[str, tuple[Result, str]] = attr.field(factory=dict)
    not_before: float | None = None
    mailbox_wide: bool = False
    provider_id: str | None = None
    ambiguous: bool = False

    @classmethod
    def sent(cls, detail: str = "sent", provider_id: str | None = None,
             recipients: dict[str, tuple[Result, str]] | None = None) -> Outcome:
        return cls(Result.SENT, detail, recipients or {}, provider_id=provider_id)

    @classmethod
    def temporary(cls, detail: str, not_before: float | None = None, mailbox_wide: bool = False,
                  ambiguous: bool = False,
                  recipients: dict[str, tuple[Result, str]] | None = None) -> Outcome:
        return cls(Result.TEMPORARY, detail, recipients or {}, not_before=not_before,
                   mailbox_wide=mailbox_wide, ambiguous=ambiguous)

    @classmethod
    def permanent(cls, detail: str,
                  recipients: dict[str, tuple[Result, str]] | None = None) -> Outcome:
        return cls(Result.PERMANENT, detail, recipients or {})

    def result_for(self, address: str) -> tuple[Result, str]:
        return self.recipients.get(address, (self.result, self.detail))


@attr.frozen
class Attempt:
    at: float
    outcome: str  # "sent" | "temporary" | "ambiguous" | "permanent" | "expired" | "cancelled" | ...
    detail: str
    duration_ms: int = 0
    instance: str = ""


@attr.frozen
class Transition:
    """What the queue decided after an attempt: the store just writes it."""

    status: Status
    next_attempt_at: float | None
    attempt: Attempt
    recipient_results: dict[str, tuple[Result, str]]  # address -> (Result, detail) for this attempt
    error: str | None = None
    provider_id: str | None = None
