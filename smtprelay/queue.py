"""The queue runner: claims due messages, hands them to the provider, records outcomes.

It meets the SMTP side only at the store (and a ``wake()`` nudge when a
message was just accepted).  Per sending mailbox it keeps at most
``delivery.concurrency`` provider calls in flight (in this process by
:class:`~smtprelay.slots.MailboxSlots`; across instances because claims
count the active rows), and it honours a provider's Retry-After for the
whole mailbox.  Leases are renewed while calls run, so another instance
takes a message over only when this one is gone.  The clock is injected:
tests run days of retries in milliseconds.

A new configuration reaches the runner through :meth:`QueueRunner.apply`
(delivery settings, the per-mailbox limit of the mailboxes already active
included) and a new provider through :meth:`QueueRunner.switch_provider`,
which tells when the deliveries that may still use the old one are done.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, BinaryIO

import attr
from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtprelay import schedule
from smtprelay.model import Claim, Outcome, Result, Status, Transition
from smtprelay.providers.base import IProvider, OutgoingMessage
from smtprelay.scrub import scrub_configured
from smtprelay.slots import MailboxSlots
from smtprelay.store.interface import IStore

if TYPE_CHECKING:
    from smtprelay.config import Config, DeliveryConfig
    from smtprelay.metrics import Metrics

log = Logger()

# fn(claim, outcome, transition), told of every recorded outcome
Observer = Callable[[Claim, Outcome, Transition], None]


def scrubbed(outcome: Outcome) -> Outcome:
    """``outcome`` without any configured secret in its details: a provider may quote
    back what it was sent (credentials included), and the delivery log keeps it."""
    detail = scrub_configured(outcome.detail)
    recipients = {a: (r, scrub_configured(d)) for a, (r, d) in outcome.recipients.items()}
    if detail == outcome.detail and recipients == outcome.recipients:
        return outcome
    return attr.evolve(outcome, detail=detail, recipients=recipients)


class MailboxLimiter(MailboxSlots):
    """Provider calls per sending mailbox, and local back-off times."""

    def __init__(self, concurrency: int) -> None:
        super().__init__(concurrency)
        self.blocked_until: dict[str, float] = {}  # mailbox (lower case) -> until

    def apply(self, delivery: DeliveryConfig) -> None:
        """``delivery.concurrency`` from now on, for the mailboxes already active too;
        back-off times asked for by the provider stand."""
        self.resize(delivery.concurrency)


class QueueRunner(service.Service):
    name = "queue"

    def __init__(self, store: IStore, provider: IProvider, delivery: DeliveryConfig,
                 clock: IReactorTime, max_in_flight: int = 128, poll_interval: float = 1.0,
                 retention: float | None = None, metrics: Metrics | None = None,
                 claim_ahead: bool = False) -> None:
        self.store = store
        self.provider = provider
        self.delivery = delivery
        self.clock = clock
        self.max_in_flight = max_in_flight
        self.poll_interval = poll_interval
        self.retention = retention
        self.metrics = metrics
        self.limiter = MailboxLimiter(delivery.concurrency)
        # With claim_ahead (a relay that owns its database) a mailbox may hold
        # twice its concurrency leased: the next messages are claimed and read
        # while the provider works, and the mailbox's slots still bound the calls.
        # Shared databases keep it off: there the lease count is the bound.
        self.claim_ahead = claim_ahead
        # message id -> Deferred of the whole delivery
        self._in_flight: dict[str, defer.Deferred[Any]] = {}
        self._held: dict[str, int] = {}  # mailbox (lower case) -> messages of it in _in_flight
        self._reserved = 0  # slots promised to messages being accepted (hand-off)
        self._backlog = True  # due messages may wait in the store: claims come first
        self._polling: defer.Deferred[Any] | None = None
        self._wake_call: IDelayedCall | None = None
        self._loops: list[task.LoopingCall] = []
        self._stopping = False
        self.observers: list[Observer] = []
        # (since, detail) while the last attempt failed
        self.provider_failing: tuple[float, str] | None = None

    # -- a new configuration, a new provider -------------------------------------------

    def apply(self, config: Config) -> None:
        """Take the delivery settings and retention of a new configuration.

        Messages in flight keep the lease they have; the next claim, renewal
        and retry schedule use the new values.  The per-mailbox limit changes
        at once, for mailboxes already sending too."""
        self.delivery = config.delivery
        self.limiter.apply(config.delivery)
        self.retention = config.database.retention

    def switch_provider(self, provider: IProvider) -> defer.Deferred[IProvider]:
        """Send with ``provider`` from now on -> Deferred firing with the old provider
        once every delivery that may be using it has settled (then it may be stopped)."""
        old, self.provider = self.provider, provider
        calls = [_settled(d) for d in list(self._in_flight.values())]
        done: defer.Deferred[Any] = defer.DeferredList(calls)
        return done.addCallback(lambda _: old)

    # -- life ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        d = self.store.recover(self.clock.seconds())
        d.addErrback(lambda f: log.failure("recovering leases failed", f))
        d.addBoth(lambda _: self.wake())
        self._loop(self.poll_interval, self._tick, now=False)
        self._loop(max(self.delivery.lease / 3.0, 1.0), self._renew)
        if self.retention:
            self._loop(3600.0, self._purge)

    def _loop(self, interval: float, fn: Callable[[], object], now: bool = True) -> None:
        lc = task.LoopingCall(fn)
        lc.clock = self.clock
        d = lc.start(interval, now=now)
        d.addErrback(lambda f: log.failure("queue loop failed", f))
        self._loops.append(lc)

    @defer.inlineCallbacks
    def stopService(self, grace: float | None = None) -> Generator[Any, Any, None]:
        self._stopping = True
        self._stop_loops()
        if self._polling is not None:
            yield self._polling
        pending = list(self._in_flight.values())
        grace = self.delivery.direct_timeout if grace is None else grace
        if pending and grace > 0:
            yield self._wait_for(pending, grace)
        if pending and self._in_flight:
            yield self._give_back_in_flight()
        yield defer.maybeDeferred(service.Service.stopService, self)

    def _stop_loops(self) -> None:
        for lc in self._loops:
            if lc.running:
                lc.stop()
        self._loops = []
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()

    @defer.inlineCallbacks
    def _wait_for(self, pending: list[defer.Deferred[Any]], grace: float
                  ) -> Generator[Any, Any, None]:
        """Until the ``pending`` deliveries are done, or ``grace`` seconds at most."""
        done = defer.DeferredList(pending, consumeErrors=True)
        timer = task.deferLater(self.clock, grace, lambda: None)
        yield defer.DeferredList([done, timer], fireOnOneCallback=True, consumeErrors=True)
        if not timer.called:
            timer.cancel()

    @defer.inlineCallbacks
    def _give_back_in_flight(self) -> Generator[Any, Any, None]:
        """Cancel the deliveries still in flight and release their leases."""
        left = list(self._in_flight)
        log.warn("stopping with {n} deliveries in flight; their leases are released",
                 n=len(left))
        for d in list(self._in_flight.values()):
            d.cancel()
        try:
            yield self.store.release(left, self.clock.seconds())
        except Exception:
            log.failure("could not release leases; they expire by themselves")

    # -- claiming --------------------------------------------------------------------

    @property
    def claim_limit(self) -> int:
        """Messages of one mailbox leased at once (all instances' leases count)."""
        return self.delivery.concurrency * (2 if self.claim_ahead else 1)

    def queued(self, mailbox: str) -> None:
        """A message for ``mailbox`` was just queued: poll soon, unless this
        process already sends as many as it may for that mailbox (or it is
        held back); the end of one of those deliveries polls then."""
        self._backlog = True
        key = mailbox.lower()
        if (self._held.get(key, 0) >= self.claim_limit
                or self.limiter.blocked_until.get(key, 0) > self.clock.seconds()):
            return
        self.wake()

    def wake(self) -> None:
        """A message may be due: poll soon (coalesced)."""
        if self._stopping or not self.running:
            return
        if self._wake_call is None or not self._wake_call.active():
            self._wake_call = self.clock.callLater(0, self._tick)

    def _tick(self) -> None:
        if self._stopping or self._polling is not None:
            return
        free = self.max_in_flight - len(self._in_flight) - self._reserved
        if free <= 0:
            return
        now = self.clock.seconds()
        self._polling = self.store.claim(now, free, now + self.delivery.lease,
                                         self.claim_limit)
        self._polling.addCallbacks(self._claimed, self._claim_failed, callbackArgs=(free,))

    def _claim_failed(self, failure: Failure) -> None:
        self._polling = None
        log.warn("claiming due messages failed: {why}", why=failure.getErrorMessage())

    def _claimed(self, claims: list[Claim], asked: int | None = None) -> None:
        self._polling = None
        # fewer than asked for: nothing due is left behind in the store
        self._backlog = asked is None or len(claims) >= asked
        for claim in claims:
            self._start(claim)
        if claims and len(self._in_flight) < self.max_in_flight and not self._stopping:
            # there may be more due than one claim returned
            self.wake()

    # -- hand-off: a message just accepted, delivered without a claim ------------------

    def reserve(self, mailbox: str) -> bool:
        """Promise a delivery slot to a message about to be stored -> bool.

        Only when nothing due waits in the store (the queue is served in
        order), a slot is free, and this process may send as ``mailbox`` now.
        A True must be followed by exactly one :meth:`take` or :meth:`unreserve`.
        """
        if self._stopping or not self.running or self._backlog:
            return False
        if len(self._in_flight) + self._reserved >= self.max_in_flight:
            return False
        key = mailbox.lower()
        if self.limiter.blocked_until.get(key, 0) > self.clock.seconds():
            return False
        if self.limiter.in_flight(key) >= self.limiter.concurrency:
            return False
        self._reserved += 1
        return True

    def unreserve(self) -> None:
        """The reserved slot is not needed (the message was queued, or not stored)."""
        self._reserved -= 1
        self.wake()

    def take(self, claim: Claim, body: bytes | None = None) -> defer.Deferred[Any]:
        """Deliver ``claim`` (leased by :meth:`IStore.accept_and_claim`) in the
        reserved slot; ``body``, if given, is the stored message as bytes."""
        self._reserved -= 1
        if self._stopping or not self.running:
            # too late to start: the lease goes back, the next start sends it
            return self.store.release([claim.id], self.clock.seconds())
        return self._start(claim, body)

    def _start(self, claim: Claim, body: bytes | None = None) -> defer.Deferred[Any]:
        d = self._deliver(claim, body=body)
        self._in_flight[claim.id] = d
        key = claim.mailbox.lower()
        self._held[key] = self._held.get(key, 0) + 1

        def done(result: object) -> object:
            self._in_flight.pop(claim.id, None)
            left = self._held.get(key, 1) - 1
            if left > 0:
                self._held[key] = left
            else:
                self._held.pop(key, None)
            if not self._stopping:
                self.wake()
            return result

        d.addBoth(done)
        d.addErrback(self._delivery_failed, claim)
        return d

    def _delivery_failed(self, failure: Failure, claim: Claim) -> None:
        if failure.check(defer.CancelledError) and self._stopping:
            return None
        log.failure("delivery of {id} failed", failure, id=claim.id)

    # -- delivering --------------------------------------------------------------------

    def deliver_direct(self, claim: Claim) -> defer.Deferred[Transition]:
        """Deliver a message stored already leased (direct mode) -> Deferred[Transition]."""
        d = self._deliver(claim, direct=True)
        self._in_flight[claim.id] = d

        def done(result: Transition) -> Transition:
            self._in_flight.pop(claim.id, None)
            return result

        return d.addBoth(done)

    @defer.inlineCallbacks
    def _deliver(self, claim: Claim, direct: bool = False, body: bytes | None = None
                 ) -> Generator[Any, Any, Transition]:
        if claim.mode == "direct" and not direct:
            # a direct-mode message found by a claim: its client never got an answer
            # (the relay stopped mid-delivery) and will send it again
            outcome = Outcome.permanent(
                "not delivered: the relay stopped before the provider answered in direct "
                "mode; the SMTP client got no 250 and will retry")
            transition = yield self._record(claim, outcome, 0)
            return transition
        if not claim.recipients:
            outcome = Outcome.sent("no recipient left to deliver to")
            transition = yield self._record(claim, outcome, 0)
            return transition
        # the body is read before the provider slot is taken: the slot is the
        # provider's time, and the store's work overlaps the calls in flight
        try:
            stream: BinaryIO = io.BytesIO(body) if body is not None else (
                yield self.store.read_body(claim.id))
        except Exception as e:
            outcome = Outcome.temporary(f"cannot read the stored message: {type(e).__name__}")
            transition = yield self._record(claim, outcome, 0)
            return transition
        try:
            yield self.limiter.acquire(claim.mailbox)
            try:
                start = time.monotonic()
                outcome = yield self._attempt(claim, stream)
                duration = time.monotonic() - start
                # before the slot is free: the next message of this mailbox must see it
                self._hold_mailbox(claim, outcome)
            finally:
                self.limiter.release(claim.mailbox)
        finally:
            stream.close()
        transition = yield self._record(claim, outcome, int(duration * 1000))
        return transition

    def _hold_mailbox(self, claim: Claim, outcome: Outcome) -> None:
        if outcome.mailbox_wide and outcome.not_before:
            key = claim.mailbox.lower()
            self.limiter.blocked_until[key] = max(self.limiter.blocked_until.get(key, 0),
                                                  outcome.not_before)

    @defer.inlineCallbacks
    def _attempt(self, claim: Claim, body: BinaryIO) -> Generator[Any, Any, Outcome]:
        """One provider call for ``claim`` with its open ``body`` -> Outcome."""
        now = self.clock.seconds()
        blocked = self.limiter.blocked_until.get(claim.mailbox.lower(), 0)
        if blocked > now:
            return Outcome.temporary(
                f"the provider asked to wait before sending as {claim.mailbox}",
                not_before=blocked)
        message = OutgoingMessage(id=claim.id, sender=claim.sender, mailbox=claim.mailbox,
                                  recipients=claim.recipients, size=claim.size, body=body,
                                  attempt=claim.attempts + 1)
        try:
            call = defer.maybeDeferred(self.provider.send, message)
            cap = self._call_cap(claim)
            call.addTimeout(cap, self.clock)
            outcome = yield call
        except defer.TimeoutError:
            outcome = Outcome.temporary(
                f"no answer from the provider within {int(self._call_cap(claim))}s; "
                "the message may have been sent", ambiguous=True)
        except defer.CancelledError:
            if self._stopping:
                # not an outcome: stopService gives the lease back for another try
                raise
            outcome = Outcome.temporary("the attempt was cancelled", ambiguous=True)
        except Exception as e:
            log.failure("provider {type} raised for {id}", type=self.provider.type, id=claim.id)
            outcome = Outcome.temporary(f"internal error in the {self.provider.type} "
                                        f"provider: {type(e).__name__}")
        if not isinstance(outcome, Outcome):
            outcome = Outcome.temporary(f"the {self.provider.type} provider gave no outcome")
        return outcome

    def _call_cap(self, claim: Claim) -> float:
        """A hard upper bound on one provider call, beyond its own timeouts."""
        if claim.mode == "direct":
            return self.delivery.direct_timeout
        # generous: a provider bounds each of its own steps; this only catches
        # one that never answers (e.g. SMTP: a reply per recipient, plus the body)
        per_request = getattr(self.provider, "timeout", 60.0)
        return per_request * (6 + len(claim.recipients)) + claim.size / 50_000 + 60.0

    @defer.inlineCallbacks
    def _record(self, claim: Claim, outcome: Outcome, duration_ms: int
                ) -> Generator[Any, Any, Transition]:
        outcome = scrubbed(outcome)
        now = self.clock.seconds()
        transition = schedule.decide(claim, outcome, now, self.delivery.retry,
                                     self.delivery.max_age, duration_ms,
                                     self.store.instance_id)
        if outcome.mailbox_wide and outcome.not_before and outcome.not_before > now:
            self._hold_mailbox(claim, outcome)
            try:
                yield self.store.block_mailbox(claim.mailbox, outcome.not_before)
            except Exception:
                log.failure("could not record the back-off of {mailbox}", mailbox=claim.mailbox)
        if outcome.result is Result.SENT:
            self.provider_failing = None
        elif outcome.result is Result.TEMPORARY and self.provider_failing is None:
            self.provider_failing = (now, outcome.detail)
        for attempt in range(5):
            try:
                held = yield self.store.finish(claim.id, transition)
                break
            except Exception as e:
                # the outcome must not be lost: the lease keeps the message ours meanwhile
                log.warn("recording the outcome of {id} failed ({why}); retrying",
                         id=claim.id, why=e)
                yield task.deferLater(self.clock, 2.0 * (attempt + 1), lambda: None)
        else:
            held = False
            log.error("could not record the outcome of {id}; it will be attempted again "
                      "when its lease expires", id=claim.id)
        if not held:
            log.warn("the lease on {id} was lost before its outcome was recorded", id=claim.id)
        self._log_outcome(claim, outcome, transition)
        for observer in list(self.observers):
            try:
                observer(claim, outcome, transition)
            except Exception:
                log.failure("outcome observer failed")
        return transition

    def _log_outcome(self, claim: Claim, outcome: Outcome, transition: Transition) -> None:
        fields = dict(id=claim.id, mailbox=claim.mailbox, n=len(claim.recipients),
                      detail=transition.attempt.detail, status=transition.status)
        if transition.status is Status.SENT:
            log.info("{id} sent as {mailbox} to {n} recipient(s): {detail}", **fields)
        elif transition.status is Status.DEFERRED:
            log.warn("{id} deferred until {when}: {detail}",
                     when=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                        time.gmtime(transition.next_attempt_at)), **fields)
        else:
            log.error("{id} failed: {detail}", **fields)

    # -- housekeeping ---------------------------------------------------------------------

    def _renew(self) -> defer.Deferred[Any]:
        now = self.clock.seconds()
        # only what is in hand: a message whose outcome could not be recorded
        # (see _record) must reach the end of its lease to be attempted again
        d = self.store.renew_leases(now, now + self.delivery.lease, list(self._in_flight))
        d.addErrback(lambda f: log.warn("lease renewal failed: {why}", why=f.getErrorMessage()))
        return d

    def _purge(self) -> defer.Deferred[Any]:
        if self.retention is None:  # the loop runs only with a retention
            return defer.succeed(None)
        before = self.clock.seconds() - self.retention
        d = self.store.purge(before)

        def purged(n: int) -> None:
            if n:
                log.info("retention: purged {n} finished deliveries", n=n)
                if n >= 1000:
                    self.clock.callLater(1.0, self._purge)

        d.addCallbacks(purged, lambda f: log.warn("purge failed: {why}",
                                                  why=f.getErrorMessage()))
        return d

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)


def _settled(d: defer.Deferred[Any]) -> defer.Deferred[None]:
    """A Deferred that fires (with None) when ``d`` does, leaving ``d``'s result alone."""
    out: defer.Deferred[None] = defer.Deferred()

    def fire(result: object) -> object:
        if not out.called:
            out.callback(None)
        return result

    d.addBoth(fire)
    return out
