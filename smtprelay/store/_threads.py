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

import queue
import threading
import time

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

_STOP = object()


class Writer:
    """The one thread that writes; ``submit(fn)`` -> Deferred fired after commit."""

    def __init__(self, reactor, connect, dialect, name="smtprelay-db-writer", max_batch=256,
                 reconnect_delay=1.0):
        self._reactor = reactor
        self._connect = connect
        self._dialect = dialect
        self._queue = queue.SimpleQueue()
        self._max_batch = max_batch
        self._reconnect_delay = reconnect_delay
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopped = defer.Deferred()
        self._started = defer.Deferred()
        self._conn = None
        self._connect_error = None  # why the last connection attempt failed
        self._connect_after = 0.0  # monotonic time before which no new attempt is made
        self.batches = 0
        self.ops = 0
        self.reconnects = 0

    def start(self):
        self._thread.start()
        return self._started

    def submit(self, fn):
        d = defer.Deferred()
        self._queue.put((fn, d))
        return d

    def stop(self):
        self._queue.put((_STOP, None))
        return self._stopped

    @staticmethod
    def _fire(results):
        for d, ok, value in results:
            if ok:
                d.callback(value)
            else:
                d.errback(value)

    def _run(self):
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
                ops = []
                for fn, d in batch:
                    if fn is _STOP:
                        stopping = True
                    else:
                        ops.append((fn, d))
                if ops:
                    self._run_batch(ops)
        finally:
            self._drop()
            self._reactor.callFromThread(self._stopped.callback, None)

    # -- the connection -------------------------------------------------------------

    def _open(self):
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

    def _drop(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def _begin(self):
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

    def _run_batch(self, ops):
        dialect = self._dialect
        try:
            conn = self._begin()
        except BaseException:
            f = Failure()
            if self._conn is not None:
                self._reset(self._conn)
            self._deliver([(d, False, f) for _, d in ops])
            return
        results = []
        lost = None  # the failure that took the whole transaction with it
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

    def _reset(self, conn):
        try:
            self._dialect.rollback(conn)
        except BaseException:
            pass
        if self._dialect.is_broken(conn):
            # the next batch connects anew
            self._drop()

    def _deliver(self, results):
        # one wake-up of the reactor per commit, not one per write
        self._reactor.callFromThread(self._fire, results)


class Readers:
    """A few threads, each with its own connection, for read-only queries."""

    def __init__(self, reactor, connect, size=2, name="smtprelay-db-reader", dialect=None):
        self._reactor = reactor
        self._connect = connect
        self._dialect = dialect
        self._pool = ThreadPool(minthreads=1, maxthreads=size, name=name)
        self._local = threading.local()
        self._conns = []
        self._lock = threading.Lock()

    def start(self):
        self._pool.start()

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _discard(self, conn):
        self._local.conn = None
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)
        try:
            conn.close()
        except Exception:
            pass

    def _broken(self, conn):
        # without a dialect to ask, any failure may have broken the connection
        return True if self._dialect is None else self._dialect.is_broken(conn)

    def _call(self, fn):
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

    def run(self, fn):
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self._reactor, self._pool, self._call, fn)

    def stop(self):
        self._pool.stop()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.close()
                except Exception:
                    pass
            self._conns.clear()
