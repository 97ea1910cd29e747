"""``smtprelay migrate-store``: the queue and the delivery log copied between
SQLite and PostgreSQL, both ways, through the console script's ``main``.

The stores are filled and read with the store's own SQL (``_sql``) on plain
connections: the command runs with no reactor and no relay, as it would on a
site.  PostgreSQL tests get a database of their own (see tests/pg.py).
"""

import os
import tracemalloc

import attr
import pytest

from smtprelay import cli
from smtprelay.model import Result, Status
from smtprelay.store import _sql, postgres, sqlite
from tests import pg
from tests.store_support import LEASE, NOW, envelope, transition

BIG = os.urandom(2_500_000)  # three stored chunks


@pytest.fixture
def pg_database():
    pg.require_postgres(pytest.skip, pytest.fail)
    db = pg.TempDatabase()
    yield db
    db.drop()


def open_store(url):
    if url.startswith("sqlite:///"):
        return sqlite.SQLiteStore.dialect, sqlite.connect(url[len("sqlite:///"):])
    return postgres.PostgresStore.dialect, postgres.connect(url)


def write(url, fn):
    d, conn = open_store(url)
    try:
        d.begin_write(conn)
        _sql.migrate(d, conn)
        result = fn(d, conn)
        d.commit(conn)
        return result
    finally:
        conn.close()


def read(url, fn):
    d, conn = open_store(url)
    try:
        return fn(d, conn)
    finally:
        conn.close()


def fill(url, start=0):
    """Messages in every state, a multi-chunk body, a mailbox back-off -> ids."""

    def run(d, c):
        envs = [envelope(start + i, mailbox="s@x.org" if i != 5 else "slow@x.org")
                for i in range(6)]
        _sql.insert_message(d, c, envs[0], iter([BIG]), Status.QUEUED, None, None)
        for e in envs[1:]:
            _sql.insert_message(d, c, e, iter([b"Subject: %d\r\n\r\nbody\r\n" % start]),
                                Status.QUEUED, None, None)
        for e in envs[:3]:
            assert _sql.claim_one(d, c, "gone/1/x", e.id, NOW + 1, NOW + LEASE)
        # envs[0] stays active (its instance is gone), envs[1] deferred after a
        # partial attempt, envs[2] sent; envs[3] cancelled; envs[4] queued
        _sql.finish(d, c, "gone/1/x", envs[1].id, transition(
            Status.DEFERRED, NOW + 2, {"a@x.org": (Result.SENT, "250 ok"),
                                       "b@x.org": (Result.TEMPORARY, "451 later")},
            next_at=NOW + 60, outcome="partial", detail="1 of 2", error="451 later"))
        _sql.finish(d, c, "gone/1/x", envs[2].id, transition(Status.SENT, NOW + 3, {}))
        _sql.cancel(d, c, envs[3].id, NOW + 4, "cancelled by admin")
        _sql.block_mailbox(d, c, "slow@x.org", NOW + 500)
        return [e.id for e in envs]

    return write(url, run)


def snapshot(url, ids):
    """Everything the admin API and the queue see of ``ids``."""

    def run(d, c):
        out = {}
        for i in ids:
            out[i] = (_sql.delivery(d, c, i), _sql.read_body(d, c, i).read())
        return out

    return read(url, run)


def migrate(capsys, source, destination, *extra):
    code = cli.main(["migrate-store", "--from", source, "--to", destination, *extra])
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


def assert_copied(before, after, active_id):
    assert set(before) == set(after)
    for i, (item, body) in before.items():
        copy, copied_body = after[i]
        if i == active_id:
            # it was in the hands of an instance of the source: released, due
            assert (item.status, copy.status) == (Status.ACTIVE, Status.QUEUED)
            assert copy.next_attempt_at == NOW
            copy = attr.evolve(copy, status=item.status, next_attempt_at=item.next_attempt_at)
        assert copy == item
        assert copied_body == body


def test_sqlite_to_postgres_and_back(tmp_path, pg_database, capsys):
    first = f"sqlite:///{tmp_path / 'first.db'}"
    last = f"sqlite:///{tmp_path / 'var' / 'last.db'}"
    ids = fill(first)
    before = snapshot(first, ids)

    code, out, err = migrate(capsys, first, pg_database.url)
    assert code == 0, err
    assert out.startswith("copied 6 messages (12 recipients, 8 body chunks, 2.5 MB), "
                          "3 attempts and 1 mailbox back-off from sqlite:///")
    assert out.endswith(f" to {postgres.describe(pg_database.url)}")
    assert_copied(before, snapshot(pg_database.url, ids), ids[0])

    code, out, err = migrate(capsys, pg_database.url, last)
    assert code == 0, err
    assert out.startswith("copied 6 messages (12 recipients, 8 body chunks, 2.5 MB)")
    assert_copied(before, snapshot(last, ids), ids[0])

    # the copy is a working queue: the released message is due, the back-off holds
    def claim(d, c):
        d.begin_write(c)
        claims = _sql.claim(d, c, "new/2/y", NOW + 10, 10, NOW + 10 + LEASE, 10)
        d.commit(c)
        return sorted(k.id for k in claims)

    assert read(pg_database.url, claim) == sorted([ids[0], ids[4]])
    stats = read(last, lambda d, c: _sql.stats(d, c, NOW))
    assert (stats.received, stats.sent, stats.failed, stats.queued,
            stats.deferred, stats.active) == (6, 1, 1, 3, 1, 0)


def test_a_destination_with_messages_needs_force_and_then_merges(tmp_path, pg_database,
                                                                 capsys):
    source = f"sqlite:///{tmp_path / 'relay.db'}"
    ids = fill(source)
    assert migrate(capsys, source, pg_database.url)[0] == 0
    more = fill(source, start=100)
    code, out, err = migrate(capsys, source, pg_database.url)
    assert code == 1
    assert err == (f"migrate-store: {postgres.describe(pg_database.url)} already holds 6 "
                   "messages; --force merges into it (messages already there are skipped)")
    assert read(pg_database.url, _sql.count_messages) == 6
    code, out, err = migrate(capsys, source, pg_database.url, "--force")
    assert code == 0, err
    assert out.startswith("copied 6 messages")
    assert out.endswith("; skipped 6 messages already there")
    assert read(pg_database.url, _sql.count_messages) == 12
    assert set(snapshot(pg_database.url, ids + more)) == set(ids + more)


def test_refusals_are_one_line(tmp_path, capsys):
    there = f"sqlite:///{tmp_path / 'relay.db'}"
    fill(there)
    code, _, err = migrate(capsys, there, there)
    assert (code, err) == (1, "migrate-store: --from and --to name the same database")
    code, _, err = migrate(capsys, f"sqlite:///{tmp_path / 'nope.db'}", there)
    assert (code, err) == (1, f"migrate-store: --from sqlite:///{tmp_path / 'nope.db'}: "
                              "no such database file")
    (tmp_path / "empty.db").write_bytes(b"")
    code, _, err = migrate(capsys, f"sqlite:///{tmp_path / 'empty.db'}", there)
    assert (code, err) == (1, f"migrate-store: sqlite:///{tmp_path / 'empty.db'} holds no "
                              "smtprelay store")
    code, _, err = migrate(capsys, there, "mysql://x/y")
    assert code == 1 and "starts with" in err
    code, _, err = migrate(capsys, there, "postgresql://nobody@127.0.0.1:1/none")
    assert code == 1 and "cannot connect" in err and "\n" not in err


def test_a_running_source_instance_is_warned_about(tmp_path, capsys):
    import time

    source = f"sqlite:///{tmp_path / 'relay.db'}"
    fill(source)
    write(source, lambda d, c: _sql.register_instance(d, c, "host/1/abc", "host", 1,
                                                      time.time() - 5, "1"))
    code, _out, err = migrate(capsys, source, f"sqlite:///{tmp_path / 'copy.db'}")
    assert code == 0
    assert err.startswith("warning: instance host/1/abc on the source may still be running")


@pytest.mark.parametrize("direction", ["to_postgres", "to_sqlite"])
def test_bodies_are_streamed_not_held_whole(tmp_path, pg_database, capsys, direction):
    size = 24 << 20
    sqlite_url = f"sqlite:///{tmp_path / 'relay.db'}"
    source, destination = ((sqlite_url, pg_database.url) if direction == "to_postgres"
                           else (pg_database.url, sqlite_url))
    env = envelope()

    def chunks():
        for _ in range(size >> 20):
            yield os.urandom(1 << 20)

    write(source, lambda d, c: _sql.insert_message(d, c, env, chunks(), Status.QUEUED,
                                                   None, None))
    tracemalloc.start()
    try:
        code, out, err = migrate(capsys, source, destination)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 0, err
    assert "24 body chunks, 25.2 MB" in out
    assert peak < 6 << 20, f"{peak / 1e6:.1f} MB held while copying a {size / 1e6:.0f} MB body"
    assert read(destination, lambda d, c: len(_sql.read_body(d, c, env.id).read())) == size
