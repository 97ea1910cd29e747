"""The IStore implementation shared by every database: threads plus _sql.

A subclass supplies ``connect()`` (a new DB-API connection, configured) and a
``dialect``; everything else (group-committed writes, read threads, lease
ownership, error translation) is here once.
"""

import os
import socket

from twisted.internet import defer
from zope.interface import implementer

from smtprelay import __version__
from smtprelay.model import Status
from smtprelay.store import _sql
from smtprelay.store._threads import Readers, Writer
from smtprelay.store.interface import IStore, StoreUnavailable


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@implementer(IStore)
class ThreadedSQLStore:
    dialect = None
    readers = 2

    def __init__(self, reactor, provider_type="", hostname=None):
        self._reactor = reactor
        self.provider_type = provider_type
        self.hostname = hostname or socket.gethostname()
        self.pid = os.getpid()
        self.instance_id = _sql.new_instance_id(self.hostname, self.pid)
        self._writer = None
        self._readers = None

    # -- subclass hooks -----------------------------------------------------

    def connect(self):
        raise NotImplementedError

    def prepare(self):
        """Blocking set-up before the threads start (e.g. make a folder)."""

    def migrate_schema(self, conn):
        _sql.migrate(self.dialect, conn)

    # -- plumbing -------------------------------------------------------------

    def _write(self, fn):
        d = self._writer.submit(fn)
        d.addErrback(self._unavailable)
        return d

    def _read(self, fn):
        d = self._readers.run(fn)
        d.addErrback(self._unavailable)
        return d

    @staticmethod
    def _unavailable(failure):
        if failure.check(StoreUnavailable, KeyError, ValueError, _sql.SchemaTooNew):
            return failure
        # the database refused the write (or could not answer): the caller
        # answers 451 and stores nothing
        raise StoreUnavailable(f"{failure.type.__name__}: {failure.getErrorMessage()}")

    # -- lifecycle --------------------------------------------------------------

    @defer.inlineCallbacks
    def start(self, now):
        from twisted.internet.threads import deferToThread

        yield deferToThread(self.prepare)
        self._writer = Writer(self._reactor, self.connect, self.dialect)
        try:
            yield self._writer.start()
        except BaseException:
            self._writer = None
            raise
        self._readers = Readers(self._reactor, self.connect, size=self.readers,
                                dialect=self.dialect)
        self._readers.start()
        d = self.dialect
        try:
            # several instances starting at once take turns here (lock_schema)
            yield self._write(lambda c: self.migrate_schema(c))
            yield self._write(lambda c: _sql.register_instance(
                d, c, self.instance_id, self.hostname, self.pid, now, __version__))
        except BaseException:
            yield self._writer.stop()
            self._readers.stop()
            self._writer = None
            raise

    @defer.inlineCallbacks
    def stop(self, now):
        if self._writer is None:
            return
        try:
            yield self._write(lambda c: _sql.set_instance_state(
                self.dialect, c, self.instance_id, "stopped", now))
        except Exception:
            pass
        yield self._writer.stop()
        self._readers.stop()
        self._writer = None

    # -- receiving ----------------------------------------------------------------

    def accept(self, envelope, body, lease_until=None):
        d = self.dialect
        status = Status.ACTIVE if lease_until is not None else Status.QUEUED
        owner = self.instance_id if lease_until is not None else None
        return self._write(lambda c: _sql.insert_message(
            d, c, envelope, body, status, owner, lease_until))

    def accept_and_claim(self, envelope, body, now, lease_until, concurrency):
        d = self.dialect
        return self._write(lambda c: _sql.insert_and_claim(
            d, c, envelope, body, self.instance_id, now, lease_until, concurrency))

    # -- delivering ---------------------------------------------------------------

    def claim(self, now, limit, lease_until, concurrency):
        return self._write(lambda c: _sql.claim(
            self.dialect, c, self.instance_id, now, limit, lease_until, concurrency))

    def claim_one(self, message_id, now, lease_until):
        return self._write(lambda c: _sql.claim_one(
            self.dialect, c, self.instance_id, message_id, now, lease_until))

    def read_body(self, message_id):
        return self._read(lambda c: _sql.read_body(self.dialect, c, message_id))

    def finish(self, message_id, transition):
        return self._write(lambda c: _sql.finish(
            self.dialect, c, self.instance_id, message_id, transition))

    def renew_leases(self, now, lease_until, message_ids=None):
        ids = None if message_ids is None else list(message_ids)
        return self._write(lambda c: _sql.renew_leases(
            self.dialect, c, self.instance_id, now, lease_until, ids))

    def release(self, message_ids, now):
        ids = list(message_ids)
        return self._write(lambda c: _sql.release(self.dialect, c, self.instance_id, ids, now))

    def block_mailbox(self, mailbox, until):
        return self._write(lambda c: _sql.block_mailbox(self.dialect, c, mailbox, until))

    def recover(self, now):
        def alive(pid, instance_id):
            return instance_id == self.instance_id or _pid_alive(pid)

        return self._write(lambda c: _sql.recover(self.dialect, c, self.hostname, alive, now))

    def purge(self, before):
        return self._write(lambda c: _sql.purge(self.dialect, c, before))

    # -- admin ------------------------------------------------------------------------

    def stats(self, now):
        return self._read(lambda c: _sql.stats(self.dialect, c, now))

    def deliveries(self, query):
        return self._read(lambda c: _sql.deliveries(self.dialect, c, query, self.provider_type))

    def delivery(self, message_id):
        return self._read(lambda c: _sql.delivery(
            self.dialect, c, message_id, self.provider_type))

    def requeue(self, message_id, now):
        return self._write(lambda c: _sql.requeue(self.dialect, c, message_id, now))

    def cancel(self, message_id, now, detail):
        return self._write(lambda c: _sql.cancel(self.dialect, c, message_id, now, detail))

    def instances(self, now):
        return self._read(lambda c: _sql.instances(self.dialect, c, now))

    def ping(self):
        return self._read(lambda c: _sql.fetchone(self.dialect, c, "SELECT 1"))
