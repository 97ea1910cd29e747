"""IStore: the only hand-off between the SMTP side, the queue and the admin API.

One implementation per database (``sqlite.py``, ``postgres.py``); nothing
outside ``smtprelay.store`` sees SQL.  Every method returns a Deferred and
never blocks the reactor.  Times are epoch seconds passed in by the caller
(whose clock is injected), so the store has no clock of its own.
"""

from zope.interface import Attribute, Interface


class StoreUnavailable(Exception):
    """The database could not take the write or answer the read (disk full,
    read-only, connection lost, server gone); the caller may try again."""


class IStore(Interface):
    instance_id = Attribute("this process's instance id (lease owner)")

    def start(now):
        """Open, create or migrate the schema, register this instance."""

    def stop(now):
        """Mark this instance stopped and close connections."""

    def accept(envelope, body, lease_until=None):
        """Store the envelope, its recipients and the body durably in one
        commit; fires None once committed (fsync).  ``body`` is an iterable
        of byte chunks, consumed off the reactor thread.  With
        ``lease_until`` the message is stored already claimed by this
        instance (direct mode).  Failure: StoreUnavailable, nothing stored."""

    def accept_and_claim(envelope, body, now, lease_until, concurrency):
        """Store as ``accept`` does and, in the same commit, lease the message
        to this instance if its mailbox has room (not blocked after ``now``,
        fewer than ``concurrency`` leased by all instances) -> the Claim, or
        None when it was queued instead.  Lets a relay with free delivery
        slots start on a message it just accepted without a claim query."""

    def claim(now, limit, lease_until, concurrency):
        """Lease up to ``limit`` due messages to this instance -> [Claim].
        Due: queued/deferred with next_attempt_at <= now, or active with an
        expired lease.  Skips mailboxes blocked until after ``now`` and keeps
        the active messages of a mailbox (all instances) <= ``concurrency``."""

    def claim_one(message_id, now, lease_until):
        """Lease one named message if it is not leased -> Claim or None."""

    def read_body(message_id):
        """-> a readable, seekable binary file positioned at 0 (caller closes)."""

    def finish(message_id, transition):
        """Write the outcome of an attempt and release the lease -> bool
        (False if this instance no longer held the lease)."""

    def renew_leases(now, lease_until, message_ids=None):
        """Extend the leases of this instance's active messages (with
        ``message_ids``, of those only: the ones still in hand, so that a
        message whose outcome could not be recorded is let go); heartbeat."""

    def release(message_ids, now):
        """Give leases back (shutdown) so the messages are due at once."""

    def block_mailbox(mailbox, until):
        """No attempt for ``mailbox`` before ``until`` (Retry-After)."""

    def recover(now):
        """Expire the leases of instances on this host that are gone."""

    def purge(before):
        """Delete finished messages (row, body, attempts) finished before."""

    # --- the admin side ---------------------------------------------------

    def stats(now):
        """-> dict: received, sent, failed, queued, deferred, active, last_error,
        oldest_pending_at."""

    def deliveries(query):
        """-> (items, next_cursor) for a DeliveryQuery, newest first."""

    def delivery(message_id):
        """-> a delivery dict with ``attempts``, or None."""

    def requeue(message_id, now):
        """A failed or deferred (or queued) delivery is due now -> status
        before, or None if unknown; raises ValueError for sent/active."""

    def cancel(message_id, now, detail):
        """A queued or deferred delivery is failed with ``detail`` -> status
        before, or None; raises ValueError otherwise."""

    def instances(now):
        """-> [dict] of every instance that used the database (all hosts), newest
        first: id, hostname, pid, started_at, heartbeat_at, state ("running",
        "stopped", "dead"), version, uptime_seconds, heartbeat_age_seconds."""

    def ping():
        """Fires when the database answers a trivial query."""
