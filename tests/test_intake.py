"""The intake (smtprelay.intake) without a network: fakes for the store and the runner,
and the reply table (smtprelay.replies) against the contract's raw bytes."""

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from smtprelay import replies
from smtprelay.config import parse
from smtprelay.intake import AuthUser, Intake, NotStored, Prepared, Transaction, direct_reply
from smtprelay.model import Attempt, Claim, Result, Status, Transition
from smtprelay.smtp.spool import MessageSpool
from smtprelay.store.interface import StoreUnavailable

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


# -- the road: store, hand-off, direct ----------------------------------------------------------

class FakeStore:
    instance_id = "test-instance"

    def __init__(self, fail=False, claim=True):
        self.fail = fail
        self.claim = claim
        self.calls = []

    def accept(self, envelope, body, lease_until=None):
        self.calls.append(("accept", envelope, b"".join(body), lease_until))
        if self.fail:
            return defer.fail(StoreUnavailable("disk full"))
        return defer.succeed(None)

    def accept_and_claim(self, envelope, body, now, lease_until, concurrency):
        self.calls.append(("accept_and_claim", envelope, b"".join(body), lease_until))
        if self.fail:
            return defer.fail(StoreUnavailable("disk full"))
        if not self.claim:
            return defer.succeed(None)
        return defer.succeed(Claim(id=envelope.id, sender=envelope.sender,
                                   mailbox=envelope.mailbox, recipients=envelope.recipients,
                                   age_from=now, size=envelope.size, attempts=0))


class FakeRunner:
    claim_limit = 4

    def __init__(self, reserve=True):
        self.can_reserve = reserve
        self.events = []

    def reserve(self, mailbox):
        self.events.append(("reserve", mailbox))
        return self.can_reserve

    def unreserve(self):
        self.events.append(("unreserve",))

    def take(self, claim, body=None):
        self.events.append(("take", claim.id, body))

    def queued(self, mailbox):
        self.events.append(("queued", mailbox))

    def deliver_direct(self, claim):
        self.events.append(("deliver_direct", claim))
        return defer.succeed(transition(Status.SENT, "ok", {r: Result.SENT
                                                            for r in claim.recipients}))


class FakeMetrics:
    def __init__(self):
        self.received_envelopes = []

    def received(self, envelope):
        self.received_envelopes.append(envelope)


def config(**sender):
    return parse({"sender": {"default": "relay@example.com", "allowed": ["*@example.com"],
                             **sender}})


def facts(mode="queue", sender="App@Example.com"):
    return Transaction(sender=sender, original_sender=sender, recipients=("to@example.org",),
                       client_address="192.0.2.7", helo="client.test",
                       user=AuthUser("app"), protocol="ESMTPA", mode=mode)


def spooled(data=BODY):
    spool = MessageSpool()
    spool.write(data)
    return spool


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "the intake's Deferred did not fire"
    return out[0]


def make(store=None, runner=None, cfg=None):
    clock = Clock()
    clock.advance(1_700_000_000)
    metrics = FakeMetrics()
    intake = Intake(cfg or config(), store or FakeStore(), clock, runner=runner,
                    metrics=metrics)
    return intake, metrics


def test_queue_mode_hands_a_reserved_message_to_the_runner():
    store, runner = FakeStore(), FakeRunner()
    intake, metrics = make(store, runner)
    reply = result_of(intake.receive(facts(), spooled()))
    kind, envelope, stored, _ = store.calls[0]
    assert kind == "accept_and_claim"
    assert str(reply) == f"250 2.0.0 Ok: queued as {envelope.id}"
    assert stored.startswith(b"Received: from client.test ([192.0.2.7])\r\n")
    assert stored.endswith(BODY) and envelope.size == len(stored)
    assert envelope.mailbox == "app@example.com" and envelope.sender == "App@Example.com"
    assert (envelope.header_from, envelope.subject, envelope.message_id) == \
        ("app@example.com", "Hi", "<m1@example.com>")
    assert envelope.auth_user == "app" and envelope.instance == "test-instance"
    assert runner.events == [("reserve", "app@example.com"), ("take", envelope.id, stored)]
    assert metrics.received_envelopes == [envelope]


def test_queue_mode_without_a_slot_queues_and_wakes():
    store, runner = FakeStore(), FakeRunner(reserve=False)
    intake, _ = make(store, runner)
    reply = result_of(intake.receive(facts(), spooled()))
    assert reply.code == 250
    assert [c[0] for c in store.calls] == ["accept"] and store.calls[0][3] is None
    assert runner.events[-1] == ("queued", "app@example.com")


def test_queued_instead_of_claimed_gives_the_slot_back():
    store, runner = FakeStore(claim=False), FakeRunner()
    intake, _ = make(store, runner)
    assert result_of(intake.receive(facts(), spooled())).code == 250
    assert [e[0] for e in runner.events] == ["reserve", "unreserve", "queued"]


def test_a_storage_failure_is_a_451_and_the_slot_goes_back():
    store, runner = FakeStore(fail=True), FakeRunner()
    intake, metrics = make(store, runner)
    assert result_of(intake.receive(facts(), spooled())) == replies.STORAGE_FAILURE
    assert [e[0] for e in runner.events] == ["reserve", "unreserve"]
    assert metrics.received_envelopes == []


def test_direct_mode_stores_leased_and_waits_for_the_provider():
    store, runner = FakeStore(), FakeRunner()
    intake, _ = make(store, runner)
    reply = result_of(intake.receive(facts(mode="direct"), spooled()))
    kind, envelope, _, lease_until = store.calls[0]
    assert kind == "accept" and lease_until == envelope.received_at + 300.0
    assert str(reply) == f"250 2.0.0 Ok: sent {envelope.id}"
    assert runner.events[0][0] == "deliver_direct"


def test_a_disallowed_from_header_is_refused_or_rewritten():
    spoofed = BODY.replace(b"From: app@example.com", b"From: ceo@elsewhere.test")
    store = FakeStore()
    intake, _ = make(store, FakeRunner())
    assert result_of(intake.receive(facts(), spooled(spoofed))) == \
        replies.FROM_HEADER_NOT_ALLOWED
    assert store.calls == []
    intake.apply(config(on_disallowed="rewrite"))
    assert result_of(intake.receive(facts(), spooled(spoofed))).code == 250
    stored = store.calls[0][2]
    assert b"From: relay@example.com\r\n" in stored and b"ceo@elsewhere.test" in stored


def test_the_test_message_is_stored_and_delivered_directly_without_counting():
    store, runner = FakeStore(), FakeRunner()
    intake, metrics = make(store, runner)
    message = Prepared(id="01TEST", received_at=5.0, data=b"Received: x\r\n\r\nbody\r\n",
                       header_from="relay@example.com", subject="Check",
                       message_id="<01TEST.test@relay.test>")
    test_facts = Transaction(sender="Relay@example.com", original_sender="Relay@example.com",
                             recipients=("to@example.org",), client_address="127.0.0.1",
                             helo="admin-api", user=AuthUser("admin"), protocol="HTTP",
                             mode="direct")
    result = result_of(intake.test_message(test_facts, message))
    assert result.status is Status.SENT
    _, envelope, stored, lease_until = store.calls[0]
    assert stored == message.data and lease_until == 305.0
    assert envelope.mailbox == "Relay@example.com" and envelope.mode == "direct"
    assert metrics.received_envelopes == []
    failing = make(FakeStore(fail=True), FakeRunner())[0]
    failure = result_of(failing.test_message(test_facts, message))
    assert failure.check(NotStored) and str(failure.value) == "disk full"
