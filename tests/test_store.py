"""The store suite: every IStore implementation must pass it (SQLite here;
PostgreSQL runs the same class with its own ``make_store``)."""

import os
import sqlite3
import tempfile

from twisted.internet import defer, reactor
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from smtprelay.model import Attempt, Envelope, Result, Status, Transition, new_message_id
from smtprelay.store import IStore, StoreUnavailable
from smtprelay.store._sql import DeliveryQuery
from smtprelay.store.sqlite import SQLiteStore

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
        self.assertEqual(d["status"], "queued")
        self.assertEqual(d["size"], sum(map(len, body)))
        self.assertEqual(d["recipients"], ["a@x.org", "b@x.org"])
        self.assertEqual(d["attempts"], [])

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
        self.assertEqual(stats["received"], 0)

    @defer.inlineCallbacks
    def test_concurrent_accepts_are_group_committed_and_all_stored(self):
        envs = [envelope(i) for i in range(200)]
        yield defer.gatherResults([self.store.accept(e, iter([b"x" * i])) for i, e in
                                   enumerate(envs)])
        stats = yield self.store.stats(NOW)
        self.assertEqual(stats["received"], 200)
        self.assertEqual(stats["queued"], 200)

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
        [c] = yield self.store.claim(NOW + 1, 10, NOW + 10, 4)
        self.assertEqual((yield self.store.claim(NOW + 5, 10, NOW + 20, 4)), [])
        [again] = yield self.store.claim(NOW + 11, 10, NOW + 30, 4)
        self.assertEqual(again.id, env.id)

    @defer.inlineCallbacks
    def test_finish_records_attempts_and_per_recipient_state(self):
        env = envelope()
        yield self.store.accept(env, iter([b"b"]))
        [c] = yield self.store.claim(NOW + 1, 10, NOW + LEASE, 4)
        t = transition(Status.DEFERRED, NOW + 2, {
            "a@x.org": (Result.SENT, "250 ok"),
            "b@x.org": (Result.TEMPORARY, "451 later"),
        }, next_at=NOW + 62, outcome="partial", detail="1 of 2", error="451 later")
        self.assertTrue((yield self.store.finish(env.id, t)))
        d = yield self.store.delivery(env.id)
        self.assertEqual(d["status"], "deferred")
        self.assertEqual(d["attempts_count"], 1)
        self.assertEqual(d["next_attempt_at"], NOW + 62)
        self.assertEqual([a["outcome"] for a in d["attempts"]], ["partial"])
        self.assertEqual(d["attempts"][0]["duration_ms"], 12)
        [c2] = yield self.store.claim(NOW + 63, 10, NOW + LEASE, 4)
        self.assertEqual(c2.recipients, ("b@x.org",))
        self.assertEqual(c2.attempts, 1)
        t = transition(Status.SENT, NOW + 64, {"b@x.org": (Result.SENT, "250 ok")})
        yield self.store.finish(env.id, t)
        d = yield self.store.delivery(env.id)
        self.assertEqual(d["status"], "sent")
        self.assertEqual(d["finished_at"], NOW + 64)
        self.assertEqual({r["status"] for r in d["recipient_status"]}, {"sent"})

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
        self.assertEqual((d["status"], d["error"]), ("failed", "cancelled by admin"))
        self.assertEqual(d["attempts"][-1]["outcome"], "cancelled")
        with self.assertRaises(ValueError):
            yield self.store.cancel(env2.id, NOW + 5, "again")

    @defer.inlineCallbacks
    def test_deliveries_filters_and_cursor(self):
        for i in range(25):
            yield self.store.accept(
                envelope(i, recipients=(f"r{i}@x.org",), subject=f"Invoice {i}",
                         mailbox="odd@x.org" if i % 2 else "even@x.org"), iter([b"b"]))
        items, cursor = yield self.store.deliveries(DeliveryQuery(limit=10))
        self.assertEqual(len(items), 10)
        self.assertEqual(items[0]["subject"], "Invoice 24")  # newest first
        seen = [i["id"] for i in items]
        while cursor:
            more, cursor = yield self.store.deliveries(DeliveryQuery(limit=10, cursor=cursor))
            seen += [i["id"] for i in more]
        self.assertEqual(len(seen), 25)
        self.assertEqual(seen, sorted(seen, reverse=True))
        items, _ = yield self.store.deliveries(DeliveryQuery(sender="ODD@"))
        self.assertEqual(len(items), 12)
        items, _ = yield self.store.deliveries(DeliveryQuery(recipient="r7@"))
        self.assertEqual([i["subject"] for i in items], ["Invoice 7"])
        items, _ = yield self.store.deliveries(DeliveryQuery(q="invoice 1"))
        self.assertEqual(len(items), 11)  # 1, 10..19
        items, _ = yield self.store.deliveries(DeliveryQuery(q="<3@x.org>"))
        self.assertEqual(len(items), 1)
        items, _ = yield self.store.deliveries(DeliveryQuery(q="100%_"))
        self.assertEqual(items, [])
        items, _ = yield self.store.deliveries(DeliveryQuery(status="sent"))
        self.assertEqual(items, [])
        items, _ = yield self.store.deliveries(DeliveryQuery(since=NOW + 0.020))
        self.assertEqual(len(items), 5)
        with self.assertRaises(ValueError):
            yield self.store.deliveries(DeliveryQuery(cursor="%%%"))

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
        self.assertEqual((s["received"], s["sent"], s["deferred"], s["failed"]), (2, 1, 1, 0))
        self.assertEqual(s["last_error"], {"message": "503 busy", "at": NOW + 3,
                                           "delivery_id": b.id})
        self.assertEqual(s["oldest_pending_at"], b.received_at)

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
        from smtprelay.store import _sql

        def run(conn):
            store.dialect.execute(conn, "UPDATE instances SET pid = ?, state = 'running' WHERE id = ?",
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
        self.assertEqual((yield self.store.delivery(third_id))["state"], "queued")
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
        [c] = yield self.store.claim(NOW + 1, 10, NOW + LEASE, 4)
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
        self.assertIn(self.store.instance_id, [r["id"] for r in rows])


class SQLiteStoreTests(StoreTests, unittest.TestCase):
    def make_store(self):
        if not hasattr(self, "_path"):
            self._path = os.path.join(tempfile.mkdtemp(), "relay.db")
        return SQLiteStore(self._path, reactor, provider_type="outbox")

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
