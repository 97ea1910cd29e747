"""Three real relays (twistd processes) on one PostgreSQL database.

They start at the same moment on an empty database (the migrations take
turns), take thousands of messages from parallel SMTP clients spread over all
three, and deliver through one shared outbox directory, so that every
delivery is a file that names its Message-ID.  Mid-run one relay is killed
with SIGKILL while it holds leases; the two others deliver its messages once
those leases expire, never before.  Then: every message that got a 250 was
delivered exactly once (only a message whose delivery the dead relay had in
hand may have been written twice: its answer was lost, as the contract
allows), per-mailbox concurrency held over all instances throughout, and the
statistics of the database count all of it.

A relay whose database goes away answers 451 and takes messages again when it
is back, without a restart.

Skipped with the reason when no PostgreSQL answers (a failure under
``SMTPRELAY_REQUIRE_POSTGRES=1``).  ``SMTPRELAY_E2E_MESSAGES`` sets the
number of messages (3000 by default).
"""

import os
import re
import smtplib
import threading
import time
from collections import Counter

import pytest

from smtprelay.store import _sql
from tests import pg
from tests.relay import RelayProcess

pytestmark = pytest.mark.slow

MESSAGES = int(os.environ.get("SMTPRELAY_E2E_MESSAGES", "3000"))
CLIENTS = 12
PER_CONNECTION = 25
MAILBOXES = [f"app{i}@example.com" for i in range(6)]
CONCURRENCY = 4
LEASE = 10.0


@pytest.fixture
def database():
    pg.require_postgres(pytest.skip, pytest.fail)
    db = pg.TempDatabase()
    yield db
    db.drop()


def relay_config(db, outbox):
    return {
        "database": {"url": db.url},
        "provider": {"type": "outbox", "directory": str(outbox)},
        "delivery": {"lease": f"{int(LEASE)}s", "retry": ["1s", "2s"],
                     "concurrency": CONCURRENCY},
    }


class Clients:
    """Parallel SMTP clients, each sending its share over a few connections to
    the relays in turn; a relay that dies is left for the others."""

    def __init__(self, relays, count, clients=CLIENTS):
        self.relays = relays
        self.dead = set()  # indexes of relays not to use any more
        self.dying = set()  # indexes of relays whose connections may break
        self.accepted = {}  # Message-ID -> index of the relay that answered 250
        self.uncertain = set()  # Message-IDs whose answer was lost with the connection
        self.refused = Counter()  # reply code -> how many (4xx: sent again)
        self.errors = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(k, range(k, count, clients)),
                                          daemon=True) for k in range(clients)]

    def start(self):
        for t in self._threads:
            t.start()

    def join(self, timeout):
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "SMTP clients did not finish"

    def _relay(self, k, turn):
        live = [i for i in range(len(self.relays)) if i not in self.dead]
        return live[(k + turn) % len(live)]

    def _run(self, k, numbers):
        numbers = list(numbers)
        tries = Counter()
        turn = 0
        while numbers:
            index = self._relay(k, turn)
            turn += 1
            current = None
            try:
                with smtplib.SMTP("127.0.0.1", self.relays[index].port, timeout=30) as smtp:
                    for _ in range(PER_CONNECTION):
                        if not numbers:
                            break
                        n = numbers[0]
                        current = f"<m{n}.t{tries[n]}@e2e.test>"
                        sender = MAILBOXES[n % len(MAILBOXES)]
                        body = (f"From: {sender}\r\nTo: r{n}@example.org\r\n"
                                f"Subject: message {n}\r\nMessage-ID: {current}\r\n\r\n"
                                f"body of {n}\r\n" + "x" * (n % 3000) + "\r\n")
                        try:
                            smtp.sendmail(sender, [f"r{n}@example.org"], body.encode())
                        except smtplib.SMTPResponseException as e:
                            # an answer other than 250: nothing was stored; send it again
                            with self._lock:
                                self.refused[e.smtp_code] += 1
                            tries[n] += 1
                            current = None
                            break
                        with self._lock:
                            self.accepted[current] = index
                        current = None
                        numbers.pop(0)
            except (OSError, smtplib.SMTPException) as e:
                if current is not None:
                    # no answer: it may or may not be stored; a new Message-ID for the next try
                    with self._lock:
                        self.uncertain.add(current)
                    tries[numbers[0]] += 1
                if index not in self.dead | self.dying:
                    with self._lock:
                        self.errors.append(f"relay {index}: {type(e).__name__}: {e}")
                time.sleep(0.05)


class ConcurrencyWatch:
    """Samples the active, leased messages per mailbox over all instances."""

    def __init__(self, db):
        self.db = db
        self.highest = Counter()
        self.samples = 0
        self.error = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()

    def _run(self):
        try:
            self._sample()
        except Exception as e:  # seen by stop()
            self.error = e

    def stop(self):
        self._stop.set()
        self._thread.join(10)
        assert self.error is None, self.error

    def _sample(self):
        with self.db.connect() as conn:
            while not self._stop.wait(0.1):
                now = time.time()  # before the query: every claim it sees was made earlier
                rows = conn.execute(
                    """SELECT mailbox, COUNT(*) FROM messages
                       WHERE status = 'active' AND lease_until >= %s GROUP BY mailbox""",
                    (now,)).fetchall()
                for mailbox, n in rows:
                    self.highest[mailbox] = max(self.highest[mailbox], n)
                self.samples += 1


def outbox_message_ids(outbox):
    found = Counter()
    for path in (outbox / "new").iterdir():
        head = path.read_bytes()[:4096]
        m = re.search(rb"^Message-ID: (<[^>]+>)", head, re.M)
        assert m, path
        found[m.group(1).decode()] += 1
    return found


def kill_while_holding_leases(db, victim, attempts=200):
    """SIGKILL ``victim`` at a moment it holds leases -> {id: lease_until} it held."""
    for _ in range(attempts):
        if db.query("SELECT 1 FROM messages WHERE status = 'active' AND lease_owner = ? LIMIT 1",
                    (victim.instance_id,)):
            victim.freeze()
            time.sleep(0.2)  # a statement already sent may still commit
            held = dict(db.query(
                "SELECT id, lease_until FROM messages WHERE status = 'active' AND lease_owner = ?",
                (victim.instance_id,)))
            if held:
                victim.kill()
                return held
            victim.thaw()
        time.sleep(0.01)
    raise AssertionError("the relay to kill never held a lease")


def test_three_relays_one_database_exactly_once_through_a_kill(database, tmp_path):
    outbox = tmp_path / "outbox"
    relays = [RelayProcess(tmp_path / f"relay{i}", relay_config(database, outbox))
              for i in range(3)]
    try:
        # concurrent start-up on an empty database: the migrations take turns
        for r in relays:
            r.start(expect_ready=False)
        for r in relays:
            r.wait_ready(60)
        assert database.query("SELECT version FROM schema_version") == [(_sql.SCHEMA_VERSION,)]
        states = dict(database.query("SELECT id, state FROM instances"))
        assert states == {r.instance_id: "running" for r in relays}

        watch = ConcurrencyWatch(database)
        watch.start()
        clients = Clients(relays, MESSAGES)
        started = time.monotonic()
        clients.start()

        # mid-run, relay 2 dies with deliveries in hand
        deadline = time.monotonic() + 120
        while len(clients.accepted) < MESSAGES // 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        victim = relays[2]
        clients.dying.add(2)
        held = kill_while_holding_leases(database, victim)
        killed_at = time.time()
        clients.dead.add(2)

        clients.join(180)
        sent_in = time.monotonic() - started
        assert not clients.errors, clients.errors[:5]
        assert len(clients.accepted) == MESSAGES

        # every message that got a 250 is delivered
        expected = set(clients.accepted)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pending = database.query(
                "SELECT COUNT(*) FROM messages WHERE status NOT IN ('sent', 'failed')")[0][0]
            if pending == 0:
                break
            time.sleep(0.2)
        assert pending == 0, f"{pending} messages not delivered\n{relays[0].log()[-3000:]}"
        delivered_in = time.monotonic() - started
        watch.stop()

        # exactly once, by Message-ID; twice only where the dead relay had the
        # delivery in hand (the file may be written and the outcome lost)
        found = outbox_message_ids(outbox)
        held_mids = {m for (m,) in database.query(
            f"SELECT message_id FROM messages WHERE id IN ({','.join('?' * len(held))})",
            tuple(held))}
        missing = expected - set(found)
        assert not missing, sorted(missing)[:10]
        twice = {m: n for m, n in found.items() if n > 1}
        assert set(twice) <= held_mids, {m: n for m, n in twice.items() if m not in held_mids}
        assert all(n == 2 for n in twice.values()), twice
        strangers = set(found) - expected - clients.uncertain
        assert not strangers, sorted(strangers)[:10]

        # the dead relay's leased messages went to the others, after its lease
        for mid, lease_until in held.items():
            row = database.query("SELECT status FROM messages WHERE id = ?", (mid,))
            assert row == [("sent",)], (mid, row)
            [(at, instance)] = database.query(
                "SELECT at, instance FROM attempts WHERE message_id = ? AND outcome = 'sent'",
                (mid,))
            assert instance in (relays[0].instance_id, relays[1].instance_id)
            assert at >= lease_until, (mid, at, lease_until)

        # per-mailbox concurrency held over all instances, all the way
        assert watch.samples > 20
        assert max(watch.highest.values()) <= CONCURRENCY, watch.highest

        # the database's statistics count every instance's work
        stats = database_stats(database)
        total = database.query("SELECT COUNT(*) FROM messages")[0][0]
        assert stats.received == total >= MESSAGES
        assert stats.sent == total
        assert (stats.failed, stats.queued, stats.deferred, stats.active) == (0,) * 4
        by_instance = dict(database.query(
            "SELECT received_by, COUNT(*) FROM messages GROUP BY received_by"))
        assert set(by_instance) == {r.instance_id for r in relays}
        senders = dict(database.query(
            "SELECT instance, COUNT(*) FROM attempts WHERE outcome = 'sent' GROUP BY instance"))
        assert set(senders) <= {r.instance_id for r in relays}
        assert all(senders.get(r.instance_id) for r in relays[:2]), senders

        # the dead relay, started again on this host, declares its old self dead
        old_id = victim.instance_id
        victim.start()
        deadline = time.monotonic() + 15  # recover() runs as the queue starts, unawaited
        while True:
            states = dict(database.query("SELECT id, state FROM instances"))
            if states[old_id] == "dead" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert states[old_id] == "dead"
        assert states[victim.instance_id] == "running"
        print(f"\n{MESSAGES} messages over {CLIENTS} clients to 3 relays: all accepted in "
              f"{sent_in:.1f}s, delivered in {delivered_in:.1f}s; relay 2 killed holding "
              f"{len(held)} leases at {killed_at:.0f}; {len(twice)} written twice; "
              f"{len(clients.uncertain)} answers lost; refused {dict(clients.refused)}; "
              f"deliveries by instance {sorted(senders.values())}; highest in flight per "
              f"mailbox {max(watch.highest.values())}")
    finally:
        for r in relays:
            if r.proc is not None and r.proc.poll() is None:
                r.stop()
    states = dict(database.query("SELECT id, state FROM instances"))
    assert sorted(states.values()) == ["dead", "stopped", "stopped", "stopped"]


def database_stats(db):
    """What every instance's GET /api/stats reads: the store's statistics,
    which cover the whole database (all instances)."""
    from smtprelay.store import postgres

    conn = postgres.connect(db.url)
    try:
        return _sql.stats(postgres.PostgresDialect(), conn, time.time())
    finally:
        conn.close()


def send(port, n):
    mid = f"<gone{n}@e2e.test>"
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.sendmail("app0@example.com", ["r@example.org"],
                      f"From: app0@example.com\r\nMessage-ID: {mid}\r\n\r\nbody\r\n".encode())
    return mid


def test_a_database_gone_away_is_451_then_the_relay_carries_on(database, tmp_path):
    relay = RelayProcess(tmp_path / "relay", relay_config(database, tmp_path / "outbox"))
    relay.start()
    try:
        first = send(relay.port, 1)
        relay.wait_outbox(1)
        database.allow_connections(False)
        try:
            assert database.terminate() >= 2  # the writer and the readers
            with pytest.raises(smtplib.SMTPDataError) as info:
                send(relay.port, 2)
            assert (info.value.smtp_code, info.value.smtp_error[:5]) == (451, b"4.3.0")
        finally:
            database.allow_connections(True)
        # back: the next message is stored (the writer tries again within a second)
        deadline = time.monotonic() + 15
        while True:
            try:
                third = send(relay.port, 3)
                break
            except smtplib.SMTPDataError as e:
                assert e.smtp_code == 451 and time.monotonic() < deadline
                time.sleep(0.2)
        files = relay.wait_outbox(2)
        assert sorted(outbox_message_ids(tmp_path / "outbox")) == sorted([first, third])
        assert relay.query("SELECT message_id FROM messages ORDER BY id") == [(first,), (third,)]
        assert "storing a message failed" in relay.log()
        assert len(files) == 2
    finally:
        relay.stop()
