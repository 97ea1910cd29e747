"""Database threads: one writer with group commit, a small pool of readers.

Blocking DB-API calls never run on the reactor thread.  Every write is a
function ``fn(conn) -> result`` handed to the single writer thread, which
takes all writes queued at that moment, runs each inside its own savepoint,
and commits them together: one fsync for many messages from many sessions
(group commit), while a failing write rolls back only itself.  Results are
delivered on the reactor thread only after the commit returned.

A connection the dialect calls broken (a database server restarted, failed
over, or ended the session) is dropped and a new one opened: the writer
retries a batch whose BEGIN found the connection dead (nothing of it was
sent yet), but a batch that lost its connection later fails as a whole, as
its callers must hear (a 451 for an accept), and the next batch reconnects.
Readers retry a read once on a new connection (reads change nothing).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

if TYPE_CHECKING:
    from smtprelay.store._sql import Dialect

_STOP = object()

Op = Callable[[Any], Any]  # a write or a read: fn(connection) -> result
Result = tuple["Deferred[Any]", bool, Any]  # (whose, succeeded, value or Failure)


class Writer:
    """The one thread that writes; ``submit(fn)`` -> Deferred fired after commit."""

    def __init__(self, reactor: IReactorFromThreads, connect: Callable[[], Any],
                 dialect: Dialect, name: str = "smtprelay-db-writer", max_batch: int = 256,
                 reconnect_delay: float = 1.0) -> None:
        self._reactor = reactor
        self._connect = connect
        self._dialect = dialect
        self._queue: queue.SimpleQueue[tuple[Any, Deferred[Any] | None]] = queue.SimpleQueue()
        self._max_batch = max_batch
        self._reconnect_delay = reconnect_delay
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopped: Deferred[None] = defer.Deferred()
        self._started: Deferred[None] = defer.Deferred()
        self._conn: Any = None
        self._connect_error: Exception | None = None  # why the last connection attempt failed
        self._connect_after = 0.0  # monotonic time before which no new attempt is made
        self.batches = 0
        self.ops = 0
        self.reconnects = 0

    def start(self) -> Deferred[None]:
        self._thread.start()
        return self._started

    def submit(self, fn: Op) -> Deferred[Any]:
        d: Deferred[Any] = defer.Deferred()
        self._queue.put((fn, d))
        return d

    def stop(self) -> Deferred[None]:
        self._queue.put((_STOP, None))
        return self._stopped

    @staticmethod
    def _fire(results: list[Result]) -> None:
        for d, ok, value in results:
            if ok:
                d.callback(value)
            else:
                d.errback(value)

    def _run(self) -> None:
        try:
            # the first connection must work: a wrong URL ends start-up, clearly
            self._conn = self._connect()
        except BaseException:
            f = Failure()
            self._reactor.callFromThread(self._started.errback, f)
            self._reactor.callFromThread(self._stopped.callback, None)
            return
        self._reactor.callFromThread(self._started.callback, None)
        stopping = False
        try:
            while not stopping:
                batch = [self._queue.get()]
                while len(batch) < self._max_batch:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                ops: list[tuple[Op, Deferred[Any]]] = []
                for fn, d in batch:
                    if fn is _STOP or d is None:
                        stopping = True
                    else:
                        ops.append((fn, d))
                if ops:
                    self._run_batch(ops)
        finally:
            self._drop()
            self._reactor.callFromThread(self._stopped.callback, None)

    # -- the connection -------------------------------------------------------------

    def _open(self) -> Any:
        """The connection, opening a new one after a loss (at most one attempt
        per ``reconnect_delay``, so that a database that is down fails the
        writes queued meanwhile at once instead of each waiting for a timeout)."""
        if self._conn is not None:
            return self._conn
        if time.monotonic() < self._connect_after and self._connect_error is not None:
            raise self._connect_error
        try:
            self._conn = self._connect()
        except Exception as e:
            self._connect_error = e
            self._connect_after = time.monotonic() + self._reconnect_delay
            raise
        self._connect_error = None
        self.reconnects += 1
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def _begin(self) -> Any:
        dialect = self._dialect
        conn = self._open()
        try:
            dialect.begin_write(conn)
        except BaseException:
            if not dialect.is_broken(conn):
                raise
            # the connection died while idle (a server restart, a failover, an
            # administrator ending the session): nothing of this batch was sent
            # on it, so one more try on a new connection is safe
            self._drop()
            conn = self._open()
            dialect.begin_write(conn)
        return conn

    # -- one batch ----------------------------------------------------------------------

    def _run_batch(self, ops: list[tuple[Op, Deferred[Any]]]) -> None:
        dialect = self._dialect
        try:
            conn = self._begin()
        except BaseException:
            f = Failure()
            if self._conn is not None:
                self._reset(self._conn)
            self._deliver([(d, False, f) for _, d in ops])
            return
        results: list[Result] = []
        lost: Failure | None = None  # the failure that took the whole transaction with it
        for i, (fn, d) in enumerate(ops):
            if lost is not None:
                results.append((d, False, lost))
                continue
            savepoint = f"op{i}"
            try:
                dialect.execute(conn, f"SAVEPOINT {savepoint}")
                value = fn(conn)
                dialect.execute(conn, f"RELEASE SAVEPOINT {savepoint}")
                results.append((d, True, value))
            except BaseException:
                f = Failure()
                results.append((d, False, f))
                if not dialect.in_transaction(conn):
                    # e.g. SQLITE_FULL rolls the transaction back by itself: what ran
                    # before is gone, and what follows must not run in autocommit
                    lost = f
                    continue
                try:
                    dialect.execute(conn, f"ROLLBACK TO SAVEPOINT {savepoint}")
                    dialect.execute(conn, f"RELEASE SAVEPOINT {savepoint}")
                except BaseException:
                    lost = Failure()
        if lost is None:
            try:
                dialect.commit(conn)
            except BaseException:
                lost = Failure()
        if lost is not None:
            self._reset(conn)
            # nothing of this batch is stored: every caller learns it
            results = [(d, False, value if not ok else lost) for d, ok, value in results]
        self.batches += 1
        self.ops += len(ops)
        self._deliver(results)

    def _reset(self, conn: Any) -> None:
        try:
            self._dialect.rollback(conn)
        except BaseException:
            pass
        if self._dialect.is_broken(conn):
            # the next batch connects anew
            self._drop()

    def _deliver(self, results: list[Result]) -> None:
        # one wake-up of the reactor per commit, not one per write
        self._reactor.callFromThread(self._fire, results)


class Readers:
    """A few threads, each with its own connection, for read-only queries."""

    def __init__(self, reactor: IReactorFromThreads, connect: Callable[[], Any], size: int = 2,
                 name: str = "smtprelay-db-reader", dialect: Dialect | None = None) -> None:
        self._reactor = reactor
        self._connect = connect
        self._dialect = dialect
        self._pool = ThreadPool(minthreads=1, maxthreads=size, name=name)
        self._local = threading.local()
        self._conns: list[Any] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        self._pool.start()

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _discard(self, conn: Any) -> None:
        self._local.conn = None
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)
        try:
            conn.close()
        except Exception:
            pass

    def _broken(self, conn: Any) -> bool:
        # without a dialect to ask, any failure may have broken the connection
        return True if self._dialect is None else self._dialect.is_broken(conn)

    def _call(self, fn: Op) -> Any:
        for retry in (True, False):
            conn = self._conn()
            try:
                return fn(conn)
            except BaseException:
                if not self._broken(conn):
                    raise
                # not kept for the next query; a read changes nothing, so it
                # runs once more on a new connection (a server restart, a
                # failover or an ended session costs the caller nothing)
                self._discard(conn)
                if not retry:
                    raise
            finally:
                try:
                    conn.rollback()
                except Exception:
                    pass

    def run(self, fn: Op) -> Deferred[Any]:
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self._reactor, self._pool, self._call, fn)

    def stop(self) -> None:
        self._pool.stop()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.close()
                except Exception:
                    pass
            self._conns.clear()
