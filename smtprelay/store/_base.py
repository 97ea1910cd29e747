"""The IStore implementation shared by every database: threads plus _sql.

A subclass supplies ``connect()`` (a new DB-API connection, configured) and a
``dialect``; everything else (group-committed writes, read threads, lease
ownership, error translation) is here once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Generator, Iterable
from typing import IO, Any, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure
from zope.interface import implementer

from smtprelay import __version__
from smtprelay.model import Claim, Envelope, Status, Transition
from smtprelay.store import _sql
from smtprelay.store._threads import Readers, Writer
from smtprelay.store.interface import IStore, StoreUnavailable
from smtprelay.store.query import DeliveryQuery
from smtprelay.store.rows import DeliveryPage, DeliveryRow, InstanceRow, Stats

T = TypeVar("T")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@implementer(IStore)
class ThreadedSQLStore:
    dialect: _sql.Dialect = _sql.Dialect()  # each subclass sets its own
    readers = 2

    def __init__(self, reactor: IReactorFromThreads, hostname: str | None = None) -> None:
        self._reactor = reactor
        self.hostname = hostname or socket.gethostname()
        self.pid = os.getpid()
        self.instance_id = _sql.new_instance_id(self.hostname, self.pid)
        self._writer: Writer | None = None
        self._readers: Readers | None = None

    # -- subclass hooks -----------------------------------------------------

    def connect(self) -> Any:
        raise NotImplementedError

    def prepare(self) -> None:
        """Blocking set-up before the threads start (e.g. make a folder)."""

    def migrate_schema(self, conn: Any) -> None:
        _sql.migrate(self.dialect, conn)

    # -- plumbing -------------------------------------------------------------

    def _write(self, fn: Callable[[Any], T]) -> Deferred[T]:
        if self._writer is None:
            raise StoreUnavailable("the store is not started")
        d = self._writer.submit(fn)
        d.addErrback(self._unavailable)
        return d

    def _read(self, fn: Callable[[Any], T]) -> Deferred[T]:
        if self._readers is None:
            raise StoreUnavailable("the store is not started")
        d = self._readers.run(fn)
        d.addErrback(self._unavailable)
        return d

    @staticmethod
    def _unavailable(failure: Failure) -> Failure:
        if failure.check(StoreUnavailable, KeyError, ValueError, _sql.SchemaTooNew):
            return failure
        # the database refused the write (or could not answer): the caller
        # answers 451 and stores nothing
        raise StoreUnavailable(f"{type(failure.value).__name__}: {failure.getErrorMessage()}")

    # -- lifecycle --------------------------------------------------------------

    @defer.inlineCallbacks
    def start(self, now: float) -> Generator[Deferred[Any], Any, None]:
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
    def stop(self, now: float) -> Generator[Deferred[Any], Any, None]:
        if self._writer is None:
            return
        try:
            yield self._write(lambda c: _sql.set_instance_state(
                self.dialect, c, self.instance_id, "stopped", now))
        except Exception:
            pass
        yield self._writer.stop()
        if self._readers is not None:
            self._readers.stop()
        self._writer = None

    # -- receiving ----------------------------------------------------------------

    def accept(self, envelope: Envelope, body: Iterable[bytes],
               lease_until: float | None = None) -> Deferred[int]:
        d = self.dialect
        status = Status.ACTIVE if lease_until is not None else Status.QUEUED
        owner = self.instance_id if lease_until is not None else None
        return self._write(lambda c: _sql.insert_message(
            d, c, envelope, body, status, owner, lease_until))

    def accept_and_claim(self, envelope: Envelope, body: Iterable[bytes], now: float,
                         lease_until: float, concurrency: int) -> Deferred[Claim | None]:
        d = self.dialect
        return self._write(lambda c: _sql.insert_and_claim(
            d, c, envelope, body, self.instance_id, now, lease_until, concurrency))

    # -- delivering ---------------------------------------------------------------

    def claim(self, now: float, limit: int, lease_until: float,
              concurrency: int) -> Deferred[list[Claim]]:
        return self._write(lambda c: _sql.claim(
            self.dialect, c, self.instance_id, now, limit, lease_until, concurrency))

    def claim_one(self, message_id: str, now: float,
                  lease_until: float) -> Deferred[Claim | None]:
        return self._write(lambda c: _sql.claim_one(
            self.dialect, c, self.instance_id, message_id, now, lease_until))

    def read_body(self, message_id: str) -> Deferred[IO[bytes]]:
        return self._read(lambda c: _sql.read_body(self.dialect, c, message_id))

    def finish(self, message_id: str, transition: Transition) -> Deferred[bool]:
        return self._write(lambda c: _sql.finish(
            self.dialect, c, self.instance_id, message_id, transition))

    def renew_leases(self, now: float, lease_until: float,
                     message_ids: Iterable[str] | None = None) -> Deferred[None]:
        ids = None if message_ids is None else list(message_ids)
        return self._write(lambda c: _sql.renew_leases(
            self.dialect, c, self.instance_id, now, lease_until, ids))

    def release(self, message_ids: Iterable[str], now: float) -> Deferred[None]:
        ids = list(message_ids)
        return self._write(lambda c: _sql.release(self.dialect, c, self.instance_id, ids, now))

    def block_mailbox(self, mailbox: str, until: float) -> Deferred[None]:
        return self._write(lambda c: _sql.block_mailbox(self.dialect, c, mailbox, until))

    def recover(self, now: float) -> Deferred[list[str]]:
        def alive(pid: int, instance_id: str) -> bool:
            return instance_id == self.instance_id or _pid_alive(pid)

        return self._write(lambda c: _sql.recover(self.dialect, c, self.hostname, alive, now))

    def purge(self, before: float) -> Deferred[int]:
        return self._write(lambda c: _sql.purge(self.dialect, c, before))

    # -- admin ------------------------------------------------------------------------

    def stats(self, now: float) -> Deferred[Stats]:
        return self._read(lambda c: _sql.stats(self.dialect, c, now))

    def deliveries(self, query: DeliveryQuery) -> Deferred[DeliveryPage]:
        return self._read(lambda c: _sql.deliveries(self.dialect, c, query))

    def delivery(self, message_id: str) -> Deferred[DeliveryRow | None]:
        return self._read(lambda c: _sql.delivery(self.dialect, c, message_id))

    def requeue(self, message_id: str, now: float) -> Deferred[str | None]:
        return self._write(lambda c: _sql.requeue(self.dialect, c, message_id, now))

    def cancel(self, message_id: str, now: float, detail: str) -> Deferred[str | None]:
        return self._write(lambda c: _sql.cancel(self.dialect, c, message_id, now, detail))

    def instances(self, now: float) -> Deferred[list[InstanceRow]]:
        return self._read(lambda c: _sql.instances(self.dialect, c, now))

    def ping(self) -> Deferred[Any]:
        return self._read(lambda c: _sql.fetchone(self.dialect, c, "SELECT 1"))
