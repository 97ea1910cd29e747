"""The store suite: every IStore implementation must pass it.

``StoreTests`` runs on SQLite (``SQLiteStoreTests``) and on PostgreSQL
(``PostgresStoreTests``, on a database of its own per test; skipped when no
server answers, a failure under ``SMTPRELAY_REQUIRE_POSTGRES=1``).  Several
store objects on one database play several relay instances: claims, leases,
Retry-After and migrations must hold between them on both backends.
"""

import os
import random
import sqlite3
import tempfile

import attr
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from smtprelay import __version__
from smtprelay.model import Result, Status
from smtprelay.store import (
    AttemptRow,
    DeliveryPage,
    DeliveryQuery,
    DeliveryRow,
    InstanceRow,
    IStore,
    LastError,
    RecipientRow,
    Stats,
    StoreUnavailable,
    _sql,
)
from smtprelay.store.postgres import PostgresStore
from smtprelay.store.sqlite import SQLiteStore
from tests import pg
from tests.store_support import LEASE, NOW, envelope, transition


class StoreTests:
    """Mixed into a TestCase that defines make_store()."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.store = self.make_store()
        yield self.store.start(NOW)
        self.addCleanup(self.store.stop, NOW)

    def test_interface(self):
        verifyObject(IStore, self.store)

    @defer.inlineCallbacks
    def test_accept_then_read_body_byte_exact(self):
        env = envelope()
        body = [os.urandom(700_000), b"\r\n.\r\n", os.urandom(2_500_000)]
        yield self.store.accept(env, iter(body))
        f = yield self.store.read_body(env.id)
        self.assertEqual(f.read(), b"".join(body))
        d = yield self.store.delivery(env.id)
        self.assertIs(d.status, Status.QUEUED)
        self.assertEqual(d.size, sum(map(len, body)))
        self.assertEqual([r.address for r in d.recipients], ["a@x.org", "b@x.org"])
        self.assertEqual(d.attempts, ())

    @defer.inlineCallbacks
    def test_a_failing_body_stores_nothing(self):
        env = envelope()

        def body():
            yield b"first part"
            raise OSError(28, "No space left on device")

        with self.assertRaises(StoreUnavailable):
            yield self.store.accept(env, body())
        self.assertIsNone((yield self.store.delivery(env.id)))
        stats = yield self.store.stats(NOW)
        self.assertEqual(stats.received, 0)

    @defer.inlineCallbacks
    def test_concurrent_accepts_are_group_committed_and_all_stored(self):
        envs = [envelope(i) for i in range(200)]
        yield defer.gatherResults([self.store.accept(e, iter([b"x" * i])) for i, e in
                                   enumerate(envs)])
        stats = yield self.store.stats(NOW)
        self.assertEqual(stats.received, 200)
        self.assertEqual(stats.queued, 200)

    @defer.inlineCallbacks
    def test_claim_respects_due_time_concurrency_and_blocks(self):
        for i in range(6):
            yield self.store.accept(envelope(i, mailbox="busy@x.org"), iter([b"b"]))
        for i in range(2):
            yield self.store.accept(envelope(10 + i, mailbox="blocked@x.org"), iter([b"b"]))
        yield self.store.block_mailbox("blocked@x.org", NOW + 60)
        claims = yield self.store.claim(NOW + 1, 100, NOW + LEASE, 4)
        self.assertEqual(len(claims), 4)
        self.assertEqual({c.mailbox for c in claims}, {"busy@x.org"})
        self.assertEqual(claims[0].recipients, ("a@x.org", "b@x.org"))
        again = yield self.store.claim(NOW + 2, 100, NOW + LEASE, 4)
        self.assertEqual(again, [])
        later = yield self.store.claim(NOW + 61, 100, NOW + LEASE, 4)
        self.assertEqual({c.mailbox for c in later}, {"blocked@x.org"})

    @defer.inlineCallbacks
    def test_expired_leases_are_taken_over(self):
        env = envelope()
        yield self.store.accept(env, iter([b"b"]))
        [_c] = yield self.store.claim(NOW + 1, 10, NOW + 10, 4)
        self.assertEqual((yield self.store.claim(NOW + 5, 10, NOW + 20, 4)), [])
        [again] = yield self.store.claim(NOW + 11, 10, NOW + 30, 4)
        self.assertEqual(again.id, env.id)

    @defer.inlineCallbacks
    def test_finish_records_attempts_and_per_recipient_state(self):
        env = envelope()
        yield self.store.accept(env, iter([b"b"]))
        [_c] = yield self.store.claim(NOW + 1, 10, NOW + LEASE, 4)
        t = transition(Status.DEFERRED, NOW + 2, {
            "a@x.org": (Result.SENT, "250 ok"),
            "b@x.org": (Result.TEMPORARY, "451 later"),
        }, next_at=NOW + 62, outcome="partial", detail="1 of 2", error="451 later")
        self.assertTrue((yield self.store.finish(env.id, t)))
        d = yield self.store.delivery(env.id)
        self.assertIs(d.status, Status.DEFERRED)
        self.assertEqual(d.attempts_count, 1)
        self.assertEqual(d.next_attempt_at, NOW + 62)
        self.assertEqual([a.outcome for a in d.attempts], ["partial"])
        self.assertEqual(d.attempts[0].duration_ms, 12)
        [c2] = yield self.store.claim(NOW + 63, 10, NOW + LEASE, 4)
        self.assertEqual(c2.recipients, ("b@x.org",))
        self.assertEqual(c2.attempts, 1)
        t = transition(Status.SENT, NOW + 64, {"b@x.org": (Result.SENT, "250 ok")})
        yield self.store.finish(env.id, t)
        d = yield self.store.delivery(env.id)
        self.assertIs(d.status, Status.SENT)
        self.assertEqual(d.finished_at, NOW + 64)
        self.assertEqual({r.status for r in d.recipients}, {"sent"})

    @defer.inlineCallbacks
    def test_finish_without_the_lease_is_refused(self):
        env = envelope()
        yield self.store.accept(env, iter([b"b"]))
        yield self.store.claim(NOW + 1, 10, NOW + 10, 4)
        # another claim after the lease expired takes it over; the old owner's
        # outcome must not overwrite the new attempt
        yield self.store.claim(NOW + 11, 10, NOW + 100, 4)
        t = transition(Status.SENT, NOW + 12, {"a@x.org": (Result.SENT, "")})
        self.assertTrue((yield self.store.finish(env.id, t)))
        self.assertFalse((yield self.store.finish(env.id, t)))

    @defer.inlineCallbacks
    def test_direct_accept_is_leased_and_claim_one(self):
        env = envelope(mode="direct")
        yield self.store.accept(env, iter([b"b"]), lease_until=NOW + LEASE)
        self.assertEqual((yield self.store.claim(NOW + 1, 10, NOW + LEASE, 4)), [])
        c = yield self.store.claim_one(env.id, NOW + 1, NOW + LEASE)
        self.assertEqual(c.mode, "direct")

    @defer.inlineCallbacks
    def test_release_makes_due_at_once(self):
        env = envelope()
        yield self.store.accept(env, iter([b"b"]))
        yield self.store.claim(NOW + 1, 10, NOW + LEASE, 4)
        yield self.store.release([env.id], NOW + 2)
        [c] = yield self.store.claim(NOW + 2, 10, NOW + LEASE, 4)
        self.assertEqual(c.id, env.id)

    @defer.inlineCallbacks
    def test_requeue_and_cancel(self):
        env = envelope()
        yield self.store.accept(env, iter([b"b"]))
        yield self.store.claim(NOW + 1, 10, NOW + LEASE, 4)
        with self.assertRaises(ValueError):
            yield self.store.requeue(env.id, NOW + 2)  # in flight
        yield self.store.finish(env.id, transition(
            Status.FAILED, NOW + 2, {"a@x.org": (Result.SENT, "ok"),
                                     "b@x.org": (Result.PERMANENT, "550 no")},
            outcome="partial", error="550 no"))
        self.assertEqual((yield self.store.requeue(env.id, NOW + 3)), "failed")
        [c] = yield self.store.claim(NOW + 3, 10, NOW + LEASE, 4)
        self.assertEqual(c.recipients, ("b@x.org",))  # the one sent is not sent again
        self.assertEqual(c.age_from, NOW + 3)
        self.assertIsNone((yield self.store.requeue("nope", NOW)))
        env2 = envelope(1)
        yield self.store.accept(env2, iter([b"b"]))
        self.assertEqual((yield self.store.cancel(env2.id, NOW + 4, "cancelled by admin")),
                         "queued")
        d = yield self.store.delivery(env2.id)
        self.assertEqual((d.status, d.error), (Status.FAILED, "cancelled by admin"))
        self.assertEqual(d.attempts[-1].outcome, "cancelled")
        with self.assertRaises(ValueError):
            yield self.store.cancel(env2.id, NOW + 5, "again")

    @defer.inlineCallbacks
    def test_deliveries_filters_and_cursor(self):
        for i in range(25):
            yield self.store.accept(
                envelope(i, recipients=(f"r{i}@x.org",), subject=f"Invoice {i}",
                         mailbox="odd@x.org" if i % 2 else "even@x.org"), iter([b"b"]))
        page = yield self.store.deliveries(DeliveryQuery(limit=10))
        items, cursor = page.items, page.next_cursor
        self.assertEqual(len(items), 10)
        self.assertEqual(items[0].subject, "Invoice 24")  # newest first
        seen = [i.id for i in items]
        while cursor:
            page = yield self.store.deliveries(DeliveryQuery(limit=10, cursor=cursor))
            more, cursor = page.items, page.next_cursor
            seen += [i.id for i in more]
        self.assertEqual(len(seen), 25)
        self.assertEqual(seen, sorted(seen, reverse=True))
        items = (yield self.store.deliveries(DeliveryQuery(sender="ODD@"))).items
        self.assertEqual(len(items), 12)
        items = (yield self.store.deliveries(DeliveryQuery(recipient="r7@"))).items
        self.assertEqual([i.subject for i in items], ["Invoice 7"])
        items = (yield self.store.deliveries(DeliveryQuery(q="invoice 1"))).items
        self.assertEqual(len(items), 11)  # 1, 10..19
        items = (yield self.store.deliveries(DeliveryQuery(q="<3@x.org>"))).items
        self.assertEqual(len(items), 1)
        items = (yield self.store.deliveries(DeliveryQuery(q="100%_"))).items
        self.assertEqual(items, ())
        items = (yield self.store.deliveries(DeliveryQuery(status="sent"))).items
        self.assertEqual(items, ())
        items = (yield self.store.deliveries(DeliveryQuery(since=NOW + 0.020))).items
        self.assertEqual(len(items), 5)
        with self.assertRaises(ValueError):
            yield self.store.deliveries(DeliveryQuery(cursor="%%%"))

    @defer.inlineCallbacks
    def test_the_admin_reads_frozen_rows(self):
        env = envelope(recipients=("a@x.org", "b@x.org"))
        yield self.store.accept(env, iter([b"12345"]))
        yield self.store.claim(NOW + 1, 10, NOW + LEASE, 4)
        yield self.store.finish(env.id, transition(
            Status.DEFERRED, NOW + 2, {"a@x.org": (Result.SENT, "250 ok"),
                                       "b@x.org": (Result.TEMPORARY, "451 later")},
            next_at=NOW + 62, outcome="partial", detail="1 of 2", error="451 later"))
        row = DeliveryRow(
            id=env.id, status=Status.DEFERRED, received_at=env.received_at, finished_at=None,
            sender="s@x.org", original_sender="s@x.org", mailbox="s@x.org",
            header_from="s@x.org", subject="Hello", message_id="<0@x.org>", size=5,
            attempts_count=1, next_attempt_at=NOW + 62, error="451 later",
            client_address="127.0.0.1", auth_user=None, provider_id=None, mode="queue",
            helo="client",
            recipients=(RecipientRow("a@x.org", "sent", "250 ok"),
                        RecipientRow("b@x.org", "pending", "451 later")),
        )
        got = yield self.store.delivery(env.id)
        self.assertEqual(got, attr.evolve(row, attempts=(
            AttemptRow(at=NOW + 2, outcome="partial", detail="1 of 2", duration_ms=12,
                       instance="i"),)))
        self.assertIsInstance(got.status, Status)
        with self.assertRaises(attr.exceptions.FrozenInstanceError):
            got.status = Status.SENT
        page = yield self.store.deliveries(DeliveryQuery())
        self.assertEqual(page, DeliveryPage(items=(row,), next_cursor=None))  # no history
        self.assertIsInstance(page.items[0].status, Status)
        stats = yield self.store.stats(NOW + 3)
        self.assertEqual(stats, Stats(received=1, sent=0, failed=0, queued=0, deferred=1,
                                      active=0, last_error=LastError("1 of 2", NOW + 2, env.id),
                                      oldest_pending_at=env.received_at))
        self.assertEqual(stats.pending, 1)
        [me] = [r for r in (yield self.store.instances(NOW + 3))
                if r.id == self.store.instance_id]
        self.assertEqual(me, InstanceRow(
            id=self.store.instance_id, hostname=self.store.hostname, pid=self.store.pid,
            started_at=NOW, heartbeat_at=NOW, state="running", version=__version__,
            uptime_seconds=3.0, heartbeat_age_seconds=3.0))

    @defer.inlineCallbacks
    def test_an_active_delivery_reads_as_active(self):
        env = envelope()
        yield self.store.accept(env, iter([b"b"]), lease_until=NOW + LEASE)
        got = yield self.store.delivery(env.id)
        self.assertIs(got.status, Status.ACTIVE)
        page = yield self.store.deliveries(DeliveryQuery(status="queued"))
        self.assertEqual([r.id for r in page.items], [env.id])  # "queued" takes in flight too
        self.assertIs(page.items[0].status, Status.ACTIVE)
        self.assertEqual((yield self.store.stats(NOW)).active, 1)

    @defer.inlineCallbacks
    def test_stats_and_last_error(self):
        a, b = envelope(1), envelope(2)
        yield self.store.accept(a, iter([b"b"]))
        yield self.store.accept(b, iter([b"b"]))
        yield self.store.claim(NOW + 1, 10, NOW + LEASE, 4)
        yield self.store.finish(a.id, transition(Status.SENT, NOW + 2, {}))
        yield self.store.finish(b.id, transition(Status.DEFERRED, NOW + 3, {}, next_at=NOW + 9,
                                                 outcome="temporary", detail="503 busy"))
        s = yield self.store.stats(NOW + 4)
        self.assertEqual((s.received, s.sent, s.deferred, s.failed), (2, 1, 1, 0))
        self.assertEqual(s.last_error, LastError(message="503 busy", at=NOW + 3,
                                                 delivery_id=b.id))
        self.assertEqual(s.oldest_pending_at, b.received_at)

    @defer.inlineCallbacks
    def test_purge_removes_finished_rows_and_bodies(self):
        old, new = envelope(1), envelope(2)
        for e in (old, new):
            yield self.store.accept(e, iter([b"body"]))
        yield self.store.claim(NOW + 1, 10, NOW + LEASE, 4)
        yield self.store.finish(old.id, transition(Status.SENT, NOW + 2, {}))
        yield self.store.finish(new.id, transition(Status.DEFERRED, NOW + 2, {}, next_at=NOW + 5))
        self.assertEqual((yield self.store.purge(NOW + 3)), 1)
        self.assertIsNone((yield self.store.delivery(old.id)))
        with self.assertRaises(KeyError):
            yield self.store.read_body(old.id)
        self.assertIsNotNone((yield self.store.delivery(new.id)))

    @defer.inlineCallbacks
    def test_recover_expires_leases_of_dead_local_instances(self):
        env = envelope()
        yield self.store.accept(env, iter([b"b"]))
        yield self.store.claim(NOW + 1, 10, NOW + LEASE, 4)
        # a second store object on the same database plays the restarted process
        other = self.make_store()
        other.pid = 2 ** 22 + 17  # no such process
        yield other.start(NOW + 2)
        self.addCleanup(other.stop, NOW)
        # the first instance is alive: nothing is taken from it
        self.assertEqual((yield other.recover(NOW + 2)), [])
        self.assertEqual((yield other.claim(NOW + 2, 10, NOW + LEASE, 4)), [])
        # the first instance's process dies (its pid disappears)
        self.store.pid = 2 ** 22 + 18
        yield self.store.stop(NOW + 3)
        yield self._set_pid(other, self.store.instance_id, 2 ** 22 + 18)
        dead = yield other.recover(NOW + 3)
        self.assertEqual(dead, [self.store.instance_id])
        [c] = yield other.claim(NOW + 3, 10, NOW + LEASE, 4)
        self.assertEqual(c.id, env.id)

    def _set_pid(self, store, instance_id, pid):
        def run(conn):
            store.dialect.execute(conn,
                                  "UPDATE instances SET pid = ?, state = 'running' WHERE id = ?",
                                  (pid, instance_id))
        return store._write(run)

    @defer.inlineCallbacks
    def test_accept_and_claim_leases_while_the_mailbox_has_room(self):
        envelopes = [envelope(i, mailbox="m@x.org") for i in range(3)]
        claims = []
        for env in envelopes:
            claims.append((yield self.store.accept_and_claim(
                env, iter([b"body"]), NOW, NOW + LEASE, 2)))
        first, second, third = claims
        self.assertEqual((first.id, first.mailbox, first.recipients, first.attempts, first.size),
                         (envelopes[0].id, "m@x.org", ("a@x.org", "b@x.org"), 0, 4))
        self.assertIsNotNone(second)
        self.assertIsNone(third)  # two leased already: this one waits in the queue
        third_id = envelopes[2].id
        self.assertIs((yield self.store.delivery(third_id)).status, Status.QUEUED)
        # leased ones count for claims too (any instance)
        self.assertEqual((yield self.store.claim(NOW + 1, 10, NOW + LEASE, 2)), [])
        yield self.store.finish(first.id, transition(Status.SENT, NOW + 2, {
            "a@x.org": (Result.SENT, ""), "b@x.org": (Result.SENT, "")}))
        [next_one] = yield self.store.claim(NOW + 3, 10, NOW + LEASE, 2)
        self.assertEqual(next_one.id, third_id)

    @defer.inlineCallbacks
    def test_accept_and_claim_queues_for_a_blocked_mailbox(self):
        yield self.store.block_mailbox("m@x.org", NOW + 60)
        env = envelope(mailbox="m@x.org")
        self.assertIsNone((yield self.store.accept_and_claim(env, iter([b"b"]), NOW,
                                                             NOW + LEASE, 4)))
        [c] = yield self.store.claim(NOW + 61, 10, NOW + LEASE, 4)
        self.assertEqual(c.id, env.id)

    @defer.inlineCallbacks
    def test_claim_takes_the_oldest_first_across_states(self):
        old = envelope(1, mailbox="one@x.org")
        yield self.store.accept(old, iter([b"b"]))
        [_c] = yield self.store.claim(NOW + 1, 10, NOW + LEASE, 4)
        yield self.store.finish(old.id, transition(Status.DEFERRED, NOW + 2,
                                                   {"a@x.org": (Result.TEMPORARY, "")},
                                                   next_at=NOW + 3, outcome="deferred"))
        new = envelope(5000, mailbox="two@x.org")  # received at NOW + 5
        yield self.store.accept(new, iter([b"b"]))
        claims = yield self.store.claim(NOW + 10, 1, NOW + LEASE, 4)
        self.assertEqual([c.id for c in claims], [old.id])  # due at NOW + 3, before NOW + 5

    @defer.inlineCallbacks
    def test_instances_and_ping(self):
        yield self.store.ping()
        rows = yield self.store.instances(NOW)
        self.assertIn(self.store.instance_id, [r.id for r in rows])

    # -- several instances on one database --------------------------------------------

    @defer.inlineCallbacks
    def other_instance(self, now=NOW):
        """A second store on the same database: another relay instance."""
        other = self.make_store()
        yield other.start(now)
        self.addCleanup(other.stop, now)
        return other

    @defer.inlineCallbacks
    def test_instances_report_each_heartbeat_uptime_and_state(self):
        other = yield self.other_instance(NOW + 5)
        yield other.renew_leases(NOW + 50, NOW + 50 + LEASE)
        rows = {r.id: r for r in (yield self.store.instances(NOW + 60))}
        mine, theirs = rows[self.store.instance_id], rows[other.instance_id]
        self.assertEqual((mine.state, mine.started_at, mine.heartbeat_at),
                         ("running", NOW, NOW))
        self.assertEqual((mine.uptime_seconds, mine.heartbeat_age_seconds), (60, 60))
        self.assertEqual((theirs.heartbeat_at, theirs.heartbeat_age_seconds),
                         (NOW + 50, 10))
        self.assertEqual(theirs.uptime_seconds, 55)
        self.assertEqual(theirs.pid, other.pid)
        yield other.stop(NOW + 70)
        rows = {r.id: r for r in (yield self.store.instances(NOW + 100))}
        self.assertEqual(rows[other.instance_id].state, "stopped")
        self.assertEqual(rows[other.instance_id].uptime_seconds, 65)

    @defer.inlineCallbacks
    def test_an_expired_lease_is_taken_over_by_another_instance(self):
        other = yield self.other_instance()
        env = envelope()
        yield self.store.accept(env, iter([b"b"]))
        [_c] = yield self.store.claim(NOW + 1, 10, NOW + 10, 4)
        # the owner stops renewing (killed); until the lease ends nobody else may send
        self.assertEqual((yield other.claim(NOW + 9, 10, NOW + 40, 4)), [])
        self.assertIsNone((yield other.claim_one(env.id, NOW + 9, NOW + 40)))
        [taken] = yield other.claim(NOW + 11, 10, NOW + 40, 4)
        self.assertEqual((taken.id, taken.attempts), (env.id, 0))
        late = transition(Status.SENT, NOW + 12, {"a@x.org": (Result.SENT, "")})
        self.assertFalse((yield self.store.finish(env.id, late)))
        self.assertTrue((yield other.finish(env.id, late)))
        self.assertIs((yield self.store.delivery(env.id)).status, Status.SENT)

    @defer.inlineCallbacks
    def test_renewed_leases_are_not_taken_over(self):
        other = yield self.other_instance()
        env = envelope()
        yield self.store.accept(env, iter([b"b"]))
        yield self.store.claim(NOW + 1, 10, NOW + 10, 4)
        yield self.store.renew_leases(NOW + 8, NOW + 18)
        self.assertEqual((yield other.claim(NOW + 12, 10, NOW + 40, 4)), [])
        [c] = yield other.claim(NOW + 19, 10, NOW + 40, 4)
        self.assertEqual(c.id, env.id)

    @defer.inlineCallbacks
    def test_only_the_leases_named_are_renewed(self):
        other = yield self.other_instance()
        kept, dropped = envelope(1), envelope(2)
        for e in (kept, dropped):
            yield self.store.accept(e, iter([b"b"]))
        yield self.store.claim(NOW + 1, 10, NOW + 10, 4)
        # the instance no longer has ``dropped`` in hand (its outcome was lost)
        yield self.store.renew_leases(NOW + 8, NOW + 18, [kept.id])
        [c] = yield other.claim(NOW + 12, 10, NOW + 40, 4)
        self.assertEqual(c.id, dropped.id)
        rows = {r.id: r for r in (yield self.store.instances(NOW + 12))}
        self.assertEqual(rows[self.store.instance_id].heartbeat_at, NOW + 8)
        yield self.store.renew_leases(NOW + 9, NOW + 19, [])  # a heartbeat only

    @defer.inlineCallbacks
    def test_retry_after_and_concurrency_hold_across_instances(self):
        other = yield self.other_instance()
        for i in range(4):
            yield self.store.accept(envelope(i, mailbox="m@x.org"), iter([b"b"]))
            yield self.store.accept(envelope(10 + i, mailbox="slow@x.org"), iter([b"b"]))
        # one instance is told to wait: the other one waits too
        yield self.store.block_mailbox("slow@x.org", NOW + 100)
        mine = yield self.store.claim(NOW + 1, 1, NOW + LEASE, 2)
        theirs = yield other.claim(NOW + 1, 10, NOW + LEASE, 2)
        self.assertEqual([c.mailbox for c in mine + theirs], ["m@x.org"] * 2)
        # two in flight for m@x.org (one each): the limit of 2 is reached for both
        self.assertEqual((yield other.claim(NOW + 2, 10, NOW + LEASE, 2)), [])
        self.assertEqual((yield self.store.claim(NOW + 2, 10, NOW + LEASE, 2)), [])
        yield self.store.finish(mine[0].id, transition(Status.SENT, NOW + 3, {}))
        [next_one] = yield other.claim(NOW + 3, 10, NOW + LEASE, 2)
        self.assertEqual(next_one.mailbox, "m@x.org")
        # a shorter Retry-After never shortens a longer one
        yield other.block_mailbox("slow@x.org", NOW + 50)
        self.assertEqual((yield other.claim(NOW + 60, 10, NOW + LEASE, 2)), [])
        later = yield self.store.claim(NOW + 101, 10, NOW + LEASE, 10)
        self.assertEqual(sorted(c.mailbox for c in later), ["m@x.org"] + ["slow@x.org"] * 4)

    @defer.inlineCallbacks
    def test_instances_claiming_at_once_never_share_a_message(self):
        """Three instances claim and finish 240 messages as fast as they can:
        each message is claimed and finished once, and no mailbox ever has more
        than ``concurrency`` messages in flight over all instances."""
        stores = [self.store, (yield self.other_instance()), (yield self.other_instance())]
        mailboxes = [f"m{i}@x.org" for i in range(5)]
        envs = [envelope(i, mailbox=mailboxes[i % 5]) for i in range(240)]
        yield defer.gatherResults([self.store.accept(e, iter([b"b"])) for e in envs])
        concurrency = 3
        claimed, finished, held = [], [], {m: 0 for m in mailboxes}
        rng = random.Random(7)

        @defer.inlineCallbacks
        def run(store):
            idle = 0
            while idle < 3:
                now = NOW + 1
                claims = yield store.claim(now, rng.randint(1, 8), now + LEASE, concurrency)
                idle = 0 if claims else idle + 1
                for c in claims:
                    claimed.append(c.id)
                    held[c.mailbox] += 1
                    self.assertLessEqual(held[c.mailbox], concurrency, c.mailbox)
                # finish in a random order, in parallel; the count drops first (so
                # it never overstates what the database holds)
                rng.shuffle(claims)
                done = []
                for c in claims:
                    held[c.mailbox] -= 1
                    done.append(store.finish(c.id, transition(Status.SENT, now, {})))
                results = yield defer.gatherResults(done)
                self.assertTrue(all(results))
                finished.extend(c.id for c in claims)
                if not claims:
                    yield threads.deferToThread(lambda: None)

        yield defer.gatherResults([run(s) for s in stores for _ in range(2)])
        self.assertEqual(sorted(claimed), sorted(e.id for e in envs))
        self.assertEqual(sorted(finished), sorted(e.id for e in envs))
        stats = yield stores[2].stats(NOW + 2)
        self.assertEqual((stats.sent, stats.active, stats.queued), (240, 0, 0))

    # -- schema ------------------------------------------------------------------------

    def read_schema_version(self, store):
        return store._read(lambda c: _sql.fetchall(
            store.dialect, c, "SELECT version FROM schema_version"))

    @defer.inlineCallbacks
    def test_stores_starting_at_once_on_a_new_database_migrate_it_once(self):
        make = self.new_database()
        stores = [make() for _ in range(6)]
        for s in stores:
            self.addCleanup(s.stop, NOW)
        results = yield defer.DeferredList([s.start(NOW) for s in stores], consumeErrors=True)
        self.assertEqual([f.getErrorMessage() for ok, f in results if not ok], [])
        self.assertEqual((yield self.read_schema_version(stores[0])), [(_sql.SCHEMA_VERSION,)])
        running = [r.id for r in (yield stores[0].instances(NOW)) if r.state == "running"]
        self.assertEqual(sorted(running), sorted(s.instance_id for s in stores))
        yield defer.gatherResults([s.accept(envelope(i), iter([b"b"]))
                                   for i, s in enumerate(stores)])
        self.assertEqual((yield stores[-1].stats(NOW)).received, 6)

    @defer.inlineCallbacks
    def test_a_database_one_version_behind_is_migrated_keeping_its_rows(self):
        env = envelope()
        yield self.store.accept(env, iter([b"kept"]))
        newer = list(_sql.MIGRATIONS) + [[
            "ALTER TABLE messages ADD COLUMN note TEXT",
            "CREATE TABLE notes (message_id TEXT NOT NULL, data {blob})",
        ]]
        found = yield self.store._write(lambda c: _sql.migrate(self.store.dialect, c, newer))
        self.assertEqual(found, len(newer) - 1)
        self.assertEqual((yield self.read_schema_version(self.store)), [(len(newer),)])
        yield self.store._write(lambda c: self.store.dialect.execute(
            c, "INSERT INTO notes (message_id, data) VALUES (?, ?)",
            (env.id, self.store.dialect.to_blob(b"\x00\xff"))))
        rows = yield self.store._read(lambda c: _sql.fetchall(
            self.store.dialect, c, "SELECT note FROM messages WHERE id = ?", (env.id,)))
        self.assertEqual(rows, [(None,)])
        f = yield self.store.read_body(env.id)
        self.assertEqual(f.read(), b"kept")
        # migrating again changes nothing
        again = yield self.store._write(lambda c: _sql.migrate(self.store.dialect, c, newer))
        self.assertEqual(again, len(newer))

    @defer.inlineCallbacks
    def test_a_schema_newer_than_the_relay_stops_start_up(self):
        yield self.store._write(lambda c: self.store.dialect.execute(
            c, "UPDATE schema_version SET version = ?", (_sql.SCHEMA_VERSION + 1,)))
        late = self.make_store()
        with self.assertRaises(_sql.SchemaTooNew) as info:
            yield late.start(NOW)
        self.assertIn("upgrade the relay", str(info.exception))


class SQLiteStoreTests(StoreTests, unittest.TestCase):
    def make_store(self):
        if not hasattr(self, "_path"):
            self._path = os.path.join(tempfile.mkdtemp(), "relay.db")
        return SQLiteStore(self._path, reactor)

    def new_database(self):
        path = os.path.join(tempfile.mkdtemp(), "fresh.db")
        return lambda: SQLiteStore(path, reactor)

    def plan(self, statement):
        conn = sqlite3.connect(self._path)
        try:
            return " ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + statement,
                                                       [None] * statement.count("?")))
        finally:
            conn.close()

    def test_an_outcome_updates_recipients_by_primary_key(self):
        """Not through an index on the address: with many messages to one address
        (the usual case) that index made every outcome scan all of them."""
        plan = self.plan("UPDATE recipients SET status = ?, detail = ? WHERE message_id = ? "
                         "AND address = ? AND status = 'pending'")
        self.assertIn("sqlite_autoindex_recipients_1", plan)

    def test_a_claim_skips_busy_mailboxes_in_the_index(self):
        plan = self.plan("SELECT id FROM messages WHERE status = ? AND next_attempt_at <= ? "
                         "AND mailbox NOT IN (?, ?) ORDER BY next_attempt_at, id LIMIT ?")
        self.assertIn("messages_due", plan)
        self.assertNotIn("TEMP B-TREE FOR ORDER BY", plan)

    @defer.inlineCallbacks
    def test_a_version_1_database_is_migrated(self):
        from smtprelay.store import _sql

        path = os.path.join(tempfile.mkdtemp(), "v1.db")
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statement in _sql.MIGRATIONS[0]:
            conn.execute(statement.format(blob="BLOB"))
        conn.execute("INSERT INTO schema_version VALUES (1)")
        conn.close()
        store = SQLiteStore(path, reactor)
        yield store.start(NOW)
        yield store.stop(NOW)
        conn = sqlite3.connect(path)
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        version = conn.execute("SELECT version FROM schema_version").fetchone()[0]
        conn.close()
        self.assertEqual(version, _sql.SCHEMA_VERSION)
        self.assertNotIn("recipients_address", indexes)
        self.assertIn("messages_due", indexes)

    @defer.inlineCallbacks
    def test_full_disk_gives_store_unavailable_then_recovers(self):
        """SQLITE_FULL (what a full disk gives) for the next write: nothing half-stored."""

        def cap(conn, pages=None):
            cur = conn.execute("PRAGMA page_count")
            count = cur.fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages or count}")

        yield self.store._write(cap)
        env = envelope()
        with self.assertRaises(StoreUnavailable) as info:
            yield self.store.accept(env, iter([os.urandom(200_000)]))
        self.assertIn("full", str(info.exception))
        yield self.store._write(lambda c: cap(c, 1 << 30))
        self.assertIsNone((yield self.store.delivery(env.id)))
        yield self.store.accept(env, iter([b"now it fits"]))
        f = yield self.store.read_body(env.id)
        self.assertEqual(f.read(), b"now it fits")


class PostgresStoreTests(StoreTests, unittest.TestCase):
    """The same suite on PostgreSQL, each test on a database of its own."""

    def setUp(self):
        def skip(reason):
            raise unittest.SkipTest(reason)

        pg.require_postgres(skip, self.fail)
        return super().setUp()

    def _database(self):
        db = pg.TempDatabase()
        self.addCleanup(db.drop)
        return db

    def make_store(self):
        if not hasattr(self, "_db"):
            self._db = self._database()
        return PostgresStore(self._db.url, reactor)

    def new_database(self):
        db = self._database()
        return lambda: PostgresStore(db.url, reactor)

    # -- what only a server can do: go away ------------------------------------------------

    @defer.inlineCallbacks
    def test_a_connection_lost_mid_accept_is_a_451_and_the_writer_reconnects(self):
        env = envelope()
        writer_pid = self.store._writer._conn.info.backend_pid
        ended = []

        def body():
            yield os.urandom(100_000)
            # the server ends the writer's session while the message is half stored
            ended.append(self._db.query("SELECT pg_terminate_backend(?)", (writer_pid,)))
            yield os.urandom(100_000)

        with self.assertRaises(StoreUnavailable) as info:
            yield self.store.accept(env, body())
        self.assertEqual(ended, [[(True,)]])
        self.assertIn("terminating connection", str(info.exception))
        # nothing half-stored, and the next message is stored on a new connection
        self.assertIsNone((yield self.store.delivery(env.id)))
        yield self.store.accept(env, iter([b"second try"]))
        f = yield self.store.read_body(env.id)
        self.assertEqual(f.read(), b"second try")
        self.assertEqual(self.store._writer.reconnects, 1)
        self.assertNotEqual(self.store._writer._conn.info.backend_pid, writer_pid)

    @defer.inlineCallbacks
    def test_sessions_ended_while_idle_are_replaced_unnoticed(self):
        env = envelope()
        yield self.store.accept(env, iter([b"b"]))
        yield self.store.stats(NOW)
        ended = yield threads.deferToThread(self._db.terminate)
        self.assertGreaterEqual(ended, 2)  # the writer and a reader at least
        # a failover or a restart of the server between two messages costs nothing
        yield self.store.accept(envelope(1), iter([b"b"]))
        self.assertEqual((yield self.store.stats(NOW)).received, 2)
        [c] = yield self.store.claim(NOW + 1, 1, NOW + LEASE, 4)
        f = yield self.store.read_body(c.id)
        self.assertEqual(f.read(), b"b")

    @defer.inlineCallbacks
    def test_a_server_that_is_gone_is_store_unavailable_until_it_is_back(self):
        yield self.store.accept(envelope(), iter([b"b"]))
        url = self.store.url
        # the server goes away (a port where nothing listens) and its sessions end
        self.store.url = pg.url_for(url, host="127.0.0.1", port=1, connect_timeout=2)
        yield threads.deferToThread(self._db.terminate)
        for n in range(3):
            with self.assertRaises(StoreUnavailable):
                yield self.store.accept(envelope(10 + n), iter([b"b"]))
        with self.assertRaises(StoreUnavailable):
            yield self.store.stats(NOW)
        with self.assertRaises(StoreUnavailable):
            yield self.store.ping()
        # the server is back: writes and reads work again without a restart
        self.store.url = url
        self.store._writer._connect_after = 0  # no need to wait for the next attempt
        yield self.store.accept(envelope(20), iter([b"b"]))
        yield self.store.ping()
        self.assertEqual((yield self.store.stats(NOW)).received, 2)
