"""Per-mailbox slots: at most N holders per sending mailbox, in one process.

Used by the queue (provider calls per mailbox, ``delivery.concurrency``) and
by the Graph client (HTTP requests per mailbox, Graph's limit of 4).  A
mailbox's entry exists only while it has holders or waiters, so the map
stays as small as the set of mailboxes in use.  The limit can change while
mailboxes are active (:meth:`MailboxSlots.resize`): a larger one lets
waiters in at once, a smaller one lets no new holder in until enough have
left.
"""

from __future__ import annotations

import attr
from twisted.internet import defer


@attr.define
class _Mailbox:
    held: int = 0
    waiting: list[defer.Deferred[None]] = attr.Factory(list)


class MailboxSlots:
    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._boxes: dict[str, _Mailbox] = {}

    def acquire(self, mailbox: str) -> defer.Deferred[None]:
        """-> Deferred that fires when ``mailbox`` has a free slot (now held).
        Cancelling it while it waits gives up the place in line."""
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        key = mailbox.lower()
        box = self._boxes.get(key)
        if box is None:
            box = self._boxes[key] = _Mailbox()
        if box.held < self.concurrency and not box.waiting:
            box.held += 1
            return defer.succeed(None)

        def cancel(d: defer.Deferred[None]) -> None:
            box.waiting.remove(d)
            self._forget_if_idle(key, box)

        d: defer.Deferred[None] = defer.Deferred(canceller=cancel)
        box.waiting.append(d)
        return d

    def release(self, mailbox: str) -> None:
        key = mailbox.lower()
        box = self._boxes[key]
        if box.held < 1:
            raise RuntimeError(f"a slot of {mailbox} released that was not held")
        box.held -= 1
        self._let_in(box)
        self._forget_if_idle(key, box)

    def resize(self, concurrency: int) -> None:
        """Holders per mailbox from now on, for the mailboxes already active too."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = concurrency
        for key, box in list(self._boxes.items()):
            self._let_in(box)
            self._forget_if_idle(key, box)

    def _let_in(self, box: _Mailbox) -> None:
        while box.waiting and box.held < self.concurrency:
            box.held += 1
            box.waiting.pop(0).callback(None)

    def _forget_if_idle(self, key: str, box: _Mailbox) -> None:
        if not box.held and not box.waiting and self._boxes.get(key) is box:
            del self._boxes[key]

    def in_flight(self, mailbox: str) -> int:
        box = self._boxes.get(mailbox.lower())
        return 0 if box is None else box.held

    def waiting(self) -> int:
        """Holders-to-be queued behind full mailboxes, over all mailboxes."""
        return sum(len(box.waiting) for box in self._boxes.values())
