"""PostgreSQL for tests: the server, and a database of one's own per test.

The server is ``$SMTPRELAY_TEST_POSTGRES`` (a postgresql:// URL of a database the
user may run CREATE DATABASE from), by default the one on 127.0.0.1:5432.
Each test creates a database with a random name and drops it afterwards, so
that tests (and other people's tests on the same server) never meet.  When
no server answers, the tests that need one are skipped with the reason; with
``SMTPRELAY_REQUIRE_POSTGRES=1`` (``.ci/run`` sets it) that skip is a failure.
"""

import os
import secrets

ADMIN_URL = os.environ.get("SMTPRELAY_TEST_POSTGRES",
                           "postgresql://postgres@127.0.0.1:5432/test")

_reachable = None


def unreachable():
    """None when the server answers, else why not (checked once)."""
    global _reachable
    if _reachable is None:
        try:
            import psycopg

            with psycopg.connect(ADMIN_URL, connect_timeout=3, autocommit=True) as conn:
                conn.execute("SELECT 1")
            _reachable = ""
        except Exception as e:  # ImportError too: psycopg is a dependency
            detail = " ".join(str(e).split())  # libpq's message spans lines
            _reachable = f"no PostgreSQL at {ADMIN_URL} ({type(e).__name__}: {detail})"
    return _reachable or None


def require_postgres(skip, fail):
    """Call ``skip(reason)`` or, under SMTPRELAY_REQUIRE_POSTGRES, ``fail(reason)``
    when no server answers."""
    why = unreachable()
    if why:
        why += "; set SMTPRELAY_TEST_POSTGRES to a server's URL"
        if os.environ.get("SMTPRELAY_REQUIRE_POSTGRES"):
            fail(why + " (SMTPRELAY_REQUIRE_POSTGRES is set)")
        skip(why)


def _with_dbname(url, name):
    """``url`` naming database ``name`` instead, still a URL (what relay.toml takes)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


class TempDatabase:
    """A fresh, empty database on the test server; ``url`` to reach it."""

    def __init__(self, prefix="smtprelay_test"):
        import psycopg

        self.name = f"{prefix}_{secrets.token_hex(6)}"
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.url = _with_dbname(ADMIN_URL, self.name)

    def connect(self):
        import psycopg

        return psycopg.connect(self.url, autocommit=True)

    def query(self, sql, params=()):
        """Rows of ``sql`` written with ``?`` placeholders, as the store's SQL is."""
        from smtprelay.store.postgres import PostgresDialect

        with self.connect() as conn:
            cur = conn.execute(PostgresDialect().sql(sql), params)
            return cur.fetchall() if cur.description else []

    def _admin(self, sql, params=()):
        import psycopg

        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def terminate(self, application_name_like="smtprelay %"):
        """End the server sessions of the store(s) on this database -> how many."""
        return len(self._admin(
            """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
               WHERE datname = %s AND application_name LIKE %s AND pid <> pg_backend_pid()""",
            (self.name, application_name_like)))

    def allow_connections(self, allowed):
        """Open or close the database to new sessions (superusers included): with
        ``terminate``, the server is gone as far as a relay can tell."""
        self._admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS {str(bool(allowed)).lower()}')

    def drop(self):
        import psycopg

        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def url_for(url, **params):
    """``url`` with libpq parameters replaced (e.g. port=1 for a server that is gone)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    return make_conninfo(**dict(conninfo_to_dict(url), **{k: str(v) for k, v in params.items()}))
