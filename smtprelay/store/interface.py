"""IStore: the only hand-off between the SMTP side, the queue and the admin API.

One implementation per database (``sqlite.py``, ``postgres.py``); nothing
outside ``smtprelay.store`` sees SQL.  Every method returns a Deferred and
never blocks the reactor.  Times are epoch seconds passed in by the caller
(whose clock is injected), so the store has no clock of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from smtprelay.model import Claim, Envelope, Transition
    from smtprelay.store.query import DeliveryQuery
    from smtprelay.store.rows import DeliveryPage, DeliveryRow, InstanceRow, Stats


class StoreUnavailable(Exception):
    """The database could not take the write or answer the read (disk full,
    read-only, connection lost, server gone); the caller may try again."""


class IStore(Interface):
    instance_id = Attribute("this process's instance id (lease owner)")

    def start(now: float) -> Deferred[None]:
        """Open, create or migrate the schema, register this instance."""

    def stop(now: float) -> Deferred[None]:
        """Mark this instance stopped and close connections."""

    def accept(envelope: Envelope, body: Iterable[bytes],
               lease_until: float | None = None) -> Deferred[Any]:
        """Store the envelope, its recipients and the body durably in one
        commit; fires None once committed (fsync).  ``body`` is an iterable
        of byte chunks, consumed off the reactor thread.  With
        ``lease_until`` the message is stored already claimed by this
        instance (direct mode).  Failure: StoreUnavailable, nothing stored."""

    def accept_and_claim(envelope: Envelope, body: Iterable[bytes], now: float,
                         lease_until: float, concurrency: int) -> Deferred[Claim | None]:
        """Store as ``accept`` does and, in the same commit, lease the message
        to this instance if its mailbox has room (not blocked after ``now``,
        fewer than ``concurrency`` leased by all instances) -> the Claim, or
        None when it was queued instead.  Lets a relay with free delivery
        slots start on a message it just accepted without a claim query."""

    def claim(now: float, limit: int, lease_until: float,
              concurrency: int) -> Deferred[list[Claim]]:
        """Lease up to ``limit`` due messages to this instance -> [Claim].
        Due: queued/deferred with next_attempt_at <= now, or active with an
        expired lease.  Skips mailboxes blocked until after ``now`` and keeps
        the active messages of a mailbox (all instances) <= ``concurrency``."""

    def claim_one(message_id: str, now: float, lease_until: float) -> Deferred[Claim | None]:
        """Lease one named message if it is not leased -> Claim or None."""

    def read_body(message_id: str) -> Deferred[IO[bytes]]:
        """-> a readable, seekable binary file positioned at 0 (caller closes)."""

    def finish(message_id: str, transition: Transition) -> Deferred[bool]:
        """Write the outcome of an attempt and release the lease -> bool
        (False if this instance no longer held the lease)."""

    def renew_leases(now: float, lease_until: float,
                     message_ids: Iterable[str] | None = None) -> Deferred[None]:
        """Extend the leases of this instance's active messages (with
        ``message_ids``, of those only: the ones still in hand, so that a
        message whose outcome could not be recorded is let go); heartbeat."""

    def release(message_ids: Iterable[str], now: float) -> Deferred[None]:
        """Give leases back (shutdown) so the messages are due at once."""

    def block_mailbox(mailbox: str, until: float) -> Deferred[None]:
        """No attempt for ``mailbox`` before ``until`` (Retry-After)."""

    def recover(now: float) -> Deferred[list[str]]:
        """Expire the leases of instances on this host that are gone."""

    def purge(before: float) -> Deferred[int]:
        """Delete finished messages (row, body, attempts) finished before."""

    # --- the admin side ---------------------------------------------------

    def stats(now: float) -> Deferred[Stats]:
        """-> the Stats of every instance: counts by stored state, the last
        error, when the oldest pending message arrived."""

    def deliveries(query: DeliveryQuery) -> Deferred[DeliveryPage]:
        """-> the DeliveryPage of DeliveryRows (without ``attempts``) for a
        DeliveryQuery, newest first; ValueError for a cursor not of ours."""

    def delivery(message_id: str) -> Deferred[DeliveryRow | None]:
        """-> the DeliveryRow with its ``attempts``, or None."""

    def requeue(message_id: str, now: float) -> Deferred[str | None]:
        """A failed or deferred (or queued) delivery is due now -> status
        before, or None if unknown; raises ValueError for sent/active."""

    def cancel(message_id: str, now: float, detail: str) -> Deferred[str | None]:
        """A queued or deferred delivery is failed with ``detail`` -> status
        before, or None; raises ValueError otherwise."""

    def instances(now: float) -> Deferred[list[InstanceRow]]:
        """-> an InstanceRow for every instance that used the database (all
        hosts), newest first; its state is "running", "stopped" or "dead", its
        uptime and heartbeat age as of ``now``."""

    def ping() -> Deferred[Any]:
        """Fires when the database answers a trivial query."""
