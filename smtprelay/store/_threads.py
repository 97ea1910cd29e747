"""Database threads: one writer with group commit, a small pool of readers.

Blocking DB-API calls never run on the reactor thread.  Every write is a
function ``fn(conn) -> result`` handed to the single writer thread, which
takes all writes queued at that moment, runs each inside its own savepoint,
and commits them together: one fsync for many messages from many sessions
(group commit), while a failing write rolls back only itself.  Results are
delivered on the reactor thread only after the commit returned.
"""

import queue
import threading

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

_STOP = object()


class Writer:
    """The one thread that writes; ``submit(fn)`` -> Deferred fired after commit."""

    def __init__(self, reactor, connect, dialect, name="smtprelay-db-writer", max_batch=256):
        self._reactor = reactor
        self._connect = connect
        self._dialect = dialect
        self._queue = queue.SimpleQueue()
        self._max_batch = max_batch
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopped = defer.Deferred()
        self._started = defer.Deferred()
        self.batches = 0
        self.ops = 0

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
            conn = self._connect()
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
                    self._run_batch(conn, ops)
        finally:
            try:
                conn.close()
            except Exception:
                pass
            self._reactor.callFromThread(self._stopped.callback, None)

    def _run_batch(self, conn, ops):
        dialect = self._dialect
        try:
            dialect.begin_write(conn)
        except BaseException:
            f = Failure()
            self._reset(conn)
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

    def _deliver(self, results):
        # one wake-up of the reactor per commit, not one per write
        self._reactor.callFromThread(self._fire, results)


class Readers:
    """A few threads, each with its own connection, for read-only queries."""

    def __init__(self, reactor, connect, size=2, name="smtprelay-db-reader"):
        self._reactor = reactor
        self._connect = connect
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

    def _call(self, fn):
        conn = self._conn()
        try:
            return fn(conn)
        except BaseException:
            # a broken connection is not kept for the next query
            self._local.conn = None
            try:
                conn.close()
            except Exception:
                pass
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
