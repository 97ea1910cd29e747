"""Blocking token libraries (msal, google-auth) kept off the reactor thread.

``TokenThreads`` is a small dedicated thread pool (so token refreshes never
wait behind, or starve, other thread users) with one ``DeferredLock`` per
credential: a credential is refreshed by one caller at a time, and callers
that arrive meanwhile share that refresh's result rather than starting
their own.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class TokenThreads:
    # the reactor: IReactorCore (shutdown trigger) and IReactorFromThreads together,
    # which no single interface names
    def __init__(self, reactor: Any, size: int = 2, name: str = "smtprelay-tokens") -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=size, name=name)
        self._started = False
        self._locks: dict[Hashable, defer.DeferredLock] = {}
        self._trigger: Any = None

    def _start(self) -> None:
        if not self._started:
            self._pool.start()
            self._started = True
            self._trigger = self._reactor.addSystemEventTrigger(
                "during", "shutdown", self._pool.stop)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        """Run ``fn`` on a token thread -> Deferred of its result."""
        self._start()
        return threads.deferToThreadPool(self._reactor, self._pool, fn, *args, **kwargs)

    def lock(self, key: Hashable) -> defer.DeferredLock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = defer.DeferredLock()
        return lock

    def stop(self) -> defer.Deferred[None]:
        if self._started:
            self._started = False
            if self._trigger is not None:
                self._reactor.removeSystemEventTrigger(self._trigger)
                self._trigger = None
            return threads.deferToThread(self._pool.stop)
        return defer.succeed(None)
