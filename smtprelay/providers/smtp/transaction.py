"""One mail transaction on an upstream connection: MAIL, RCPT, DATA, the body, the outcome.

This module owns the steps of relaying one stored message over a connection
that is already set up, and what each reply means for each recipient:
addresses that cannot go on the wire and a message over the server's SIZE are
refused before anything is sent; RSET, MAIL and every RCPT go in one write
when the server offers PIPELINING; a failure after the end of data went out
is ambiguous (the message may have been delivered).  One attempt, never
retried here: the queue owns retries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from twisted.internet import defer

from smtprelay.model import Outcome, Result
from smtprelay.providers.smtp import replies
from smtprelay.providers.smtp.errors import ConnectionFailed, PrematureReply, ProtocolViolation

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from smtprelay.providers.base import OutgoingMessage
    from smtprelay.providers.smtp.client import UpstreamProtocol

# (Result, detail) per recipient, as Outcome.recipients holds them
Results = dict[str, tuple[Result, str]]


def path(address: str) -> bytes:
    """``<address>`` for MAIL FROM / RCPT TO, or ValueError when it cannot go on the wire."""
    if any(c in address for c in "\r\n\x00<>") or not address.isascii():
        raise ValueError(f"{replies.one_line(repr(address), 100)} cannot be sent over SMTP")
    return b"<" + address.encode("ascii") + b">"


class _Finished(Exception):
    """The transaction is over before its end of data: ``outcome`` says how."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.detail)
        self.outcome = outcome


class MailTransaction:
    """One message over ``proto``: ``await run()`` -> ``(Outcome, failed_before_data)``.

    ``failed_before_data`` is True when the connection failed (not a reply)
    before the DATA command went out: nothing can have been delivered, and a
    reused connection may simply have gone stale.  ``describe`` gives the
    one-line reason for a failure without a usable reply.
    """

    def __init__(self, proto: UpstreamProtocol, message: OutgoingMessage, reused: bool,
                 where: str, describe: Callable[[Exception], str]) -> None:
        self.proto = proto
        self.message = message
        self.reused = reused
        self.where = where
        self.describe = describe
        self.results: Results = {}
        self.recipients = list(dict.fromkeys(message.recipients))
        self.paths: list[tuple[str, bytes]] = []  # the recipients that can go on the wire
        self.accepted: list[str] = []  # the recipients the server took

    def finish(self, ambiguous: bool = False, provider_id: str | None = None) -> Outcome:
        merged = {r: self.results[r] for r in self.recipients}
        result, detail = replies.combine(merged)
        return Outcome(result, detail, recipients=merged, ambiguous=ambiguous and
                       result is not Result.SENT, provider_id=provider_id)

    def _refuse(self, addresses: list[str], result: Result, detail: str) -> Outcome:
        for r in addresses:
            self.results[r] = (result, detail)
        return self.finish()

    async def run(self) -> tuple[Outcome, bool]:
        try:
            sender = self._envelope()
            return await self._exchange(sender), False
        except _Finished as done:
            return done.outcome, False
        except ConnectionFailed as e:
            return self._connection_failed(e)

    # -- before anything is sent --------------------------------------------------------

    def _envelope(self) -> bytes:
        """The sender's path; the recipients' in ``paths``.  Raises _Finished when
        nothing can be sent."""
        message = self.message
        try:
            sender = path(message.sender)
        except ValueError as e:
            raise _Finished(self._refuse(self.recipients, Result.PERMANENT,
                                         f"envelope sender {e}")) from None
        for r in self.recipients:
            try:
                self.paths.append((r, path(r)))
            except ValueError as e:
                self.results[r] = (Result.PERMANENT, f"recipient {e}")
        if not self.paths:
            raise _Finished(self.finish())
        limit = replies.size_limit(self.proto.extensions)
        if limit is not None and message.size > limit:
            detail = (f"message of {message.size} bytes exceeds the {limit} bytes {self.where} "
                      "accepts (its SIZE)")
            raise _Finished(self._refuse([r for r, _ in self.paths], Result.PERMANENT, detail))
        return sender

    # -- on the wire ------------------------------------------------------------------------

    async def _exchange(self, sender: bytes) -> Outcome:
        proto = self.proto
        mail_reply, rcpt_replies = await self._mail_and_rcpt(self._mail_command(sender))
        self._check_stale(mail_reply)
        if not mail_reply.positive:
            return self._sender_refused(mail_reply)
        for (r, _), reply in zip(self.paths, rcpt_replies):
            if reply.positive:
                self.accepted.append(r)
            else:
                self.results[r] = (replies.classify(reply, "rcpt"), str(reply))
        if not self.accepted:
            # nothing to send; the next reuse starts with RSET
            return self.finish()
        proto.data_sent = True
        reply = await proto.command(b"DATA", "DATA")
        if reply.code != 354:
            result = replies.classify(reply, "data") if reply.code >= 400 else Result.TEMPORARY
            return self._refuse(self.accepted, result, f"DATA refused: {reply}")
        body: Any = self.message.body  # a seekable binary file (OutgoingMessage)
        reply = await proto.send_body(body)
        proto.in_transaction = False  # the reply to the end of data ends it
        return self._end_of_data(reply)

    def _mail_command(self, sender: bytes) -> bytes:
        extensions = self.proto.extensions
        mail = b"MAIL FROM:" + sender
        if "SIZE" in extensions:
            mail += b" SIZE=%d" % self.message.size
        if "8BITMIME" in extensions:
            # stored messages may hold 8-bit text; declare it where we can
            mail += b" BODY=8BITMIME"
        return mail

    async def _mail_and_rcpt(self, mail: bytes) -> tuple[replies.Reply, list[replies.Reply]]:
        """MAIL's reply and those to RCPT (none when MAIL was refused without pipelining)."""
        # A transaction that ended with the reply to its end of data leaves
        # the session clean (RFC 5321 4.1.1.4): the next MAIL needs no RSET.
        # One that stopped earlier (every recipient refused) is reset first.
        reset = self.reused and self.proto.in_transaction
        if "PIPELINING" in self.proto.extensions:
            return await self._pipelined(mail, reset)
        return await self._one_by_one(mail, reset)

    async def _pipelined(self, mail: bytes,
                         reset: bool) -> tuple[replies.Reply, list[replies.Reply]]:
        # RFC 2920: RSET, MAIL and every RCPT in one go, the replies in order
        proto = self.proto
        sent = [proto.command(b"RSET", "RSET")] if reset else []
        sent.append(proto.command(mail, "MAIL FROM"))
        proto.in_transaction = True
        sent += [proto.command(b"RCPT TO:" + p, "RCPT TO") for _, p in self.paths]
        answers = await defer.DeferredList(sent, consumeErrors=True)
        for ok, value in answers:
            if not ok:
                cast("Failure", value).raiseException()
        got = [value for _, value in answers]
        if reset:
            self._check_rset(got.pop(0))
        return got[0], got[1:]

    async def _one_by_one(self, mail: bytes,
                          reset: bool) -> tuple[replies.Reply, list[replies.Reply]]:
        proto = self.proto
        if reset:
            self._check_rset(await proto.command(b"RSET", "RSET"))
        mail_reply = await proto.command(mail, "MAIL FROM")
        proto.in_transaction = True
        rcpt_replies = []
        if mail_reply.positive:
            for _, p in self.paths:
                rcpt_replies.append(await proto.command(b"RCPT TO:" + p, "RCPT TO"))
        return mail_reply, rcpt_replies

    def _check_rset(self, reply: replies.Reply) -> None:
        if not reply.positive:
            self._fail(ProtocolViolation(f"RSET refused: {reply}"))

    def _check_stale(self, mail_reply: replies.Reply) -> None:
        if self.reused and mail_reply.code == 421:
            # the server was closing the idle connection as we spoke: a stale
            # connection, not an answer about this message
            self._fail(ConnectionFailed(f"{self.where} is closing the connection: {mail_reply}"))

    def _fail(self, exc: ConnectionFailed) -> None:
        """End the connection with ``exc`` and raise why it ended."""
        self.proto.abort(exc)
        raise self.proto.failure or exc

    # -- what the replies mean ----------------------------------------------------------------

    def _sender_refused(self, mail_reply: replies.Reply) -> Outcome:
        result = replies.classify(mail_reply, "mail")
        if result is Result.SENT:  # 2xx other than what MAIL should get
            result = Result.TEMPORARY
        detail = f"sender <{self.message.sender}> refused: {mail_reply}"
        return self._refuse([r for r, _ in self.paths], result, detail)

    def _end_of_data(self, reply: replies.Reply) -> Outcome:
        if reply.positive:
            for r in self.accepted:
                self.results[r] = (Result.SENT, str(reply))
            return self.finish(provider_id=replies.queue_id(reply))
        return self._refuse(self.accepted, replies.classify(reply, "dot"), str(reply))

    def _connection_failed(self, e: ConnectionFailed) -> tuple[Outcome, bool]:
        proto = self.proto
        proto.abort(e)
        if isinstance(e, PrematureReply):
            result = replies.classify(e.reply, "dot")
            if result is Result.SENT:
                result = Result.TEMPORARY
            return self._refuse(self.accepted, result, self.describe(e)), False
        detail = self.describe(e)
        ambiguous = proto.dot_sent
        if ambiguous:
            detail += ("; the message may have been delivered (it will be sent again: "
                       "at-least-once)")
        for r, _ in self.paths:
            if r not in self.results or r in self.accepted:
                self.results[r] = (Result.TEMPORARY, detail)
        return self.finish(ambiguous=ambiguous), not proto.data_sent
