"""The PostgreSQL store: many relay instances on one database.

``database.url = "postgresql://user@host:5432/dbname"`` selects it.  It owns
only what differs from SQLite (the dialect: placeholders, BYTEA, locks,
transactions, broken connections, and how a connection is opened); the SQL
is ``_sql.py`` and the threads are ``_threads.py``, shared with SQLite.
psycopg 3 is blocking and runs only on the store's threads, never on the
reactor.

What makes several instances safe on one database:

- a claim runs under a transaction-scoped advisory lock, so the per-mailbox
  concurrency count and the Retry-After blocks (the ``mailboxes`` table) it
  reads are those every other instance committed, and its candidate rows
  are taken ``FOR UPDATE SKIP LOCKED`` (a row another transaction is
  finishing or an administrator is requeueing is passed over, not waited for);
- an instance that dies stops renewing its leases, and a claim takes over
  any active message whose lease expired (``_sql.claim``);
- migrations at start-up run under another advisory lock: the first
  instance migrates, the others wait and find the schema current;
- a write is answered (a 250 for an accept) only after ``COMMIT`` returned.
"""

from __future__ import annotations

import functools
from typing import Any

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict
from twisted.internet.interfaces import IReactorFromThreads

from smtprelay.store._base import ThreadedSQLStore
from smtprelay.store._sql import Dialect

# pg_advisory_xact_lock(key1, key2): key1 says "smtprelay" ("SMRP"), key2 what is locked
_LOCK_SPACE = 0x534D5250
_SCHEMA_LOCK = 1
_CLAIM_LOCK = 2

# libpq settings unless the URL says otherwise: a server that vanishes without
# closing the connection (a host down, a partition) is noticed in about a
# minute instead of the kernel's quarter of an hour
_DEFAULTS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",
}


@functools.lru_cache(maxsize=1024)
def _placeholders(statement: str) -> str:
    # psycopg reads "%" as the start of a placeholder: a literal one is doubled
    return statement.replace("%", "%%").replace("?", "%s")


class PostgresDialect(Dialect):
    name = "postgresql"
    blob = "BYTEA"

    def sql(self, statement: str) -> str:
        return _placeholders(statement)

    def begin_write(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("BEGIN")

    def begin_read(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def commit(self, conn: psycopg.Connection[Any]) -> None:
        cur = conn.execute("COMMIT")
        if cur.statusmessage != "COMMIT":
            # COMMIT of a transaction in error answers ROLLBACK instead of failing
            raise psycopg.OperationalError(f"the transaction was rolled back "
                                           f"({cur.statusmessage})")

    def rollback(self, conn: psycopg.Connection[Any]) -> None:
        if self.in_transaction(conn):
            conn.execute("ROLLBACK")

    def in_transaction(self, conn: psycopg.Connection[Any]) -> bool:
        return not self.is_broken(conn) and conn.info.transaction_status in (
            pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)

    def is_broken(self, conn: psycopg.Connection[Any]) -> bool:
        return conn.closed or conn.broken

    def from_blob(self, value: Any) -> bytes:
        return bytes(value)

    def lock_schema(self, conn: psycopg.Connection[Any]) -> None:
        self.execute(conn, "SELECT pg_advisory_xact_lock(?, ?)", (_LOCK_SPACE, _SCHEMA_LOCK))

    def lock_claims(self, conn: psycopg.Connection[Any]) -> None:
        self.execute(conn, "SELECT pg_advisory_xact_lock(?, ?)", (_LOCK_SPACE, _CLAIM_LOCK))

    def for_update(self, skip_locked: bool = False) -> str:
        return " FOR UPDATE SKIP LOCKED" if skip_locked else " FOR UPDATE"


def connect(url: str, application_name: str = "smtprelay") -> psycopg.Connection[Any]:
    """A new connection to ``url`` (blocking), in autocommit mode: the writer
    says BEGIN and COMMIT itself, and each read is its own statement."""
    params: dict[str, Any] = dict(_DEFAULTS, application_name=application_name[:63])
    params.update(conninfo_to_dict(url))
    return psycopg.connect(autocommit=True, **params)


def describe(url: str) -> str:
    """``url`` without its password, for messages."""
    params: dict[str, Any] = conninfo_to_dict(url)
    user = params.get("user", "")
    host = params.get("host", "localhost")
    port = params.get("port", "5432")
    return f"postgresql://{user + '@' if user else ''}{host}:{port}/{params.get('dbname', '')}"


class PostgresStore(ThreadedSQLStore):
    dialect = PostgresDialect()

    def __init__(self, url: str, reactor: IReactorFromThreads,
                 hostname: str | None = None) -> None:
        super().__init__(reactor, hostname=hostname)
        self.url = url

    def prepare(self) -> None:
        conninfo_to_dict(self.url)  # a malformed URL fails start-up here, clearly

    def connect(self) -> psycopg.Connection[Any]:
        # the instance id in pg_stat_activity tells an operator whose sessions are whose
        return connect(self.url, application_name=f"smtprelay {self.instance_id}")
