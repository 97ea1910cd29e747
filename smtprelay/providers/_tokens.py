"""Blocking token libraries (msal, google-auth) kept off the reactor thread.

``TokenThreads`` is a small dedicated thread pool (so token refreshes never
wait behind, or starve, other thread users) with one ``DeferredLock`` per
credential: a credential is refreshed by one caller at a time, and callers
that arrive meanwhile share that refresh's result rather than starting
their own.
"""

from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool


class TokenThreads:
    def __init__(self, reactor, size=2, name="smtprelay-tokens"):
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=size, name=name)
        self._started = False
        self._locks = {}
        self._trigger = None

    def _start(self):
        if not self._started:
            self._pool.start()
            self._started = True
            self._trigger = self._reactor.addSystemEventTrigger(
                "during", "shutdown", self._pool.stop)

    def run(self, fn, *args, **kwargs):
        """Run ``fn`` on a token thread -> Deferred of its result."""
        self._start()
        return threads.deferToThreadPool(self._reactor, self._pool, fn, *args, **kwargs)

    def lock(self, key):
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = defer.DeferredLock()
        return lock

    def stop(self):
        if self._started:
            self._started = False
            if self._trigger is not None:
                self._reactor.removeSystemEventTrigger(self._trigger)
                self._trigger = None
            return threads.deferToThread(self._pool.stop)
        return defer.succeed(None)
