"""Durable storage of messages, the queue and the delivery log (see interface.py)."""

from smtprelay.store.interface import IStore, StoreUnavailable


def make_store(database, reactor, provider_type="", hostname=None):
    """The IStore for ``database`` (a DatabaseConfig)."""
    if database.kind == "postgresql":
        from smtprelay.store.postgres import PostgresStore

        return PostgresStore(database.url, reactor, provider_type=provider_type,
                             hostname=hostname)
    from smtprelay.store.sqlite import SQLiteStore

    return SQLiteStore(database.sqlite_path, reactor, provider_type=provider_type,
                       hostname=hostname)


__all__ = ["IStore", "StoreUnavailable", "make_store"]
