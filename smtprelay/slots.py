"""Per-mailbox slots: at most N holders per sending mailbox, in one process.

Used by the queue (provider calls per mailbox, ``delivery.concurrency``) and
by the Graph client (HTTP requests per mailbox, Graph's limit of 4).  A
mailbox's semaphore exists only while it has holders or waiters, so the map
stays as small as the set of mailboxes in use.
"""

from twisted.internet import defer


class MailboxSlots:
    def __init__(self, concurrency):
        self.concurrency = concurrency  # for mailboxes that start using slots from now
        self._sems = {}

    def acquire(self, mailbox):
        """-> Deferred that fires when ``mailbox`` has a free slot (now held)."""
        key = mailbox.lower()
        sem = self._sems.get(key)
        if sem is None:
            sem = self._sems[key] = defer.DeferredSemaphore(self.concurrency)
        return sem.acquire()

    def release(self, mailbox):
        key = mailbox.lower()
        sem = self._sems[key]
        sem.release()
        if sem.tokens == sem.limit and not sem.waiting:
            del self._sems[key]

    def in_flight(self, mailbox):
        sem = self._sems.get(mailbox.lower())
        return 0 if sem is None else sem.limit - sem.tokens

    def waiting(self):
        """Holders-to-be queued behind full mailboxes, over all mailboxes."""
        return sum(len(sem.waiting) for sem in self._sems.values())
