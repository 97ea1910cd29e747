"""The SQLite store: WAL, synchronous=FULL, one writer thread with group commit.

A 250 is sent only after the commit that holds the message returned, and with
``synchronous=FULL`` in WAL mode that commit has been fsynced.  Every write
transaction starts with ``BEGIN IMMEDIATE``, which takes the database's one
write lock: claims, and migrations of several stores opening one file at
once, are serialised by it without any further locking.
"""

import os
import sqlite3

from smtprelay.store._base import ThreadedSQLStore
from smtprelay.store._sql import Dialect


class SQLiteDialect(Dialect):
    name = "sqlite"
    blob = "BLOB"

    def begin_write(self, conn):
        conn.execute("BEGIN IMMEDIATE")

    def commit(self, conn):
        conn.execute("COMMIT")

    def rollback(self, conn):
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def in_transaction(self, conn):
        return conn.in_transaction


def connect(path):
    """A configured connection to the database file ``path`` (blocking)."""
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def prepare(path):
    """Make the folder that holds the database file (blocking)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)


class SQLiteStore(ThreadedSQLStore):
    dialect = SQLiteDialect()

    def __init__(self, path, reactor, provider_type="", hostname=None):
        super().__init__(reactor, provider_type=provider_type, hostname=hostname)
        self.path = path

    def prepare(self):
        prepare(self.path)

    def connect(self):
        return connect(self.path)
