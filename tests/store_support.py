"""Shared by the store tests: a fixed clock, envelopes and transitions to store.

``envelope`` builds an :class:`~smtprelay.model.Envelope` numbered ``n`` (its id
sorts by ``n``); ``transition`` a :class:`~smtprelay.model.Transition` with one
attempt; ``NOW`` and ``LEASE`` are the times the store suite works with.
"""

from smtprelay.model import Attempt, Envelope, Transition, new_message_id

NOW = 1_800_000_000.0
LEASE = 300.0


def envelope(n=0, recipients=("a@x.org", "b@x.org"), mailbox="s@x.org", now=NOW, mode="queue",
             subject="Hello"):
    return Envelope(
        id=new_message_id(now + n / 1000.0), sender=mailbox, original_sender=mailbox,
        mailbox=mailbox, recipients=tuple(recipients), received_at=now + n / 1000.0, size=0,
        client_address="127.0.0.1", helo="client", auth_user=None,
        header_from=mailbox, subject=subject, message_id=f"<{n}@x.org>", mode=mode,
    )


def transition(status, at, results, next_at=None, outcome="sent", detail="ok", error=None):
    return Transition(status, next_at, Attempt(at, outcome, detail, 12, "i"), results, error=error)
