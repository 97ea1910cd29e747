"""The intake (smtprelay.intake) on the real road: a SQLite store in a temporary folder
and the queue runner on a fake clock, with a scripted provider at the IProvider boundary
(tests/queue_support.py); and the reply table (smtprelay.replies) against the
contract's raw bytes."""

from email.utils import formatdate

import pytest
from twisted.internet import defer, reactor

from smtprelay import replies
from smtprelay.config import parse
from smtprelay.intake import AuthUser, Intake, NotStored, Prepared, Transaction, direct_reply
from smtprelay.metrics import Metrics
from smtprelay.model import Attempt, Outcome, Result, Status, Transition
from smtprelay.smtp.spool import MessageSpool
from smtprelay.store import DeliveryQuery
from smtprelay.store.sqlite import SQLiteStore
from tests.queue_support import T0, QueueHarness, ScriptedProvider
from tests.store_support import envelope
from tests.store_support import transition as outcome_of

BODY = (b"From: app@example.com\r\nTo: to@example.org\r\nSubject: Hi\r\n"
        b"Message-ID: <m1@example.com>\r\n\r\nhello\r\n")


# -- the table, byte for byte (shared/spec/smtp.md) ------------------------------------------------

@pytest.mark.parametrize("reply,raw", [
    (replies.QUEUED.format(id="01ABC"), "250 2.0.0 Ok: queued as 01ABC"),
    (replies.SENDER_NOT_ALLOWED, "550 5.7.1 Sender not allowed"),
    (replies.FROM_HEADER_NOT_ALLOWED, "550 5.7.1 Sender not allowed in From header"),
    (replies.STORAGE_FAILURE, "451 4.3.0 Error: temporary storage failure; try again later"),
    (replies.LOCAL_ERROR, "451 4.3.0 Error: local error in processing; try again later"),
    (replies.AUTH_INVALID, "535 5.7.8 Authentication credentials invalid"),
    (replies.GREETING.format(hostname="relay.test"), "220 relay.test ESMTP smtprelay"),
    (replies.AUTH_CONTINUE, "334 "),
    (replies.START_DATA, "354 End data with <CR><LF>.<CR><LF>"),
])
def test_reply_table_raw_lines(reply, raw):
    assert str(reply) == raw


def test_format_fills_the_text_only_and_leaves_client_input_alone():
    r = replies.UNSUPPORTED_PARAMETER.format(name="{evil}")
    assert str(r) == "555 5.5.4 Unsupported parameter {evil}"
    assert replies.UNSUPPORTED_PARAMETER.text == "Unsupported parameter {name}"


# -- direct mode replies ------------------------------------------------------------------------

def transition(status, detail, results):
    return Transition(status=status, next_attempt_at=None,
                      attempt=Attempt(at=0.0, outcome=str(status), detail=detail),
                      recipient_results={a: (r, detail) for a, r in results.items()})


def test_direct_reply():
    sent = transition(Status.SENT, "ok", {"a@x.y": Result.SENT})
    assert str(direct_reply("ID", sent)) == "250 2.0.0 Ok: sent ID"
    some = transition(Status.FAILED, "550 5.1.1 no\r\nsuch", {"a@x.y": Result.SENT,
                                                           "b@x.y": Result.PERMANENT})
    assert str(direct_reply("ID", some)) == \
        "250 2.0.0 Ok: sent ID to 1 of 2 recipients; 550 5.1.1 no  such"
    later = transition(Status.DEFERRED, "451 4.7.1 slow down", {"a@x.y": Result.TEMPORARY})
    assert str(direct_reply("ID", later)) == "451 4.7.1 451 4.7.1 slow down"
    within = transition(Status.DEFERRED, "no answer within 60s", {"a@x.y": Result.TEMPORARY})
    assert str(direct_reply("ID", within)) == "451 4.4.1 no answer within 60s"
    assert str(direct_reply("ID", transition(Status.DEFERRED, "", {"a@x.y": Result.TEMPORARY}))) \
        == "451 4.0.0 Temporary delivery failure"
    assert str(direct_reply("ID", transition(Status.FAILED, "", {"a@x.y": Result.PERMANENT}))) \
        == "554 5.0.0 Delivery failed"


# -- the road: the real store and queue runner, a scripted provider -------------------------------

def config(**sender):
    return parse({"smtp": {"hostname": "relay.test"},
                  "sender": {"default": "relay@example.com", "allowed": ["*@example.com"],
                             **sender}})


def facts(mode="queue", sender="App@Example.com"):
    return Transaction(sender=sender, original_sender=sender, recipients=("to@example.org",),
                       client_address="192.0.2.7", helo="client.test",
                       user=AuthUser("app"), protocol="ESMTPA", mode=mode)


def spooled(data=BODY):
    spool = MessageSpool()
    spool.write(data)
    return spool


def received_header(message_id, when=T0):
    return (f"Received: from client.test ([192.0.2.7])\r\n"
            f"\tby relay.test (smtprelay) with ESMTPA id {message_id};\r\n"
            f"\t{formatdate(when, usegmt=True)}\r\n").encode("ascii")


SPOOFED = BODY.replace(b"From: app@example.com", b"From: ceo@elsewhere.test")
TEST_FACTS = Transaction(sender="Relay@example.com", original_sender="Relay@example.com",
                         recipients=("to@example.org",), client_address="127.0.0.1",
                         helo="admin-api", user=AuthUser("admin"), protocol="HTTP",
                         mode="direct")


class IntakeRoadTests(QueueHarness):
    """Intake -> SQLiteStore -> QueueRunner -> provider, observed in the store's
    state, the provider's calls, the replies and the metrics."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.metrics = Metrics("scripted", self.clock)

    def intake(self, cfg=None, store=None):
        return Intake(cfg or config(), store or self.store, self.clock, runner=self.r,
                      metrics=self.metrics)

    @defer.inlineCallbacks
    def started(self, provider, **kw):
        """A running runner whose first claim found the queue empty (so that it
        may hand off)."""
        r = self.runner(provider, metrics=self.metrics, **kw)
        r.observers.append(self.metrics.outcome)  # as the service wires them
        yield self.settle()
        return r

    def counted(self, name):
        return self.metrics.registry.get_sample_value(
            f"smtprelay_{name}_total", {"provider": "scripted"}) or 0

    @defer.inlineCallbacks
    def stored_ids(self):
        page = yield self.store.deliveries(DeliveryQuery(limit=50))
        return sorted(i.id for i in page.items)

    @defer.inlineCallbacks
    def body(self, message_id):
        f = yield self.store.read_body(message_id)
        try:
            return f.read()
        finally:
            f.close()

    def refuse_messages(self):
        """The database refuses every new message (as a full disk would): real
        SQLite errors in the store's own transaction."""
        return self.sql("CREATE TRIGGER refuse BEFORE INSERT ON messages "
                        "BEGIN SELECT RAISE(ABORT, 'disk full'); END")

    def assert_slot_free(self, r):
        """With max_in_flight=1 a reserved slot not given back refuses the next."""
        self.assertTrue(r.reserve("other@x.org"))
        r.unreserve()

    # -- queue mode ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_queue_mode_hands_a_reserved_message_to_the_runner(self):
        provider = ScriptedProvider(["hang"])
        r = yield self.started(provider)
        claims = self.store_counts["claim"]
        reply = yield self.intake().receive(facts(), spooled())
        yield self.settle()
        [mid] = yield self.stored_ids()
        self.assertEqual(str(reply), f"250 2.0.0 Ok: queued as {mid}")
        # stored leased to this instance in the same transaction, and handed over:
        # the provider has it without a second claim round and without a read back
        self.assertEqual(self.store_counts["accept_and_claim"], 1)
        self.assertEqual(self.store_counts["claim"], claims)
        self.assertEqual(self.store_counts["claim_one"] + self.store_counts["read_body"], 0)
        self.assertEqual((yield self.lease(mid)), ("active", self.store.instance_id, T0 + 300))
        stored = received_header(mid) + BODY
        self.assertEqual(provider.calls, [(mid, "app@example.com", ("to@example.org",), stored)])
        self.assertEqual(r.in_flight, 1)
        self.assertEqual((yield self.body(mid)), stored)
        [(received_by,)] = yield self.sql("SELECT received_by FROM messages WHERE id = ?", (mid,))
        self.assertEqual(received_by, self.store.instance_id)
        provider.hanging[0].callback(Outcome.sent("202 Accepted"))
        yield self.settle()
        d = yield self.store.delivery(mid)
        self.assertEqual((d.status, d.size, d.mailbox, d.sender, d.original_sender),
                         (Status.SENT, len(stored), "app@example.com", "App@Example.com",
                          "App@Example.com"))
        self.assertEqual((d.header_from, d.subject, d.message_id),
                         ("app@example.com", "Hi", "<m1@example.com>"))
        self.assertEqual((d.auth_user, d.client_address, d.helo, d.mode, d.received_at),
                         ("app", "192.0.2.7", "client.test", "queue", T0))
        self.assertEqual([a.outcome for a in d.attempts], ["sent"])
        self.assertEqual((yield self.lease(mid)), ("sent", None, None))
        self.assertEqual((self.counted("received_messages"), self.counted("received_bytes")),
                         (1, len(stored)))
        self.assertEqual(self.counted("sent_messages"), 1)

    @defer.inlineCallbacks
    def test_queue_mode_without_a_free_slot_stores_and_wakes_the_runner(self):
        # the mailbox's one provider slot is busy: no hand-off; with claim-ahead the
        # runner, woken, claims the stored message at once and holds it for the slot
        provider = ScriptedProvider(["hang", "hang"])
        r = yield self.started(provider, claim_ahead=True, concurrency=1)
        intake = self.intake()
        yield intake.receive(facts(), spooled())
        yield self.settle()
        [first] = yield self.stored_ids()
        claims = self.store_counts["claim"]
        reply = yield intake.receive(facts(), spooled())
        [second] = [i for i in (yield self.stored_ids()) if i != first]
        self.assertEqual(str(reply), f"250 2.0.0 Ok: queued as {second}")
        self.assertEqual(self.store_counts["accept"], 1)  # stored unleased
        self.assertEqual((yield self.lease(second)), ("queued", None, None))
        yield self.settle()
        self.assertGreater(self.store_counts["claim"], claims)  # woken: it claimed
        self.assertEqual((yield self.lease(second)), ("active", self.store.instance_id, T0 + 300))
        self.assertEqual(r.limiter.waiting(), 1)
        self.assertEqual([c[0] for c in provider.calls], [first])
        provider.hanging[0].callback(Outcome.sent("ok"))
        yield self.settle()
        self.assertEqual([c[0] for c in provider.calls], [first, second])
        self.assertEqual(provider.calls[1][3], received_header(second) + BODY)  # read back
        provider.hanging[1].callback(Outcome.sent("ok"))
        yield self.settle()
        for mid in (first, second):
            self.assertEqual((yield self.lease(mid)), ("sent", None, None))
        self.assertEqual(self.counted("received_messages"), 2)

    @defer.inlineCallbacks
    def test_queued_instead_of_claimed_gives_the_slot_back(self):
        # another instance on the same database holds the mailbox's one lease
        other = SQLiteStore(self.store.path, reactor)
        yield other.start(T0)
        self.addCleanup(other.stop, T0)
        provider = ScriptedProvider()
        r = yield self.started(provider, concurrency=1, max_in_flight=1)
        theirs = envelope(0, recipients=("a@x.org",), mailbox="app@example.com", now=T0)
        yield other.accept(theirs, [b"theirs"], lease_until=T0 + 300)
        reply = yield self.intake().receive(facts(), spooled())
        [mine] = [i for i in (yield self.stored_ids()) if i != theirs.id]
        self.assertEqual(str(reply), f"250 2.0.0 Ok: queued as {mine}")
        self.assertEqual(self.store_counts["accept_and_claim"], 1)
        self.assertEqual((yield self.lease(mine)), ("queued", None, None))
        yield self.settle()
        self.assertEqual(provider.calls, [])
        self.assert_slot_free(r)
        # the other instance is done: the next poll sends ours
        yield other.finish(theirs.id, outcome_of(Status.SENT, T0 + 1,
                                                 {"a@x.org": (Result.SENT, "250 ok")}))
        yield self.advance(1)
        self.assertEqual([c[0] for c in provider.calls], [mine])
        self.assertEqual((yield self.lease(mine)), ("sent", None, None))

    @defer.inlineCallbacks
    def test_a_storage_failure_is_a_451_and_the_slot_goes_back(self):
        provider = ScriptedProvider()
        r = yield self.started(provider, max_in_flight=1)
        yield self.refuse_messages()
        intake = self.intake()
        self.assertEqual((yield intake.receive(facts(), spooled())), replies.STORAGE_FAILURE)
        self.assertEqual((yield intake.receive(facts(mode="direct"), spooled())),
                         replies.STORAGE_FAILURE)
        yield self.settle()
        self.assertEqual(self.store_counts["accept_and_claim"], 1)  # it had a slot
        self.assertEqual((yield self.sql("SELECT COUNT(*) FROM bodies")), [(0,)])
        self.assertEqual((yield self.stored_ids()), [])
        self.assertEqual(provider.calls, [])
        self.assertEqual(self.counted("received_messages"), 0)
        self.assert_slot_free(r)
        # the disk has room again: the next message goes the whole way
        yield self.sql("DROP TRIGGER refuse")
        reply = yield intake.receive(facts(), spooled())
        yield self.settle()
        [mid] = yield self.stored_ids()
        self.assertEqual(str(reply), f"250 2.0.0 Ok: queued as {mid}")
        self.assertEqual([c[0] for c in provider.calls], [mid])
        self.assertEqual(self.counted("received_messages"), 1)

    # -- direct mode -----------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_direct_mode_stores_leased_and_waits_for_the_provider(self):
        provider = ScriptedProvider(["hang", Outcome.temporary("451 4.7.1 slow down")])
        yield self.started(provider)
        intake = self.intake()
        answer = intake.receive(facts(mode="direct"), spooled())
        yield self.settle()
        self.assertFalse(answer.called)  # the reply waits for the provider
        [mid] = yield self.stored_ids()
        self.assertEqual(self.store_counts["accept"], 1)
        self.assertEqual((yield self.lease(mid)), ("active", self.store.instance_id, T0 + 300))
        stored = received_header(mid) + BODY
        self.assertEqual(provider.calls, [(mid, "app@example.com", ("to@example.org",), stored)])
        provider.hanging[0].callback(Outcome.sent("202 Accepted"))
        self.assertEqual(str((yield answer)), f"250 2.0.0 Ok: sent {mid}")
        d = yield self.store.delivery(mid)
        self.assertEqual((d.status, d.mode, [a.outcome for a in d.attempts]),
                         (Status.SENT, "direct", ["sent"]))
        self.assertEqual((yield self.lease(mid)), ("sent", None, None))
        # the reply follows the transition: a temporary failure is a 451, and the client,
        # not the queue, tries again
        reply = yield intake.receive(facts(mode="direct"), spooled())
        later = [i for i in (yield self.stored_ids()) if i != mid]
        self.assertEqual(str(reply), "451 4.7.1 451 4.7.1 slow down")
        d = yield self.store.delivery(later[0])
        self.assertEqual((d.status, d.error), (
            Status.FAILED,
            "temporary failure reported to the SMTP client (direct mode): 451 4.7.1 slow down"))
        self.assertEqual(self.counted("received_messages"), 2)

    # -- the header From policy ------------------------------------------------------------

    @defer.inlineCallbacks
    def test_a_disallowed_from_header_is_refused_or_rewritten(self):
        provider = ScriptedProvider()
        yield self.started(provider)
        intake = self.intake()
        self.assertEqual((yield intake.receive(facts(), spooled(SPOOFED))),
                         replies.FROM_HEADER_NOT_ALLOWED)
        yield self.settle()
        self.assertEqual((yield self.stored_ids()), [])
        self.assertEqual(self.store_counts["accept"] + self.store_counts["accept_and_claim"], 0)
        self.assertEqual(self.counted("received_messages"), 0)
        intake.apply(config(on_disallowed="rewrite"))
        reply = yield intake.receive(facts(), spooled(SPOOFED))
        yield self.settle()
        [mid] = yield self.stored_ids()
        self.assertEqual(str(reply), f"250 2.0.0 Ok: queued as {mid}")
        stored = yield self.body(mid)
        self.assertTrue(stored.startswith(received_header(mid)))
        self.assertIn(b"From: relay@example.com\r\n", stored)
        self.assertIn(b"Reply-To: ceo@elsewhere.test\r\n", stored)
        self.assertNotIn(b"From: ceo@elsewhere.test", stored)
        self.assertEqual(provider.calls[0][3], stored)
        d = yield self.store.delivery(mid)
        self.assertEqual((d.status, d.size), (Status.SENT, len(stored)))
        self.assertEqual(self.counted("received_bytes"), len(stored))

    @defer.inlineCallbacks
    def test_a_message_is_judged_by_the_configuration_it_was_received_under(self):
        """The session's configuration, not the one the intake took since."""
        provider = ScriptedProvider()
        yield self.started(provider)
        old = config(check_header_from=False)
        intake = self.intake(old)
        intake.apply(config(check_header_from=True))
        reply = yield intake.receive(facts(), spooled(SPOOFED), old)
        yield self.settle()
        [mid] = yield self.stored_ids()
        self.assertEqual(str(reply), f"250 2.0.0 Ok: queued as {mid}")
        self.assertEqual((yield self.body(mid)), received_header(mid) + SPOOFED)
        self.assertEqual([c[0] for c in provider.calls], [mid])
        # a session that started after the change is judged by the new one
        self.assertEqual((yield intake.receive(facts(), spooled(SPOOFED))),
                         replies.FROM_HEADER_NOT_ALLOWED)

    # -- the admin's test message ----------------------------------------------------------

    @defer.inlineCallbacks
    def test_the_test_message_is_stored_and_delivered_directly_without_counting(self):
        provider = ScriptedProvider(["hang"])
        yield self.started(provider)
        intake = self.intake()
        message = Prepared(id="01TEST", received_at=T0, data=b"Received: x\r\n\r\nbody\r\n",
                           header_from="relay@example.com", subject="Check",
                           message_id="<01TEST.test@relay.test>")
        delivered = intake.test_message(TEST_FACTS, message)
        yield self.settle()
        self.assertEqual((yield self.lease("01TEST")), ("active", self.store.instance_id,
                                                         T0 + 300))
        self.assertEqual(provider.calls, [("01TEST", "Relay@example.com", ("to@example.org",),
                                           message.data)])
        provider.hanging[0].callback(Outcome.sent("202 Accepted"))
        result = yield delivered
        self.assertIs(result.status, Status.SENT)
        d = yield self.store.delivery("01TEST")
        self.assertEqual((d.status, d.mailbox, d.mode, d.auth_user, d.subject, d.size),
                         (Status.SENT, "Relay@example.com", "direct", "admin", "Check",
                          len(message.data)))
        self.assertEqual((yield self.body("01TEST")), message.data)
        self.assertEqual(self.counted("received_messages"), 0)

    @defer.inlineCallbacks
    def test_a_test_message_not_stored_is_not_delivered(self):
        provider = ScriptedProvider()
        yield self.started(provider)
        message = Prepared(id="01TEST", received_at=T0, data=b"Received: x\r\n\r\nbody\r\n",
                           header_from="relay@example.com", subject="Check",
                           message_id="<01TEST.test@relay.test>")
        # a store that was stopped
        stopped = SQLiteStore(self.store.path, reactor)
        yield stopped.start(T0)
        yield stopped.stop(T0)
        with self.assertRaises(NotStored) as failed:
            yield self.intake(store=stopped).test_message(TEST_FACTS, message)
        self.assertEqual(str(failed.exception), "the store is not started")
        # a database that refuses the write
        yield self.refuse_messages()
        with self.assertRaises(NotStored) as failed:
            yield self.intake().test_message(TEST_FACTS, message)
        self.assertEqual(str(failed.exception), "IntegrityError: disk full")
        yield self.settle()
        self.assertEqual((yield self.stored_ids()), [])
        self.assertEqual(provider.calls, [])
