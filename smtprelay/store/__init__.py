"""Durable storage of messages, the queue and the delivery log (see interface.py).

The public face of the store: the interface, the values it answers with
(``rows.py``) and the delivery log's query (``query.py``).  The modules whose
names start with ``_`` are its inside: nothing outside ``smtprelay.store``
imports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from smtprelay.store.interface import IStore, StoreUnavailable
from smtprelay.store.query import DeliveryQuery, decode_cursor, encode_cursor
from smtprelay.store.rows import (
    AttemptRow,
    DeliveryPage,
    DeliveryRow,
    InstanceRow,
    LastError,
    RecipientRow,
    Stats,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorFromThreads

    from smtprelay.config import DatabaseConfig
    from smtprelay.store._base import ThreadedSQLStore


def make_store(database: DatabaseConfig, reactor: IReactorFromThreads,
               hostname: str | None = None) -> ThreadedSQLStore:
    """The IStore for ``database`` (a DatabaseConfig)."""
    if database.kind == "postgresql":
        from smtprelay.store.postgres import PostgresStore

        return PostgresStore(database.url, reactor, hostname=hostname)
    from smtprelay.store.sqlite import SQLiteStore

    return SQLiteStore(database.sqlite_path, reactor, hostname=hostname)


__all__ = [
    "AttemptRow",
    "DeliveryPage",
    "DeliveryQuery",
    "DeliveryRow",
    "IStore",
    "InstanceRow",
    "LastError",
    "RecipientRow",
    "Stats",
    "StoreUnavailable",
    "decode_cursor",
    "encode_cursor",
    "make_store",
]
