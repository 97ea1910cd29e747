"""Shared by the queue runner's and the intake's tests: a real SQLite store in a
temporary folder, a fake clock, and a scripted provider at the IProvider boundary.

``ScriptedProvider`` answers from a script; ``QueueHarness`` is a trial TestCase
base with the store, the clock, a ``runner()`` factory, ``settle()`` /
``advance()`` (let store threads and the fake clock take turns until nothing is
left to do), a count of the store calls made, and direct SQL on the store's file
for what the store's public API does not show (leases, the body chunks).
"""

import collections
import os
import sqlite3
import tempfile

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest
from zope.interface import implementer

from smtprelay.config import DeliveryConfig
from smtprelay.model import Outcome, Status
from smtprelay.providers.base import CheckResult, IProvider, ProviderBase
from smtprelay.queue import QueueRunner
from smtprelay.store.sqlite import SQLiteStore
from tests.store_support import envelope

T0 = 1_800_000_000.0


@implementer(IProvider)
class ScriptedProvider(ProviderBase):
    """Answers from a script: an Outcome, an exception, or "hang" (a Deferred
    the test fires); records what it was given."""

    type = "scripted"
    timeout = 5.0

    def __init__(self, script=(), default=None):
        self.script = list(script)
        self.default = default or Outcome.sent("ok")
        self.calls = []
        self.hanging = []

    def send(self, message):
        self.calls.append((message.id, message.mailbox, message.recipients, message.body.read()))
        step = self.script.pop(0) if self.script else self.default
        if step == "hang":
            d = defer.Deferred()
            self.hanging.append(d)
            return d
        if isinstance(step, Exception):
            raise step
        return defer.succeed(step)

    def check(self):
        return defer.succeed(CheckResult(()))


class QueueHarness(unittest.TestCase):
    """A real SQLite store, a fake clock, a scripted provider."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.store = SQLiteStore(os.path.join(tempfile.mkdtemp(), "q.db"), reactor)
        yield self.store.start(T0)
        self.addCleanup(self.store.stop, T0)
        self._count_store_calls()

    def _count_store_calls(self):
        """Count the store calls still running, so that settle() waits for the
        store's threads by what they do, not by how long they usually take; and
        every call made, by name (``store_counts``)."""
        self.store_calls = 0
        self.store_counts = collections.Counter()
        for name in ("claim", "claim_one", "read_body", "finish", "renew_leases", "release",
                     "block_mailbox", "recover", "accept", "accept_and_claim", "purge"):
            original = getattr(self.store, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                self.store_counts[_name] += 1
                self.store_calls += 1
                d = _original(*args, **kwargs)

                def done(result):
                    self.store_calls -= 1
                    return result

                return d.addBoth(done)

            setattr(self.store, name, counted)

    def runner(self, provider, claim_ahead=False, max_in_flight=128, metrics=None, **delivery):
        d = DeliveryConfig(**{"retry": (60.0, 300.0), "max_age": 86400.0, "concurrency": 2,
                              **delivery})
        r = QueueRunner(self.store, provider, d, self.clock, max_in_flight=max_in_flight,
                        poll_interval=1.0, metrics=metrics, claim_ahead=claim_ahead)
        r.startService()
        self.addCleanup(lambda: r.stopService(grace=0) if r.running else None)
        self.r, self.provider = r, provider
        return r

    def quiet(self):
        """Nothing left to do until the fake clock moves: no claim in progress,
        no wake-up due now, and every delivery in flight waits on the provider
        (or for a provider slot of its mailbox)."""
        r = self.r
        hanging = sum(1 for d in self.provider.hanging if not d.called)
        waiting = r.limiter.waiting()
        return (self.store_calls == 0 and r._polling is None
                and len(r._in_flight) <= hanging + waiting
                and not (r._wake_call is not None and r._wake_call.active()))

    @defer.inlineCallbacks
    def settle(self):
        """Let store threads and the fake clock take turns until quiet (real
        time is only waited on while store threads work)."""
        calm = 0
        for _ in range(2000):
            self.clock.advance(0)
            yield task.deferLater(reactor, 0.002, lambda: None)
            calm = calm + 1 if self.quiet() else 0
            if calm >= 5:
                return
        raise AssertionError("the queue did not settle")

    @defer.inlineCallbacks
    def advance(self, seconds, step=1.0):
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            self.clock.advance(min(step, end - self.clock.seconds()))
            yield self.settle()

    @defer.inlineCallbacks
    def accept(self, n=0, **kw):
        env = envelope(n, now=self.clock.seconds(), **kw)
        yield self.store.accept(env, iter([b"Subject: x\r\n\r\nbody %d\r\n" % n]))
        return env

    @defer.inlineCallbacks
    def status(self, env):
        d = yield self.store.delivery(env.id)
        # as the admin API shows it: a message in flight is still queued
        return str(Status.QUEUED if d.status is Status.ACTIVE else d.status)

    # -- the store's file, read and changed beside the store ------------------------------

    def sql(self, statement, args=()):
        """Run one statement on the store's SQLite file on a connection of its own
        (in a thread) -> Deferred[all rows]."""

        def run():
            conn = sqlite3.connect(self.store.path, timeout=30.0, isolation_level=None)
            try:
                return conn.execute(statement, args).fetchall()
            finally:
                conn.close()

        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def lease(self, message_id):
        """-> (status, lease_owner, lease_until) of a stored message, as stored."""
        [row] = yield self.sql(
            "SELECT status, lease_owner, lease_until FROM messages WHERE id = ?", (message_id,))
        return row
