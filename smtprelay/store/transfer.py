"""``smtprelay migrate-store --from URL --to URL``: a store copied to another database.

For a site that grows from one relay on SQLite to several on PostgreSQL (or
goes back).  It owns the procedure, not the SQL (``_sql.copy_store``):

- the source is read in one read-only snapshot and must have this relay's
  schema version; the destination is created or migrated as a relay would
  at start-up (under the same lock), and the whole copy is one transaction
  there: it is all in, or nothing is;
- a destination that already holds messages is refused unless ``force``;
  then the copy merges: a message already there (same id) is skipped with
  everything that belongs to it, so running it again after an interruption
  or for the messages that arrived since is safe;
- the relays on the source should be stopped first: a message they accept
  after the snapshot is not in the copy, and one they had in hand arrives
  released (due at once).  A source instance with a recent heartbeat is
  reported as a warning.

It is a command-line tool: it blocks, and no reactor is running.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from smtprelay.store import _sql

RECENT = 900.0  # a heartbeat this recent says a relay may still be running


class TransferError(Exception):
    """The copy cannot be made; the message says why, in one sentence."""


def _is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def describe(url: str) -> str:
    """``url`` without a password."""
    if _is_postgres(url):
        from smtprelay.store import postgres

        return postgres.describe(url)
    return url


def _open(url: str, role: str) -> tuple[_sql.Dialect, Any]:
    """-> (dialect, connection) for a store URL."""
    if url.startswith("sqlite:///"):
        from smtprelay.store import sqlite

        path = os.path.abspath(url[len("sqlite:///"):])
        if role == "source" and not os.path.exists(path):
            raise TransferError(f"--from {url}: no such database file")
        if role == "destination":
            sqlite.prepare(path)
        return sqlite.SQLiteStore.dialect, sqlite.connect(path)
    if _is_postgres(url):
        from smtprelay.store import postgres

        try:
            return postgres.PostgresStore.dialect, postgres.connect(
                url, application_name=f"smtprelay migrate-store {role}")
        except Exception as e:
            raise TransferError(
                f"{describe(url)}: cannot connect: {' '.join(str(e).split())}") from None
    raise TransferError(f'{url}: a store URL starts with "sqlite:///" or "postgresql://"')


def _same(a: str, b: str) -> bool:
    if a.startswith("sqlite:///") and b.startswith("sqlite:///"):
        return os.path.realpath(a[len("sqlite:///"):]) == os.path.realpath(b[len("sqlite:///"):])
    return a == b


def transfer(source_url: str, destination_url: str, force: bool = False,
             now: float | None = None,
             warn: Callable[[str], object] | None = None) -> dict[str, int]:
    """Copy the store at ``source_url`` into ``destination_url`` -> counts (see
    ``_sql.copy_store``).  Raises TransferError when refused or impossible."""
    import time

    now = time.time() if now is None else now
    if _same(source_url, destination_url):
        raise TransferError("--from and --to name the same database")
    src, src_conn = _open(source_url, "source")
    try:
        src.begin_read(src_conn)
        try:
            version = _sql.current_version(src, src_conn)
        except Exception:
            raise TransferError(f"{describe(source_url)} holds no smtprelay store") from None
        if version != _sql.SCHEMA_VERSION:
            raise TransferError(
                f"{describe(source_url)} has schema version {version}, this relay "
                f"{_sql.SCHEMA_VERSION}: " + ("start this relay on it once to migrate it"
                                              if version < _sql.SCHEMA_VERSION
                                              else "use the newer relay's migrate-store"))
        for instance_id, heartbeat_at in _sql.running_instances(src, src_conn):
            if now - heartbeat_at < RECENT and warn is not None:
                warn(f"warning: instance {instance_id} on the source may still be running "
                     f"(heartbeat {now - heartbeat_at:.0f}s ago); what it accepts from now "
                     "on is not copied")
        dst, dst_conn = _open(destination_url, "destination")
        try:
            dst.begin_write(dst_conn)
            try:
                _sql.migrate(dst, dst_conn)
                there = _sql.count_messages(dst, dst_conn)
                if there and not force:
                    raise TransferError(
                        f"{describe(destination_url)} already holds {there} messages; "
                        "--force merges into it (messages already there are skipped)")
                counts = _sql.copy_store(src, src_conn, dst, dst_conn)
                dst.commit(dst_conn)
            except BaseException:
                dst.rollback(dst_conn)
                raise
        finally:
            dst_conn.close()
    finally:
        src_conn.close()
    return counts


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def summary(counts: dict[str, int], source_url: str, destination_url: str) -> str:
    """One line for the command's output."""
    mb = counts["body_bytes"] / 1e6
    line = (f"copied {_n(counts['messages'], 'message')} "
            f"({_n(counts['recipients'], 'recipient')}, {_n(counts['body_chunks'], 'body chunk')}, "
            f"{mb:.1f} MB), {_n(counts['attempts'], 'attempt')} and "
            f"{_n(counts['mailboxes'], 'mailbox back-off')} from {describe(source_url)} to "
            f"{describe(destination_url)}")
    if counts["skipped"]:
        line += f"; skipped {_n(counts['skipped'], 'message')} already there"
    return line
