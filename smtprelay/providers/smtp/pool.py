"""The upstream connections the SMTP provider keeps: at most ``limit``, idle ones reused.

This module owns the reuse of authenticated connections across queued
messages: a slot per connection (connecting, busy or idle), idle connections
kept ``idle_seconds`` and then closed politely, and callers waiting for a slot
when all are busy.  It does not connect: a caller given a :class:`Slot` opens
the connection itself, and the connection releases the slot when it closes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from smtprelay.providers.smtp.client import UpstreamProtocol


class Slot:
    """One of the pool's ``limit`` connections (connecting, busy or idle)."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._pool._slot_freed()


class PoolClosed(Exception):
    pass


class Pool:
    """At most ``limit`` upstream connections; idle ones kept ``idle_seconds``.

    ``take()`` gives an idle connection, or None with a slot reserved for a
    new one, or waits until one of the two is possible.
    """

    def __init__(self, reactor: IReactorTime, limit: int, idle_seconds: float) -> None:
        self._reactor = reactor
        self.limit = max(1, limit)
        self.idle_seconds = idle_seconds
        self._count = 0  # slots held
        # most recently used last
        self._idle: list[tuple[UpstreamProtocol, IDelayedCall]] = []
        self._waiters: list[defer.Deferred[UpstreamProtocol | Slot]] = []
        self.closing = False

    def take(self, fresh: bool = False) -> defer.Deferred[UpstreamProtocol | Slot]:
        """-> Deferred[UpstreamProtocol | Slot]."""
        if self.closing:
            return defer.fail(PoolClosed("the provider is stopping"))
        if fresh:
            # a reused connection just failed: the other idle ones are suspect too
            self.close_idle()
        while self._idle:
            proto, timer = self._idle.pop()
            if timer.active():
                timer.cancel()
            if proto.usable:
                return defer.succeed(proto)
            proto.abort()
        if self._count < self.limit:
            self._count += 1
            return defer.succeed(Slot(self))

        def cancel(d: defer.Deferred[Any]) -> None:
            if d in self._waiters:
                self._waiters.remove(d)

        d: defer.Deferred[UpstreamProtocol | Slot] = defer.Deferred(cancel)
        self._waiters.append(d)
        return d

    def give_back(self, proto: UpstreamProtocol) -> None:
        """A connection whose transaction is over and that may be reused."""
        if self.closing or not proto.usable:
            proto.quit()
            return
        if self._waiters:
            self._waiters.pop(0).callback(proto)
            return
        if self.idle_seconds <= 0:
            proto.quit()
            return
        timer = self._reactor.callLater(self.idle_seconds, self._expire, proto)
        self._idle.append((proto, timer))

    def forget(self, proto: UpstreamProtocol) -> None:
        """``proto`` is closed: drop it from the idle list (its slot is released separately)."""
        for i, (p, timer) in enumerate(self._idle):
            if p is proto:
                if timer.active():
                    timer.cancel()
                del self._idle[i]
                return

    def _expire(self, proto: UpstreamProtocol) -> None:
        self.forget(proto)
        proto.quit()

    def _slot_freed(self) -> None:
        if self._waiters and not self.closing:
            # hand the slot straight to the first waiter
            self._waiters.pop(0).callback(Slot(self))
        else:
            self._count -= 1

    def close_idle(self) -> list[defer.Deferred[None]]:
        idle, self._idle = self._idle, []
        closing = []
        for proto, timer in idle:
            if timer.active():
                timer.cancel()
            closing.append(proto.quit())
        return closing

    def close(self) -> defer.Deferred[Any]:
        self.closing = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(PoolClosed("the provider is stopping"))
        return defer.DeferredList(self.close_idle(), consumeErrors=True)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def open_connections(self) -> int:
        return self._count
