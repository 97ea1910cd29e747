"""The queue runner against a real SQLite store, with an injected clock:
retry schedules of days run in milliseconds.  The provider is a scripted
stand-in at the IProvider boundary (the real providers have their own suites)."""

import attr
from twisted.internet import defer

from smtprelay.config import Config, DatabaseConfig, DeliveryConfig
from smtprelay.model import Outcome, Status
from smtprelay.store import DeliveryQuery
from tests.queue_support import T0, QueueHarness, ScriptedProvider
from tests.store_support import envelope


class QueueTests(QueueHarness):
    @defer.inlineCallbacks
    def test_accepted_message_is_delivered_on_wake(self):
        provider = ScriptedProvider()
        r = self.runner(provider)
        env = yield self.accept()
        r.wake()
        yield self.settle()
        self.assertEqual((yield self.status(env)), "sent")
        [(mid, _mailbox, recipients, body)] = provider.calls
        self.assertEqual((mid, recipients), (env.id, env.recipients))
        self.assertEqual(body, b"Subject: x\r\n\r\nbody 0\r\n")

    @defer.inlineCallbacks
    def test_temporary_failures_follow_the_schedule(self):
        provider = ScriptedProvider([Outcome.temporary("503 busy"), Outcome.temporary("503 busy"),
                                     Outcome.sent("202")])
        r = self.runner(provider)
        env = yield self.accept()
        r.wake()
        yield self.settle()
        self.assertEqual(len(provider.calls), 1)
        yield self.advance(59)
        self.assertEqual(len(provider.calls), 1)
        yield self.advance(2)
        self.assertEqual(len(provider.calls), 2)
        yield self.advance(290)
        self.assertEqual(len(provider.calls), 2)
        yield self.advance(15)
        self.assertEqual(len(provider.calls), 3)
        d = yield self.store.delivery(env.id)
        self.assertIs(d.status, Status.SENT)
        self.assertEqual([a.outcome for a in d.attempts], ["temporary", "temporary", "sent"])

    @defer.inlineCallbacks
    def test_retry_after_holds_the_whole_mailbox(self):
        provider = ScriptedProvider([Outcome.temporary("429 throttled", not_before=T0 + 120,
                                                       mailbox_wide=True)])
        r = self.runner(provider, concurrency=1)
        a = yield self.accept(1, mailbox="m@x.org")
        # a is due a millisecond after T0; its 429 must be recorded before the others
        # arrive (with c due at the same poll, the two would race for the 429)
        yield self.advance(1)
        for _ in range(100):
            if (yield self.status(a)) == "deferred":
                break
            yield self.settle()
        self.assertEqual([call[1] for call in provider.calls], ["m@x.org"])
        b = yield self.accept(2, mailbox="m@x.org")
        c = yield self.accept(3, mailbox="other@x.org")
        r.wake()
        yield self.advance(60)
        # the other mailbox went; this one waits even for its other message
        self.assertEqual([call[1] for call in provider.calls], ["m@x.org", "other@x.org"])
        self.assertEqual((yield self.status(b)), "queued")
        yield self.advance(65)
        self.assertEqual((yield self.status(a)), "sent")
        self.assertEqual((yield self.status(b)), "sent")
        self.assertEqual((yield self.status(c)), "sent")

    @defer.inlineCallbacks
    def test_concurrency_per_mailbox(self):
        provider = ScriptedProvider(["hang"] * 6)
        r = self.runner(provider, concurrency=2)
        for i in range(4):
            yield self.accept(i, mailbox="busy@x.org")
        yield self.accept(9, mailbox="free@x.org")
        r.wake()
        yield self.advance(3)
        mailboxes = [c[1] for c in provider.calls]
        self.assertEqual(sorted(mailboxes), ["busy@x.org", "busy@x.org", "free@x.org"])
        for d in provider.hanging:
            d.callback(Outcome.sent("ok"))
        yield self.advance(3)
        self.assertEqual(len(provider.calls), 5)
        for d in provider.hanging[3:]:
            d.callback(Outcome.sent("ok"))
        yield self.settle()
        stats = yield self.store.stats(self.clock.seconds())
        self.assertEqual(stats.sent, 5)

    @defer.inlineCallbacks
    def test_max_age_fails_for_good(self):
        provider = ScriptedProvider(default=Outcome.temporary("connection refused"))
        r = self.runner(provider, retry=(3600.0,), max_age=3 * 3600.0)
        env = yield self.accept()
        r.wake()
        yield self.advance(4 * 3600, step=600)
        d = yield self.store.delivery(env.id)
        self.assertIs(d.status, Status.FAILED)
        self.assertEqual(d.attempts[-1].outcome, "expired")
        self.assertIn("connection refused", d.error)
        self.assertEqual(len(provider.calls), 4)  # 0h, 1h, 2h, and the last one at 3h

    @defer.inlineCallbacks
    def test_permanent_failure_fails_at_once(self):
        provider = ScriptedProvider([Outcome.permanent("404 ErrorInvalidUser")])
        r = self.runner(provider)
        env = yield self.accept()
        r.wake()
        yield self.settle()
        d = yield self.store.delivery(env.id)
        self.assertEqual((d.status, d.error), (Status.FAILED, "404 ErrorInvalidUser"))

    @defer.inlineCallbacks
    def test_a_provider_exception_is_a_temporary_failure(self):
        provider = ScriptedProvider([RuntimeError("boom")])
        r = self.runner(provider)
        env = yield self.accept()
        r.wake()
        yield self.settle()
        d = yield self.store.delivery(env.id)
        self.assertIs(d.status, Status.DEFERRED)
        self.assertIn("internal error in the scripted provider: RuntimeError", d.error)
        self.flushLoggedErrors(RuntimeError)

    @defer.inlineCallbacks
    def test_a_provider_that_never_answers_is_cut_off_as_ambiguous(self):
        provider = ScriptedProvider(default="hang")
        r = self.runner(provider)
        env = yield self.accept()
        r.wake()
        yield self.settle()
        self.assertEqual(len(provider.calls), 1)
        yield self.advance(101, step=10)
        d = yield self.store.delivery(env.id)
        self.assertIs(d.status, Status.DEFERRED)
        self.assertIn("may have been sent", d.error)

    @defer.inlineCallbacks
    def test_stop_releases_leases_of_unfinished_deliveries(self):
        provider = ScriptedProvider(["hang"])
        r = self.runner(provider)
        env = yield self.accept()
        r.wake()
        yield self.settle()
        stopping = r.stopService(grace=5)
        yield self.advance(6)
        yield stopping
        d = yield self.store.delivery(env.id)
        self.assertIs(d.status, Status.QUEUED)
        [claim] = yield self.store.claim(self.clock.seconds(), 10, self.clock.seconds() + 60, 4)
        self.assertEqual(claim.id, env.id)

    # -- hand-off: a message just accepted goes out without a claim ------------------------

    @defer.inlineCallbacks
    def hand_off(self, r, n, mailbox="s@x.org", data=None):
        """What the SMTP side does at end of data in queue mode -> (envelope, claim)."""
        now = self.clock.seconds()
        env = envelope(n, now=now - 1, mailbox=mailbox)  # received at most a second ago
        reserved = r.reserve(env.mailbox)
        claim = None
        try:
            if reserved:
                claim = yield self.store.accept_and_claim(
                    env, iter([b"stored %d" % n]), now, now + 300, r.delivery.concurrency)
            else:
                yield self.store.accept(env, iter([b"stored %d" % n]))
        finally:
            if reserved and claim is None:
                r.unreserve()
        if claim is not None:
            r.take(claim, data)
        else:
            r.queued(env.mailbox)
        return env, claim

    @defer.inlineCallbacks
    def test_a_handed_off_message_is_sent_from_memory_without_a_claim(self):
        provider = ScriptedProvider()
        r = self.runner(provider)
        yield self.settle()  # the first claim finds the queue empty
        reads = []
        original = self.store.read_body
        self.store.read_body = lambda mid: reads.append(mid) or original(mid)
        env, claim = yield self.hand_off(r, 1, data=b"from memory")
        self.assertIsNotNone(claim)
        yield self.settle()
        self.assertEqual((yield self.status(env)), "sent")
        self.assertEqual(provider.calls[0][3], b"from memory")
        self.assertEqual(reads, [])
        # without bytes in memory the stored body is read
        env, claim = yield self.hand_off(r, 2)
        yield self.settle()
        self.assertEqual(provider.calls[1][3], b"stored 2")

    @defer.inlineCallbacks
    def test_no_hand_off_past_the_mailbox_concurrency_or_a_waiting_queue(self):
        provider = ScriptedProvider(["hang"] * 3)
        r = self.runner(provider, concurrency=2)
        yield self.settle()
        first, c1 = yield self.hand_off(r, 1)
        second, c2 = yield self.hand_off(r, 2)
        yield self.settle()
        third, c3 = yield self.hand_off(r, 3)
        self.assertIsNotNone(c1)
        self.assertIsNotNone(c2)
        self.assertIsNone(c3)  # the mailbox's two slots are taken: queued
        # while something waits in the store, later messages queue behind it
        self.assertFalse(r.reserve("other@x.org"))
        for d in provider.hanging:
            d.callback(Outcome.sent("ok"))
        yield self.settle()
        for d in provider.hanging[2:]:
            d.callback(Outcome.sent("ok"))
        yield self.settle()
        for env in (first, second, third):
            self.assertEqual((yield self.status(env)), "sent")
        self.assertTrue(r.reserve("other@x.org"))  # the queue is empty again
        r.unreserve()


class ApplyTests(QueueHarness):
    """A new configuration and a new provider, handed to a running runner."""

    def test_apply_takes_the_delivery_settings_and_retention(self):
        r = self.runner(ScriptedProvider(), concurrency=2)
        delivery = DeliveryConfig(retry=(5.0,), max_age=60.0, concurrency=3)
        r.apply(Config(delivery=delivery, database=DatabaseConfig(retention=10.0)))
        self.assertIs(r.delivery, delivery)
        self.assertEqual(r.limiter.concurrency, 3)
        self.assertEqual(r.claim_limit, 3)
        self.assertEqual(r.retention, 10.0)

    @defer.inlineCallbacks
    def test_apply_resizes_a_mailbox_already_sending(self):
        provider = ScriptedProvider(["hang"] * 4)
        r = self.runner(provider, claim_ahead=True, concurrency=1)
        for i in range(4):
            yield self.accept(i, mailbox="m@x.org")
        self.clock.advance(1)  # all due
        r.wake()
        yield self.settle()
        # one call; the next message claimed, read, and waiting for the mailbox's slot
        self.assertEqual(len(provider.calls), 1)
        self.assertEqual(r.limiter.waiting(), 1)
        r.apply(Config(delivery=attr.evolve(r.delivery, concurrency=2)))
        yield self.settle()
        # the waiting one goes at once: the first call has not finished
        self.assertEqual(len(provider.calls), 2)
        self.assertEqual(r.limiter.in_flight("m@x.org"), 2)
        self.assertFalse(any(d.called for d in provider.hanging))
        for d in provider.hanging:
            d.callback(Outcome.sent("ok"))
        yield self.advance(3)
        for d in provider.hanging[2:]:
            d.callback(Outcome.sent("ok"))
        yield self.settle()
        stats = yield self.store.stats(self.clock.seconds())
        self.assertEqual(stats.sent, 4)

    @defer.inlineCallbacks
    def test_apply_with_a_smaller_concurrency_lets_no_new_call_in_until_enough_ended(self):
        provider = ScriptedProvider(["hang"] * 4)
        r = self.runner(provider, claim_ahead=True, concurrency=2)
        for i in range(4):
            yield self.accept(i, mailbox="m@x.org")
        self.clock.advance(1)
        r.wake()
        yield self.settle()
        self.assertEqual(len(provider.calls), 2)
        r.apply(Config(delivery=attr.evolve(r.delivery, concurrency=1)))
        provider.hanging[0].callback(Outcome.sent("ok"))
        yield self.settle()
        self.assertEqual(len(provider.calls), 2)  # still one in flight: the new limit
        provider.hanging[1].callback(Outcome.sent("ok"))
        yield self.settle()
        self.assertEqual(len(provider.calls), 3)
        self.assertEqual(r.limiter.in_flight("m@x.org"), 1)

    @defer.inlineCallbacks
    def test_switch_provider_fires_with_the_old_one_once_its_deliveries_settled(self):
        old = ScriptedProvider(["hang"])
        r = self.runner(old)
        first = yield self.accept(0)
        r.wake()
        yield self.settle()
        self.assertEqual(len(old.calls), 1)
        new = ScriptedProvider()
        settled = []
        r.switch_provider(new).addCallback(settled.append)
        self.assertIs(r.provider, new)
        second = yield self.accept(1, mailbox="other@x.org")
        self.clock.advance(1)  # due
        r.wake()
        yield self.settle()
        self.assertEqual([c[0] for c in new.calls], [second.id])
        self.assertEqual(settled, [])  # the old provider still has a call in flight
        old.hanging[0].callback(Outcome.sent("ok"))
        yield self.settle()
        self.assertEqual(settled, [old])
        self.assertEqual((yield self.status(first)), "sent")
        self.assertEqual((yield self.status(second)), "sent")

    @defer.inlineCallbacks
    def test_switch_provider_counts_a_call_that_raised_as_settled(self):
        old = ScriptedProvider(["hang"])
        r = self.runner(old)
        yield self.accept(0)
        r.wake()
        yield self.settle()
        settled = []
        r.switch_provider(ScriptedProvider()).addCallback(settled.append)
        old.hanging[0].errback(RuntimeError("boom"))
        yield self.settle()
        self.assertEqual(settled, [old])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_switch_provider_with_nothing_in_flight_fires_at_once(self):
        old = ScriptedProvider()
        r = self.runner(old)
        settled = []
        r.switch_provider(ScriptedProvider()).addCallback(settled.append)
        self.assertEqual(settled, [old])


class ClaimAheadTests(QueueHarness):
    """A relay that owns its database claims the next messages of a mailbox
    while the provider works; the provider still sees at most `concurrency`."""

    @defer.inlineCallbacks
    def states(self):
        page = yield self.store.deliveries(DeliveryQuery(limit=50))
        return sorted(str(i.status) for i in page.items)

    @defer.inlineCallbacks
    def test_the_next_message_waits_claimed_and_read(self):
        provider = ScriptedProvider(["hang", "hang", "hang"])
        r = self.runner(provider, claim_ahead=True, concurrency=1)
        for i in range(3):
            yield self.accept(i, mailbox="m@x.org")
        self.clock.advance(1)  # all three due
        r.wake()
        yield self.settle()
        self.assertEqual(len(provider.calls), 1)
        self.assertEqual((yield self.states()), ["active", "active", "queued"])
        provider.hanging[0].callback(Outcome.sent("ok"))
        yield self.settle()
        self.assertEqual(len(provider.calls), 2)
        self.assertEqual((yield self.states()), ["active", "active", "sent"])

    @defer.inlineCallbacks
    def test_without_claim_ahead_the_lease_count_is_the_bound(self):
        provider = ScriptedProvider(["hang", "hang", "hang"])
        r = self.runner(provider, claim_ahead=False, concurrency=1)
        for i in range(3):
            yield self.accept(i, mailbox="m@x.org")
        self.clock.advance(1)  # all three due
        r.wake()
        yield self.settle()
        self.assertEqual(len(provider.calls), 1)
        self.assertEqual((yield self.states()), ["active", "queued", "queued"])
