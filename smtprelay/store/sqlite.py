"""The SQLite store: WAL, synchronous=FULL, one writer thread with group commit.

A 250 is sent only after the commit that holds the message returned, and with
``synchronous=FULL`` in WAL mode that commit has been fsynced.  Every write
transaction starts with ``BEGIN IMMEDIATE``, which takes the database's one
write lock: claims, and migrations of several stores opening one file at
once, are serialised by it without any further locking.
"""

from __future__ import annotations

import os
import sqlite3

from twisted.internet.interfaces import IReactorFromThreads

from smtprelay.store._base import ThreadedSQLStore
from smtprelay.store._sql import Dialect


class SQLiteDialect(Dialect):
    name = "sqlite"
    blob = "BLOB"

    def begin_write(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def in_transaction(self, conn: sqlite3.Connection) -> bool:
        return conn.in_transaction


def connect(path: str) -> sqlite3.Connection:
    """A configured connection to the database file ``path`` (blocking)."""
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def prepare(path: str) -> None:
    """Make the folder that holds the database file (blocking)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)


class SQLiteStore(ThreadedSQLStore):
    dialect = SQLiteDialect()

    def __init__(self, path: str, reactor: IReactorFromThreads,
                 hostname: str | None = None) -> None:
        super().__init__(reactor, hostname=hostname)
        self.path = path

    def prepare(self) -> None:
        prepare(self.path)

    def connect(self) -> sqlite3.Connection:
        return connect(self.path)
