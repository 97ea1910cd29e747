"""The SQL of the store, shared by SQLite and PostgreSQL.

Each function here runs on a database thread with a DB-API connection and a
:class:`Dialect` that papers over the differences (placeholders, blob type,
locking).  The message's life is explicit in ``messages.status``; each
function makes one transition.  Statements are written with ``?``
placeholders; the PostgreSQL dialect turns them into ``%s``.

Several instances may share one database (PostgreSQL): whatever must hold
across them (one owner per message, per-mailbox concurrency, Retry-After,
one migration at a time) is decided here, in the database, under the
dialect's ``lock_claims`` and ``lock_schema``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any

from smtprelay.model import Claim, Envelope, Status, Transition
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

# a DB-API connection and a result row: the drivers' own types (sqlite3, psycopg)
Row = tuple[Any, ...]

BODY_CHUNK = 1 << 20  # bytes per stored body row

MIGRATIONS = [
    # 1: the first schema
    [
        """CREATE TABLE messages (
            id TEXT PRIMARY KEY,
            status TEXT NOT NULL,
            sender TEXT NOT NULL,
            original_sender TEXT NOT NULL,
            mailbox TEXT NOT NULL,
            received_at DOUBLE PRECISION NOT NULL,
            age_from DOUBLE PRECISION NOT NULL,
            finished_at DOUBLE PRECISION,
            next_attempt_at DOUBLE PRECISION,
            size BIGINT NOT NULL,
            client_address TEXT NOT NULL DEFAULT '',
            helo TEXT NOT NULL DEFAULT '',
            auth_user TEXT,
            header_from TEXT NOT NULL DEFAULT '',
            subject TEXT NOT NULL DEFAULT '',
            message_id TEXT NOT NULL DEFAULT '',
            mode TEXT NOT NULL DEFAULT 'queue',
            attempts_count INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            provider_id TEXT,
            lease_owner TEXT,
            lease_until DOUBLE PRECISION,
            received_by TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX messages_due ON messages (status, next_attempt_at)",
        "CREATE INDEX messages_finished ON messages (finished_at)",
        "CREATE INDEX messages_lease ON messages (lease_owner)",
        """CREATE TABLE recipients (
            message_id TEXT NOT NULL,
            position INTEGER NOT NULL,
            address TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending',
            detail TEXT,
            PRIMARY KEY (message_id, position)
        )""",
        "CREATE INDEX recipients_address ON recipients (address)",
        """CREATE TABLE bodies (
            message_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            data {blob} NOT NULL,
            PRIMARY KEY (message_id, seq)
        )""",
        """CREATE TABLE attempts (
            message_id TEXT NOT NULL,
            at DOUBLE PRECISION NOT NULL,
            outcome TEXT NOT NULL,
            detail TEXT NOT NULL,
            duration_ms INTEGER NOT NULL DEFAULT 0,
            instance TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX attempts_message ON attempts (message_id, at)",
        "CREATE INDEX attempts_at ON attempts (at)",
        """CREATE TABLE mailboxes (
            mailbox TEXT PRIMARY KEY,
            not_before DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE instances (
            id TEXT PRIMARY KEY,
            hostname TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started_at DOUBLE PRECISION NOT NULL,
            heartbeat_at DOUBLE PRECISION NOT NULL,
            state TEXT NOT NULL,
            version TEXT NOT NULL DEFAULT ''
        )""",
    ],
    # 2: for speed.  No index on recipients.address: the admin search
    # (LIKE '%x%') cannot use it, and SQLite's planner preferred it to the
    # primary key for the per-recipient UPDATE of an outcome, so with many
    # messages to one address (the usual case for a relay) every outcome
    # scanned all of them.  The due index also carries the mailbox, so that a
    # claim skips the messages of busy or blocked mailboxes without reading
    # their rows.
    [
        "DROP INDEX recipients_address",
        "DROP INDEX messages_due",
        "CREATE INDEX messages_due ON messages (status, next_attempt_at, mailbox)",
    ],
]

SCHEMA_VERSION = len(MIGRATIONS)


class Dialect:
    """What differs between databases; subclasses fill it in."""

    name = "?"
    blob = "BLOB"

    def sql(self, statement: str) -> str:
        return statement

    def execute(self, conn: Any, statement: str, params: Sequence[Any] = ()) -> Any:
        cur = conn.cursor()
        cur.execute(self.sql(statement), params)
        return cur

    def executemany(self, conn: Any, statement: str, rows: Iterable[Sequence[Any]]) -> Any:
        cur = conn.cursor()
        cur.executemany(self.sql(statement), rows)
        return cur

    def begin_write(self, conn: Any) -> None:
        self.execute(conn, "BEGIN")

    def begin_read(self, conn: Any) -> None:
        """A read-only transaction that sees one snapshot throughout."""
        self.execute(conn, "BEGIN")

    def commit(self, conn: Any) -> None:
        conn.commit()

    def rollback(self, conn: Any) -> None:
        conn.rollback()

    def in_transaction(self, conn: Any) -> bool:
        return True

    def to_blob(self, data: bytes) -> Any:
        return data

    def from_blob(self, value: Any) -> bytes:
        return bytes(value)

    def is_broken(self, conn: Any) -> bool:
        """True when ``conn`` is unusable (the server went away): the threads
        then drop it and connect anew."""
        return False

    def lock_schema(self, conn: Any) -> None:
        """Serialise migrations across instances starting at once, until the
        end of the caller's transaction (no-op where writes already are)."""

    def lock_claims(self, conn: Any) -> None:
        """Serialise claims across instances until the end of the caller's
        transaction (no-op where writes already are)."""

    def for_update(self, skip_locked: bool = False) -> str:
        """Row locks for a SELECT that a write follows ("" where the write
        transaction already excludes every other writer)."""
        return ""


def fetchall(dialect: Dialect, conn: Any, statement: str,
             params: Sequence[Any] = ()) -> list[Row]:
    return dialect.execute(conn, statement, params).fetchall()


def fetchone(dialect: Dialect, conn: Any, statement: str,
             params: Sequence[Any] = ()) -> Row | None:
    return dialect.execute(conn, statement, params).fetchone()


def fetchrow(dialect: Dialect, conn: Any, statement: str, params: Sequence[Any] = ()) -> Row:
    """The row of a query that always yields one (an aggregate, a row just listed)."""
    row = fetchone(dialect, conn, statement, params)
    if row is None:
        raise RuntimeError("the database returned no row where one must be")
    return row


# ---------------------------------------------------------------------------
# schema


def current_version(dialect: Dialect, conn: Any) -> int:
    row = fetchone(dialect, conn, "SELECT version FROM schema_version")
    return row[0] if row else 0


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer relay than this one."""


def migrate(dialect: Dialect, conn: Any, migrations: list[list[str]] = MIGRATIONS) -> int:
    """Bring the schema to ``len(migrations)`` inside the caller's transaction
    -> the version found.  Instances starting at once take turns
    (``lock_schema``): the first migrates, the others find it done."""
    target = len(migrations)
    dialect.lock_schema(conn)
    dialect.execute(conn, "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    version = current_version(dialect, conn)
    if version > target:
        raise SchemaTooNew(
            f"the database schema is version {version}, newer than this relay knows "
            f"({target}): upgrade the relay"
        )
    for n in range(version, target):
        for statement in migrations[n]:
            dialect.execute(conn, statement.format(blob=dialect.blob))
    if version == 0:
        dialect.execute(conn, "INSERT INTO schema_version (version) VALUES (?)", (target,))
    elif version != target:
        dialect.execute(conn, "UPDATE schema_version SET version = ?", (target,))
    return version


# ---------------------------------------------------------------------------
# the receiving side


def insert_message(dialect: Dialect, conn: Any, envelope: Envelope, body: Iterable[bytes],
                   status: Status, lease_owner: str | None, lease_until: float | None) -> int:
    size = 0
    seq = 0
    for chunk in _rechunk(body, BODY_CHUNK):
        dialect.execute(
            conn,
            "INSERT INTO bodies (message_id, seq, data) VALUES (?, ?, ?)",
            (envelope.id, seq, dialect.to_blob(chunk)),
        )
        seq += 1
        size += len(chunk)
    dialect.execute(
        conn,
        """INSERT INTO messages (id, status, sender, original_sender, mailbox, received_at,
            age_from, next_attempt_at, size, client_address, helo, auth_user, header_from, subject,
            message_id, mode, lease_owner, lease_until, received_by)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            envelope.id, str(status), envelope.sender, envelope.original_sender,
            envelope.mailbox, envelope.received_at, envelope.received_at,
            envelope.received_at, size,
            envelope.client_address, envelope.helo, envelope.auth_user,
            envelope.header_from, envelope.subject, envelope.message_id, envelope.mode,
            lease_owner, lease_until, envelope.instance,
        ),
    )
    dialect.executemany(
        conn,
        "INSERT INTO recipients (message_id, position, address) VALUES (?, ?, ?)",
        [(envelope.id, i, r) for i, r in enumerate(envelope.recipients)],
    )
    return size


def insert_and_claim(dialect: Dialect, conn: Any, envelope: Envelope, body: Iterable[bytes],
                     owner: str, now: float, lease_until: float,
                     concurrency: int) -> Claim | None:
    """Store a message and, when its mailbox has room, lease it to ``owner`` at once.

    Room: the mailbox is not blocked until after ``now`` and fewer than
    ``concurrency`` of its messages are leased (by any instance).  The decision
    is made in the same transaction as the insert, so it is as exclusive as a
    claim.  -> the Claim when leased, else None (the message is queued).
    """
    dialect.lock_claims(conn)
    blocked = fetchone(
        dialect, conn, "SELECT 1 FROM mailboxes WHERE mailbox = ? AND not_before > ?",
        (envelope.mailbox, now),
    )
    busy = 0
    if blocked is None:
        (busy,) = fetchrow(
            dialect, conn,
            """SELECT COUNT(*) FROM messages
               WHERE status = 'active' AND lease_until >= ? AND mailbox = ?""",
            (now, envelope.mailbox),
        )
    if blocked is not None or busy >= concurrency:
        insert_message(dialect, conn, envelope, body, Status.QUEUED, None, None)
        return None
    size = insert_message(dialect, conn, envelope, body, Status.ACTIVE, owner, lease_until)
    return Claim(id=envelope.id, sender=envelope.sender, mailbox=envelope.mailbox,
                 recipients=tuple(envelope.recipients), age_from=envelope.received_at,
                 size=size, attempts=0, mode=envelope.mode)


def _rechunk(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


# ---------------------------------------------------------------------------
# the delivering side


def _pending(dialect: Dialect, conn: Any, ids: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {i: [] for i in ids}
    if not ids:
        return out
    marks = ",".join("?" * len(ids))
    for message_id, address in fetchall(
        dialect, conn,
        f"""SELECT message_id, address FROM recipients
            WHERE message_id IN ({marks}) AND status = 'pending'
            ORDER BY message_id, position""",
        tuple(ids),
    ):
        out[message_id].append(address)
    return out


def _claims(dialect: Dialect, conn: Any, rows: Sequence[Row]) -> list[Claim]:
    pending = _pending(dialect, conn, [r[0] for r in rows])
    return [
        Claim(id=r[0], sender=r[1], mailbox=r[2], recipients=tuple(pending[r[0]]),
              age_from=r[3], size=r[4], attempts=r[5], mode=r[6])
        for r in rows
    ]


_CLAIM_COLUMNS = "id, sender, mailbox, age_from, size, attempts_count, mode"
_MAX_SKIPPED = 500  # busy or blocked mailboxes a claim's query leaves out by name


def claim(dialect: Dialect, conn: Any, owner: str, now: float, limit: int, lease_until: float,
          concurrency: int) -> list[Claim]:
    dialect.lock_claims(conn)
    blocked = {
        r[0] for r in fetchall(
            dialect, conn, "SELECT mailbox FROM mailboxes WHERE not_before > ?", (now,)
        )
    }
    busy: dict[str, int] = dict(fetchall(
        dialect, conn,
        """SELECT mailbox, COUNT(*) FROM messages
           WHERE status = 'active' AND lease_until >= ? GROUP BY mailbox""",
        (now,),
    ))
    # Mailboxes that cannot take another message are left out by the query, so
    # that a long queue for one busy mailbox is not read again at every claim;
    # one index range per state, each already in order, merged here.
    full = sorted(blocked | {m for m, n in busy.items() if n >= concurrency})
    if len(full) > _MAX_SKIPPED:
        full = []  # too many to name in a query: the loop below skips them
    skip = f" AND mailbox NOT IN ({','.join('?' * len(full))})" if full else ""
    wanted = max(limit * 4, 64)
    candidates = []
    for state in ("queued", "deferred"):
        candidates += fetchall(
            dialect, conn,
            f"""SELECT {_CLAIM_COLUMNS}, next_attempt_at FROM messages
                WHERE status = ? AND next_attempt_at <= ?{skip}
                ORDER BY next_attempt_at, id
                LIMIT ?{dialect.for_update(skip_locked=True)}""",
            (state, now, *full, wanted),
        )
    candidates += fetchall(
        dialect, conn,
        f"""SELECT {_CLAIM_COLUMNS}, next_attempt_at FROM messages
            WHERE status = 'active' AND lease_until < ?{skip}
            ORDER BY next_attempt_at, id
            LIMIT ?{dialect.for_update(skip_locked=True)}""",
        (now, *full, wanted),
    )
    candidates.sort(key=lambda r: (r[7] if r[7] is not None else 0.0, r[0]))
    chosen: list[Row] = []
    for row in candidates:
        if len(chosen) >= limit:
            break
        mailbox = row[2]
        if mailbox in blocked or busy.get(mailbox, 0) >= concurrency:
            continue
        busy[mailbox] = busy.get(mailbox, 0) + 1
        chosen.append(row[:7])
    if not chosen:
        return []
    ids = [r[0] for r in chosen]
    marks = ",".join("?" * len(ids))
    dialect.execute(
        conn,
        f"""UPDATE messages SET status = 'active', lease_owner = ?, lease_until = ?
            WHERE id IN ({marks})""",
        (owner, lease_until, *ids),
    )
    return _claims(dialect, conn, chosen)


def claim_one(dialect: Dialect, conn: Any, owner: str, message_id: str, now: float,
              lease_until: float) -> Claim | None:
    row = fetchone(
        dialect, conn,
        f"""SELECT {_CLAIM_COLUMNS} FROM messages
            WHERE id = ? AND (status IN ('queued', 'deferred')
                              OR (status = 'active' AND (lease_owner = ? OR lease_until < ?)))
            {dialect.for_update()}""",
        (message_id, owner, now),
    )
    if row is None:
        return None
    dialect.execute(
        conn,
        "UPDATE messages SET status = 'active', lease_owner = ?, lease_until = ? WHERE id = ?",
        (owner, lease_until, message_id),
    )
    return _claims(dialect, conn, [row])[0]


def read_body(dialect: Dialect, conn: Any, message_id: str) -> IO[bytes]:
    rows = fetchall(
        dialect, conn,
        "SELECT seq FROM bodies WHERE message_id = ? ORDER BY seq", (message_id,)
    )
    if not rows:
        exists = fetchone(dialect, conn, "SELECT 1 FROM messages WHERE id = ?", (message_id,))
        if exists is None:
            raise KeyError(message_id)
    out = tempfile.SpooledTemporaryFile(max_size=BODY_CHUNK * 2)
    for (seq,) in rows:
        (data,) = fetchrow(
            dialect, conn,
            "SELECT data FROM bodies WHERE message_id = ? AND seq = ?", (message_id, seq),
        )
        out.write(dialect.from_blob(data))
    out.seek(0)
    return out


def finish(dialect: Dialect, conn: Any, owner: str, message_id: str,
           transition: Transition) -> bool:
    """Write an attempt's outcome if ``owner`` still holds the lease."""
    row = fetchone(
        dialect, conn,
        f"SELECT lease_owner, status FROM messages WHERE id = ?{dialect.for_update()}",
        (message_id,),
    )
    if row is None or row[0] != owner or row[1] != str(Status.ACTIVE):
        return False
    a = transition.attempt
    dialect.execute(
        conn,
        """INSERT INTO attempts (message_id, at, outcome, detail, duration_ms, instance)
           VALUES (?, ?, ?, ?, ?, ?)""",
        (message_id, a.at, a.outcome, a.detail, a.duration_ms, a.instance),
    )
    _write_recipient_results(dialect, conn, message_id, transition.recipient_results)
    final = transition.status in (Status.SENT, Status.FAILED)
    dialect.execute(
        conn,
        """UPDATE messages SET status = ?, next_attempt_at = ?, finished_at = ?,
               attempts_count = attempts_count + 1, error = ?,
               provider_id = COALESCE(?, provider_id), lease_owner = NULL, lease_until = NULL
           WHERE id = ?""",
        (
            str(transition.status), transition.next_attempt_at, a.at if final else None,
            transition.error, transition.provider_id, message_id,
        ),
    )
    return True


def _write_recipient_results(dialect: Dialect, conn: Any, message_id: str,
                             results: dict[str, tuple[Any, str]]) -> None:
    rows = []
    for address, (result, detail) in results.items():
        status = {"sent": "sent", "permanent": "failed"}.get(str(result))
        if status:
            rows.append((status, detail, message_id, address))
        else:
            rows.append(("pending", detail, message_id, address))
    if rows:
        dialect.executemany(
            conn,
            """UPDATE recipients SET status = ?, detail = ?
               WHERE message_id = ? AND address = ? AND status = 'pending'""",
            rows,
        )


def renew_leases(dialect: Dialect, conn: Any, owner: str, now: float, lease_until: float,
                 message_ids: Sequence[str] | None = None) -> None:
    if message_ids is None:
        dialect.execute(
            conn,
            "UPDATE messages SET lease_until = ? WHERE lease_owner = ? AND status = 'active'",
            (lease_until, owner),
        )
    ids = list(message_ids or ())
    for start in range(0, len(ids), 500):
        part = ids[start:start + 500]
        marks = ",".join("?" * len(part))
        dialect.execute(
            conn,
            f"""UPDATE messages SET lease_until = ?
                WHERE lease_owner = ? AND status = 'active' AND id IN ({marks})""",
            (lease_until, owner, *part),
        )
    dialect.execute(
        conn, "UPDATE instances SET heartbeat_at = ? WHERE id = ?", (now, owner)
    )


def release(dialect: Dialect, conn: Any, owner: str, message_ids: Sequence[str],
            now: float) -> None:
    if not message_ids:
        return
    marks = ",".join("?" * len(message_ids))
    dialect.execute(
        conn,
        f"""UPDATE messages SET status = CASE WHEN attempts_count > 0 THEN 'deferred'
                                              ELSE 'queued' END,
               next_attempt_at = ?, lease_owner = NULL, lease_until = NULL
            WHERE lease_owner = ? AND status = 'active' AND id IN ({marks})""",
        (now, owner, *message_ids),
    )


def block_mailbox(dialect: Dialect, conn: Any, mailbox: str, until: float) -> None:
    dialect.execute(
        conn,
        """INSERT INTO mailboxes (mailbox, not_before) VALUES (?, ?)
           ON CONFLICT (mailbox) DO UPDATE SET not_before =
               CASE WHEN excluded.not_before > mailboxes.not_before
                    THEN excluded.not_before ELSE mailboxes.not_before END""",
        (mailbox, until),
    )


def register_instance(dialect: Dialect, conn: Any, instance_id: str, hostname: str, pid: int,
                      now: float, version: str) -> None:
    dialect.execute(
        conn,
        """INSERT INTO instances (id, hostname, pid, started_at, heartbeat_at, state, version)
           VALUES (?, ?, ?, ?, ?, 'running', ?)""",
        (instance_id, hostname, pid, now, now, version),
    )


def set_instance_state(dialect: Dialect, conn: Any, instance_id: str, state: str,
                       now: float) -> None:
    dialect.execute(
        conn, "UPDATE instances SET state = ?, heartbeat_at = ? WHERE id = ?",
        (state, now, instance_id),
    )


def recover(dialect: Dialect, conn: Any, hostname: str, alive: Callable[[int, str], bool],
            now: float) -> list[str]:
    """Expire the leases of instances on this host whose process is gone."""
    dead = [
        instance_id for instance_id, pid in fetchall(
            dialect, conn,
            "SELECT id, pid FROM instances WHERE hostname = ? AND state = 'running'",
            (hostname,),
        )
        if not alive(pid, instance_id)
    ]
    for instance_id in dead:
        dialect.execute(
            conn,
            "UPDATE messages SET lease_until = ? WHERE lease_owner = ? AND status = 'active'",
            (now - 1, instance_id),
        )
        dialect.execute(
            conn, "UPDATE instances SET state = 'dead' WHERE id = ?", (instance_id,)
        )
    return dead


def purge(dialect: Dialect, conn: Any, before: float) -> int:
    ids = [r[0] for r in fetchall(
        dialect, conn,
        """SELECT id FROM messages WHERE status IN ('sent', 'failed') AND finished_at < ?
           LIMIT 1000""",
        (before,),
    )]
    if ids:
        marks = ",".join("?" * len(ids))
        for table, column in (("bodies", "message_id"), ("attempts", "message_id"),
                              ("recipients", "message_id"), ("messages", "id")):
            dialect.execute(conn, f"DELETE FROM {table} WHERE {column} IN ({marks})", tuple(ids))
    dialect.execute(conn, "DELETE FROM mailboxes WHERE not_before < ?", (before,))
    dialect.execute(
        conn, "DELETE FROM instances WHERE state != 'running' AND heartbeat_at < ?", (before,)
    )
    return len(ids)


# ---------------------------------------------------------------------------
# the admin side


def stats(dialect: Dialect, conn: Any, now: float) -> Stats:
    counts: dict[str, int] = dict(fetchall(
        dialect, conn, "SELECT status, COUNT(*) FROM messages GROUP BY status"))
    last = fetchone(
        dialect, conn,
        """SELECT detail, at, message_id FROM attempts
           WHERE outcome NOT IN ('sent', 'requeued')
           ORDER BY at DESC LIMIT 1""",
    )
    oldest = fetchone(
        dialect, conn,
        "SELECT MIN(received_at) FROM messages WHERE status IN ('queued', 'deferred', 'active')",
    )
    return Stats(
        received=sum(counts.values()),
        sent=counts.get("sent", 0),
        failed=counts.get("failed", 0),
        queued=counts.get("queued", 0),
        deferred=counts.get("deferred", 0),
        active=counts.get("active", 0),
        last_error=LastError(message=last[0], at=last[1], delivery_id=last[2]) if last else None,
        oldest_pending_at=oldest[0] if oldest else None,
    )


def _like(text: str) -> str:
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


_DELIVERY_COLUMNS = """id, received_at, finished_at, status, sender, original_sender, mailbox,
    header_from, subject, message_id, size, attempts_count, next_attempt_at, error,
    client_address, auth_user, provider_id, mode, helo"""


def _delivery_row(row: Row, recipients: list[RecipientRow],
                  attempts: tuple[AttemptRow, ...] | None = None) -> DeliveryRow:
    (mid, received_at, finished_at, status, sender, original_sender, mailbox, header_from,
     subject, message_id, size, attempts_count, next_attempt_at, error, client_address,
     auth_user, provider_id, mode, helo) = row
    return DeliveryRow(
        id=mid, status=Status(status), received_at=received_at, finished_at=finished_at,
        sender=sender, original_sender=original_sender, mailbox=mailbox,
        header_from=header_from, subject=subject, message_id=message_id, size=size,
        attempts_count=attempts_count, next_attempt_at=next_attempt_at, error=error,
        client_address=client_address, auth_user=auth_user, provider_id=provider_id,
        mode=mode, helo=helo, recipients=tuple(recipients), attempts=attempts,
    )


def _recipients_of(dialect: Dialect, conn: Any, ids: list[str]) -> dict[str, list[RecipientRow]]:
    out: dict[str, list[RecipientRow]] = {i: [] for i in ids}
    if not ids:
        return out
    marks = ",".join("?" * len(ids))
    for mid, address, status, detail in fetchall(
        dialect, conn,
        f"""SELECT message_id, address, status, detail FROM recipients
            WHERE message_id IN ({marks}) ORDER BY message_id, position""",
        tuple(ids),
    ):
        out[mid].append(RecipientRow(address=address, status=status, detail=detail))
    return out


def _delivery_filters(query: DeliveryQuery) -> tuple[list[str], list[Any]]:
    """The WHERE terms of ``query`` and their parameters, in order."""
    where: list[str] = []
    params: list[Any] = []
    if query.status:
        if query.status == "queued":
            where.append("status IN ('queued', 'active')")
        else:
            where.append("status = ?")
            params.append(query.status)
    for text, term in (
        (query.sender,
         "(LOWER(sender) LIKE ? ESCAPE '\\' OR LOWER(original_sender) LIKE ? ESCAPE '\\')"),
        (query.recipient,
         "id IN (SELECT message_id FROM recipients WHERE LOWER(address) LIKE ? ESCAPE '\\')"),
        (query.q,
         "(LOWER(subject) LIKE ? ESCAPE '\\' OR LOWER(message_id) LIKE ? ESCAPE '\\')"),
    ):
        if text:
            where.append(term)
            params += [_like(text)] * term.count("?")
    if query.since is not None:
        where.append("received_at >= ?")
        params.append(query.since)
    if query.until is not None:
        where.append("received_at < ?")
        params.append(query.until)
    if query.cursor:
        where.append("id < ?")
        params.append(decode_cursor(query.cursor))
    return where, params


def deliveries(dialect: Dialect, conn: Any, query: DeliveryQuery) -> DeliveryPage:
    where, params = _delivery_filters(query)
    sql = f"SELECT {_DELIVERY_COLUMNS} FROM messages"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT ?"
    params.append(query.limit + 1)
    rows = fetchall(dialect, conn, sql, tuple(params))
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    recipients = _recipients_of(dialect, conn, [r[0] for r in rows])
    return DeliveryPage(
        items=tuple(_delivery_row(r, recipients[r[0]]) for r in rows),
        next_cursor=encode_cursor(rows[-1][0]) if more and rows else None,
    )


def delivery(dialect: Dialect, conn: Any, message_id: str) -> DeliveryRow | None:
    row = fetchone(
        dialect, conn, f"SELECT {_DELIVERY_COLUMNS} FROM messages WHERE id = ?", (message_id,)
    )
    if row is None:
        return None
    attempts = tuple(
        AttemptRow(at=at, outcome=outcome, detail=detail, duration_ms=duration_ms,
                   instance=instance)
        for at, outcome, detail, duration_ms, instance in fetchall(
            dialect, conn,
            """SELECT at, outcome, detail, duration_ms, instance FROM attempts
               WHERE message_id = ? ORDER BY at""",
            (message_id,),
        )
    )
    return _delivery_row(row, _recipients_of(dialect, conn, [message_id])[message_id], attempts)


def requeue(dialect: Dialect, conn: Any, message_id: str, now: float) -> str | None:
    row = fetchone(
        dialect, conn, f"SELECT status FROM messages WHERE id = ?{dialect.for_update()}",
        (message_id,),
    )
    if row is None:
        return None
    status = row[0]
    if status not in ("failed", "deferred", "queued"):
        raise ValueError(f"a delivery that is {'in flight' if status == 'active' else status} "
                         "cannot be retried")
    if status == "failed":
        # recipients that failed get another chance; those sent stay sent
        dialect.execute(
            conn,
            "UPDATE recipients SET status = 'pending' WHERE message_id = ? AND status = 'failed'",
            (message_id,),
        )
        dialect.execute(
            conn,
            """INSERT INTO attempts (message_id, at, outcome, detail, duration_ms, instance)
               VALUES (?, ?, 'requeued', 'retry requested by admin', 0, '')""",
            (message_id, now),
        )
    dialect.execute(
        conn,
        """UPDATE messages SET status = CASE WHEN attempts_count > 0 THEN 'deferred'
                                             ELSE 'queued' END,
               next_attempt_at = ?, finished_at = NULL, mode = 'queue',
               age_from = CASE WHEN status = 'failed' THEN ? ELSE age_from END
           WHERE id = ?""",
        (now, now, message_id),
    )
    return status


def cancel(dialect: Dialect, conn: Any, message_id: str, now: float, detail: str) -> str | None:
    row = fetchone(
        dialect, conn, f"SELECT status FROM messages WHERE id = ?{dialect.for_update()}",
        (message_id,),
    )
    if row is None:
        return None
    status = row[0]
    if status not in ("queued", "deferred"):
        raise ValueError(f"a delivery that is {'in flight' if status == 'active' else status} "
                         "cannot be cancelled")
    dialect.execute(
        conn,
        "UPDATE recipients SET status = 'failed', detail = ? "
        "WHERE message_id = ? AND status = 'pending'",
        (detail, message_id),
    )
    dialect.execute(
        conn,
        """INSERT INTO attempts (message_id, at, outcome, detail, duration_ms, instance)
           VALUES (?, ?, 'cancelled', ?, 0, '')""",
        (message_id, now, detail),
    )
    dialect.execute(
        conn,
        """UPDATE messages SET status = 'failed', finished_at = ?, next_attempt_at = NULL,
               error = ? WHERE id = ?""",
        (now, detail, message_id),
    )
    return status


def instances(dialect: Dialect, conn: Any, now: float) -> list[InstanceRow]:
    """Every instance that used this database, newest first.  ``heartbeat_at``
    moves at each lease renewal (a third of ``delivery.lease``): a "running"
    instance whose heartbeat is older than the lease was killed without
    stopping (its messages are taken over by the others when its leases expire)."""
    return [
        InstanceRow(id=r[0], hostname=r[1], pid=r[2], started_at=r[3], heartbeat_at=r[4],
                    state=r[5], version=r[6],
                    uptime_seconds=max(0.0, (now if r[5] == "running" else r[4]) - r[3]),
                    heartbeat_age_seconds=max(0.0, now - r[4]))
        for r in fetchall(
            dialect, conn,
            """SELECT id, hostname, pid, started_at, heartbeat_at, state, version
               FROM instances ORDER BY started_at DESC, id""",
        )
    ]


def new_instance_id(hostname: str, pid: int) -> str:
    return f"{hostname}/{pid}/{os.urandom(4).hex()}"


# ---------------------------------------------------------------------------
# copying a whole store to another database (``smtprelay migrate-store``)

_MESSAGE_COLUMNS = """id, status, sender, original_sender, mailbox, received_at, age_from,
    finished_at, next_attempt_at, size, client_address, helo, auth_user, header_from, subject,
    message_id, mode, attempts_count, error, provider_id, lease_owner, lease_until, received_by"""
_MESSAGE_COLUMN_NAMES = [c.strip() for c in _MESSAGE_COLUMNS.split(",")]
_RECIPIENT_COLUMNS = "message_id, position, address, status, detail"
_ATTEMPT_COLUMNS = "message_id, at, outcome, detail, duration_ms, instance"


def count_messages(dialect: Dialect, conn: Any) -> int:
    return int(fetchrow(dialect, conn, "SELECT COUNT(*) FROM messages")[0])


def running_instances(dialect: Dialect, conn: Any) -> list[Row]:
    """-> [(id, heartbeat_at)] of the instances that say they are running."""
    return fetchall(dialect, conn,
                    "SELECT id, heartbeat_at FROM instances WHERE state = 'running'")


def _insert(dialect: Dialect, conn: Any, table: str, columns: str, rows: Sequence[Row]) -> None:
    if rows:
        marks = ", ".join("?" * len(columns.split(",")))
        dialect.executemany(conn, f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)


def copy_store(src: Dialect, src_conn: Any, dst: Dialect, dst_conn: Any,
               page: int = 500) -> dict[str, int]:
    """Copy messages, recipients, bodies, attempts and mailbox blocks from one
    store's database to another's, in the caller's transactions -> counts.

    Messages are read by pages in id order and bodies one stored chunk at a
    time, so memory holds one page of rows and one chunk, whatever the size
    of the queue.  A message the destination already has (same id) is skipped
    with everything that belongs to it.  A message active at the source (an
    instance had it in hand) arrives released: due at once, unleased, as after
    a restart.  Instances are not copied: they are processes of the source.
    """
    counts = {"messages": 0, "skipped": 0, "recipients": 0, "attempts": 0, "body_chunks": 0,
              "body_bytes": 0, "mailboxes": 0}
    after = ""
    while True:
        rows = fetchall(
            src, src_conn,
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id > ? ORDER BY id LIMIT ?",
            (after, page),
        )
        if not rows:
            break
        after = rows[-1][0]
        ids = [r[0] for r in rows]
        marks = ",".join("?" * len(ids))
        there = {r[0] for r in fetchall(
            dst, dst_conn, f"SELECT id FROM messages WHERE id IN ({marks})", tuple(ids))}
        rows = [r for r in rows if r[0] not in there]
        counts["skipped"] += len(there)
        if not rows:
            continue
        ids = [r[0] for r in rows]
        marks = ",".join("?" * len(ids))
        released = []
        for r in rows:
            named = dict(zip(_MESSAGE_COLUMN_NAMES, r))
            if named["status"] == str(Status.ACTIVE):
                named["status"] = str(Status.DEFERRED if named["attempts_count"]
                                      else Status.QUEUED)
                named["lease_owner"] = named["lease_until"] = None
            released.append(tuple(named.values()))
        _insert(dst, dst_conn, "messages", _MESSAGE_COLUMNS, released)
        for table, columns, key, counter in (
                ("recipients", _RECIPIENT_COLUMNS, "position", "recipients"),
                ("attempts", _ATTEMPT_COLUMNS, "at", "attempts")):
            found = fetchall(
                src, src_conn,
                f"SELECT {columns} FROM {table} WHERE message_id IN ({marks}) "
                f"ORDER BY message_id, {key}",
                tuple(ids),
            )
            _insert(dst, dst_conn, table, columns, found)
            counts[counter] += len(found)
        for message_id in ids:
            for (seq,) in fetchall(
                    src, src_conn,
                    "SELECT seq FROM bodies WHERE message_id = ? ORDER BY seq", (message_id,)):
                (data,) = fetchrow(
                    src, src_conn,
                    "SELECT data FROM bodies WHERE message_id = ? AND seq = ?", (message_id, seq))
                data = src.from_blob(data)
                dst.execute(dst_conn,
                            "INSERT INTO bodies (message_id, seq, data) VALUES (?, ?, ?)",
                            (message_id, seq, dst.to_blob(data)))
                counts["body_chunks"] += 1
                counts["body_bytes"] += len(data)
                del data
        counts["messages"] += len(ids)
    for mailbox, not_before in fetchall(src, src_conn,
                                        "SELECT mailbox, not_before FROM mailboxes"):
        block_mailbox(dst, dst_conn, mailbox, not_before)
        counts["mailboxes"] += 1
    return counts
