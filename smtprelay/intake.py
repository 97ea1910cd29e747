"""The intake: a finished transaction becomes a stored message, and its reply.

The road of every message the relay accepts, in one place: smtp -> intake ->
store -> queue.  The SMTP session hands over the facts of a finished mail
transaction (:class:`Transaction`) and the spooled body; the intake applies
the header-From policy (reject, or rewrite to ``sender.default``), writes the
``Received:`` header, builds the :class:`~smtprelay.model.Envelope`, stores
it, hands it to the queue runner (straight into a reserved delivery slot, or
queued and the runner woken) or, in direct mode, delivers it before answering,
and counts it.  It answers with the :class:`~smtprelay.replies.Reply` to give.

The admin API's test message takes the same road from the store on
(:meth:`Intake.test_message`): it is written by the relay itself, carries its
own ``Received:`` header, is always delivered directly, and its caller wants
the delivery's transition rather than an SMTP reply.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import attr
from twisted.internet import defer
from twisted.logger import Logger

from smtprelay import message as msg
from smtprelay import policy, replies
from smtprelay.model import Claim, Envelope, Result, Status, Transition, new_message_id
from smtprelay.replies import Reply
from smtprelay.store.interface import StoreUnavailable

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from smtprelay.config import Config
    from smtprelay.metrics import Metrics
    from smtprelay.queue import QueueRunner
    from smtprelay.smtp.spool import MessageSpool
    from smtprelay.store.interface import IStore

log = Logger()

# A message up to this size is kept in memory from its end of data to its
# delivery when handed straight to the queue (no read back from the store).
HAND_OFF_BYTES = 256 * 1024


def printable(data: str | bytes, limit: int = 80) -> str:
    """Client input made safe for a log line."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", errors="replace")
    out = "".join(c if c.isprintable() else "?" for c in data[:limit])
    return out + ("..." if len(data) > limit else "")


@attr.frozen
class AuthUser:
    """Who authenticated: the name and the user's own allowed senders (None: any)."""

    name: str
    allowed: policy.SenderPatterns | None = None


@attr.frozen
class Transaction:
    """The facts of a finished mail transaction, as the session saw them."""

    sender: str  # the envelope sender to send as (MAIL FROM after the sender policy)
    original_sender: str  # MAIL FROM as received
    recipients: tuple[str, ...]
    client_address: str
    helo: str | None  # as the client said it; None without HELO/EHLO
    user: AuthUser | None
    protocol: str  # the Received header's "with" (RFC 3848)
    mode: str  # delivery.mode: "queue" | "direct"


@attr.frozen
class Prepared:
    """A message the relay wrote itself (the admin's test message): its id, its
    time and its headers are known, and it carries its own ``Received:``."""

    id: str
    received_at: float
    data: bytes
    header_from: str
    subject: str
    message_id: str  # the Message-ID header


class NotStored(Exception):
    """The admin's test message could not be stored (the store's reason, secret-free)."""


@attr.frozen
class _Headers:
    """What the envelope keeps of a message's headers."""

    header_from: str
    subject: str
    message_id: str


class Intake:
    """Accepts messages: injected configuration, store, clock, queue runner, metrics."""

    def __init__(self, config: Config, store: IStore, clock: IReactorTime,
                 runner: QueueRunner | None = None, metrics: Metrics | None = None) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.runner = runner
        self.metrics = metrics

    def apply(self, config: Config) -> None:
        """Take a new configuration (for the messages accepted from now on)."""
        self.config = config

    # -- SMTP ------------------------------------------------------------------------------

    def receive(self, facts: Transaction, spool: MessageSpool,
                config: Config | None = None) -> defer.Deferred[Reply]:
        """A message received over SMTP -> Deferred[the reply to give].

        ``config`` is the one the session judged the envelope by (it keeps the
        configuration it started with): the message is judged by the same one.
        Fails only on an unexpected error (the session answers 451 then); a
        storage failure is a 451 reply."""
        return defer.Deferred.fromCoroutine(
            self._receive(facts, spool, config if config is not None else self.config))

    async def _receive(self, facts: Transaction, spool: MessageSpool, config: Config) -> Reply:
        summary = msg.summarize(spool.header_block)
        header_block: bytes | None = None
        if config.sender.check_header_from:
            checked = self._check_header_from(config, facts, summary, spool.header_block)
            if isinstance(checked, Reply):
                return checked
            header_block = checked
        now = self.clock.seconds()
        message_id = new_message_id(now)
        received = msg.received_header(
            facts.helo.encode("ascii", "replace") if facts.helo else b"",
            facts.client_address, config.smtp.hostname, message_id, facts.protocol, now,
        )
        size = len(received) + spool.size
        if header_block is not None:
            size += len(header_block) - len(spool.header_block)
        sender_cfg = config.sender
        envelope = self._envelope(
            facts, message_id, now, size,
            # one spelling per mailbox: back-off and concurrency are counted by it
            mailbox=(facts.sender or sender_cfg.default or facts.original_sender).lower(),
            headers=_Headers(
                header_from=(summary.from_addresses[0] if summary.from_addresses
                             else summary.from_display),
                subject=summary.subject, message_id=summary.message_id),
        )
        # a small message is joined here, once: the store writes it and, when it
        # is handed straight to the queue, the provider reads it from memory
        data = (b"".join(spool.chunks(received, header_block))
                if size <= HAND_OFF_BYTES else None)
        body = [data] if data is not None else spool.chunks(received, header_block)
        lease = config.delivery.lease
        if facts.mode == "direct":
            return await self._receive_direct(envelope, body, lease)
        return await self._queue(envelope, body, data, lease)

    def _check_header_from(self, config: Config, facts: Transaction,
                           summary: msg.HeaderSummary, block: bytes) -> Reply | bytes | None:
        """sender.check_header_from -> a refusal, a rewritten header block, or None (fine)."""
        sender_cfg = config.sender
        user_allowed = facts.user.allowed if facts.user is not None else None

        def refused(address: str) -> bool:
            return policy.decide_sender(address, sender_cfg.policy, "reject",
                                        user_allowed).verdict is policy.Verdict.REJECT

        bad = [a for a in summary.from_addresses if refused(a)]
        if summary.from_parse_error:
            bad.append(summary.from_display or "(unparseable From)")
        if not bad:
            return None
        if sender_cfg.on_disallowed == "rewrite" and sender_cfg.default and \
                policy.decide_sender(sender_cfg.default, sender_cfg.policy, "reject",
                                     user_allowed).verdict is policy.Verdict.ACCEPT:
            log.info("rewrote From {bad} to {default}", bad=printable(bad[0]),
                     default=sender_cfg.default)
            return msg.rewrite_from(block, sender_cfg.default)
        log.warn("rejected message from {host}: From header {bad} not allowed",
                 host=facts.client_address, bad=printable(bad[0]))
        return replies.FROM_HEADER_NOT_ALLOWED

    def _envelope(self, facts: Transaction, message_id: str, now: float, size: int,
                  mailbox: str, headers: _Headers) -> Envelope:
        return Envelope(
            id=message_id,
            sender=facts.sender,
            original_sender=facts.original_sender,
            mailbox=mailbox,
            recipients=facts.recipients,
            received_at=now,
            size=size,
            client_address=facts.client_address,
            helo=printable(facts.helo or "", 255),
            auth_user=facts.user.name if facts.user is not None else None,
            header_from=headers.header_from,
            subject=headers.subject,
            message_id=headers.message_id,
            mode=facts.mode,
            instance=self.store.instance_id,
        )

    async def _queue(self, envelope: Envelope, body: Iterable[bytes],
                     data: bytes | None, lease: float) -> Reply:
        """Queue mode: store; hand the message to a delivery slot reserved for it, or
        wake the runner."""
        runner = self.runner
        now = envelope.received_at
        lease_until = now + lease
        claim = None
        reserved = runner is not None and runner.reserve(envelope.mailbox)
        try:
            if reserved:
                assert runner is not None
                claim = await self.store.accept_and_claim(envelope, body, now, lease_until,
                                                          runner.claim_limit)
            else:
                await self.store.accept(envelope, body, lease_until=None)
        except StoreUnavailable as e:
            log.error("storing a message failed: {why}", why=e)
            return replies.STORAGE_FAILURE
        finally:
            if reserved and claim is None:
                assert runner is not None
                runner.unreserve()
        self._accepted(envelope)
        if runner is not None:
            if claim is not None:
                runner.take(claim, data)
            else:
                runner.queued(envelope.mailbox)
        return replies.QUEUED.format(id=envelope.id)

    async def _receive_direct(self, envelope: Envelope, body: Iterable[bytes],
                              lease: float) -> Reply:
        try:
            await self._store_leased(envelope, body, lease)
        except StoreUnavailable as e:
            log.error("storing a message failed: {why}", why=e)
            return replies.STORAGE_FAILURE
        self._accepted(envelope)
        transition = await self._deliver_direct(envelope)
        return direct_reply(envelope.id, transition)

    def _accepted(self, envelope: Envelope) -> None:
        if self.metrics is not None:
            self.metrics.received(envelope)
        log.info("{id} accepted from {host} user={user} sender=<{sender}> recipients={n} "
                 "size={size}", id=envelope.id, host=envelope.client_address,
                 user=envelope.auth_user, sender=envelope.sender, n=len(envelope.recipients),
                 size=envelope.size)

    # -- direct mode -------------------------------------------------------------------------

    async def _store_leased(self, envelope: Envelope, body: Iterable[bytes],
                            lease: float) -> None:
        """Store a direct-mode message already leased to this instance."""
        await self.store.accept(envelope, body, lease_until=envelope.received_at + lease)

    async def _deliver_direct(self, envelope: Envelope) -> Transition:
        """The reply waits for the provider (bounded by delivery.direct_timeout)."""
        assert self.runner is not None, "direct mode needs the queue runner"
        claim = Claim(id=envelope.id, sender=envelope.sender, mailbox=envelope.mailbox,
                      recipients=envelope.recipients, age_from=envelope.received_at,
                      size=envelope.size, attempts=0, mode="direct")
        transition: Transition = await self.runner.deliver_direct(claim)
        return transition

    # -- the admin's test message ----------------------------------------------------------

    def test_message(self, facts: Transaction, message: Prepared) -> defer.Deferred[Transition]:
        """Store ``message`` and deliver it directly -> Deferred[its Transition].

        Fails with :class:`NotStored` when it could not be stored.  No policy
        applies (the relay wrote it, From is sender.default) and it is not
        counted as received."""
        return defer.Deferred.fromCoroutine(self._test_message(facts, message))

    async def _test_message(self, facts: Transaction, message: Prepared) -> Transition:
        envelope = self._envelope(
            facts, message.id, message.received_at, len(message.data), mailbox=facts.sender,
            headers=_Headers(header_from=message.header_from, subject=message.subject,
                             message_id=message.message_id),
        )
        try:
            await self._store_leased(envelope, [message.data], self.config.delivery.lease)
        except StoreUnavailable as e:
            raise NotStored(str(e)) from e
        log.info("{id} test message to {to} from the admin API", id=envelope.id,
                 to=", ".join(envelope.recipients))
        return await self._deliver_direct(envelope)


def direct_reply(message_id: str, transition: Transition) -> Reply:
    """The SMTP reply for a direct-mode delivery's transition."""
    detail = transition.attempt.detail.replace("\r", " ").replace("\n", " ")[:400]
    if transition.status is Status.SENT:
        return replies.SENT.format(id=message_id)
    results = [r for r, _ in transition.recipient_results.values()]
    if Result.SENT in results:
        # one reply for all recipients: those accepted must not be sent twice
        return replies.SENT_TO_SOME.format(id=message_id, sent=results.count(Result.SENT),
                                           total=len(results), detail=detail)
    if Result.TEMPORARY in results:
        failed = replies.DELIVERY_DEFERRED
        return attr.evolve(failed, status=_status_in(detail, "4"), text=detail or failed.text)
    failed = replies.DELIVERY_FAILED
    return attr.evolve(failed, status=_status_in(detail, "5"), text=detail or failed.text)


def _status_in(detail: str, klass: str) -> str:
    """The enhanced status code a provider's detail carries, in ``klass``."""
    m = re.search(r"\b[245]\.(\d{1,3})\.(\d{1,3})\b", detail)
    if m:
        return f"{klass}.{m.group(1)}.{m.group(2)}"
    if klass == "4" and "within" in detail:
        return "4.4.1"
    return f"{klass}.0.0"
