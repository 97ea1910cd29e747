"""Disks that stop taking writes, under the outbox and under the database.

A small tmpfs (root only: the tests skip elsewhere, and fail under
``SMTPRELAY_REQUIRE_TOOLS``) is filled up, remounted read-only, or has the
outbox's path replaced by a file.  The outbox: deliveries are deferred with the
reason, then delivered once the disk takes writes again; nothing lost, nothing
delivered twice, no half-written file left in ``tmp/``.  The database: every
new message gets ``451 4.3.0`` and nothing half-stored remains; once the disk
is back, messages are accepted again and every one accepted before is delivered.
"""

import contextlib
import os
import subprocess
import time

import pytest

from tests import torture
from tests.hostile import Audit, attempts, marker, message, settle, submit
from tests.relay import RawSMTP, parse_outbox

pytestmark = [pytest.mark.slow, pytest.mark.torture]

N = torture.scale(3, 20)


@contextlib.contextmanager
def small_disk(path, size="2m"):
    path.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       check=True, capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        if os.environ.get("SMTPRELAY_REQUIRE_TOOLS"):
            raise
        pytest.skip(f"cannot mount a small tmpfs here: {e}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path, mode):
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True,
                   capture_output=True)


def fill(path):
    """Fill the disk at ``path`` to the last byte; the file that does it."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def wait_deferred(relay, ids, reason, timeout=30):
    """Every message has an attempt that failed with ``reason`` and none is sent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        histories = {i: attempts(relay, i) for i in ids}
        if all(any(o == "temporary" and reason in d for o, d in h) for h in histories.values()):
            statuses = {i: relay.query("SELECT status FROM messages WHERE id = ?", (i,))[0][0]
                        for i in ids}
            assert set(statuses.values()) <= {"deferred", "active"}, statuses
            return histories
        time.sleep(0.1)
    raise AssertionError(f"not deferred with {reason!r}: {histories}\n{relay.log()[-3000:]}")


def outbox_received(relay):
    """Message-IDs of the outbox's files (one entry per file)."""
    out = []
    for f in relay.outbox_files():
        _, _, data = parse_outbox(f)
        for line in data.split(b"\r\n"):
            if line.lower().startswith(b"message-id:"):
                out.append(line.split(b":", 1)[1].strip().decode())
                break
    return out


def test_the_outbox_stops_taking_writes_then_recovers(start_relay, tmp_path):
    # room for every batch: only the filler fills it
    with small_disk(tmp_path / "disk", size=torture.scale("2m", "16m")) as disk:
        relay = start_relay({"provider": {"type": "outbox", "directory": str(disk / "outbox")},
                             "delivery": {"retry": ["1s"], "max_age": "10m"}})
        accepted = {}

        def batch(tag):
            ids = {}
            for n in range(N):
                mark = marker(tag, n)
                ids[mark] = submit(relay, "app@example.com", ["to@example.net"],
                                   message("app@example.com", "to@example.net", mark, 40_000))
            accepted.update(ids)
            return list(ids.values())

        # 1. full
        filler = fill(disk)
        ids = batch("disk-full")
        wait_deferred(relay, ids, "No space left on device")
        assert relay.outbox_files() == [] and os.listdir(disk / "outbox" / "tmp") == []
        filler.unlink()
        settle(relay, ids, 30)

        # 2. read-only
        remount(disk, "ro")
        try:
            ids = batch("disk-ro")
            wait_deferred(relay, ids, "Read-only file system")
        finally:
            remount(disk, "rw")
        settle(relay, ids, 30)

        # 3. the outbox's path is now a file
        os.rename(disk / "outbox", disk / "outbox.away")
        (disk / "outbox").write_bytes(b"not a directory")
        ids = batch("disk-file")
        wait_deferred(relay, ids, "Not a directory")
        (disk / "outbox").unlink()
        os.rename(disk / "outbox.away", disk / "outbox")
        settle(relay, ids, 30)

        time.sleep(0.5)
        a = Audit(relay, accepted, outbox_received(relay), faults=3).check("sent")
        assert a.duplicates == 0
        assert os.listdir(disk / "outbox" / "tmp") == []
        relay.stop()


def test_the_database_disk_fills_under_a_busy_queue_then_recovers(start_relay, tmp_path):
    """The disk under a live SQLite database (WAL) fills while messages are queued:
    new messages get 451 4.3.0 and nothing half-stored remains; once there is room
    again the relay accepts and delivers, without a restart, every message it
    accepted before, during and after."""
    with small_disk(tmp_path / "disk", size="8m") as disk:
        # the outbox is a file at first: the messages wait in the queue
        outbox = tmp_path / "outbox"
        outbox.write_bytes(b"not yet")
        relay = start_relay({"database": {"url": f"sqlite:///{disk / 'relay.db'}"},
                             "provider": {"type": "outbox", "directory": str(outbox)},
                             "delivery": {"retry": ["1s"], "max_age": "10m"}})
        accepted = {}

        def accept(tag, n):
            mark = marker(tag, n)
            accepted[mark] = submit(relay, "app@example.com", ["to@example.net"],
                                    message("app@example.com", "to@example.net", mark, 20_000))

        for n in range(N):
            accept("db-before", n)
        filler = fill(disk)
        refused = 0
        for n in range(N):
            with RawSMTP(relay.port) as c:
                assert c.reply().code == 220
                c.cmd("EHLO x")
                c.cmd("MAIL FROM:<app@example.com>")
                c.cmd("RCPT TO:<to@example.net>")
                assert c.cmd("DATA").code == 354
                c.send(message("app@example.com", "to@example.net", marker("db-refused", n),
                               200_000) + b".\r\n")
                r = c.reply()
                assert (r.code, r.enhanced) in ((451, "4.3.0"), (250, "2.0.0")), r
                refused += r.code == 451
        assert refused, "the disk never filled"
        torture.figures["faults injected"] += refused
        outbox.unlink()  # the queue delivers, and meets the full disk recording it
        time.sleep(3)
        filler.unlink()
        stored = {m for (m,) in relay.query("SELECT message_id FROM messages")}
        for mark in [m for m in stored if m.startswith("<hostile-db-refused")]:
            # accepted (250) after all: it must be delivered like the others
            accepted[mark] = relay.query("SELECT id FROM messages WHERE message_id = ?",
                                         (mark,))[0][0]
        assert relay.query("SELECT COUNT(*) FROM bodies WHERE message_id NOT IN "
                           "(SELECT id FROM messages)") == [(0,)]
        for n in range(N):
            accept("db-after", n)
        settle(relay, accepted.values(), 60)
        time.sleep(0.5)
        Audit(relay, accepted, outbox_received(relay)).check("sent")
        assert "Traceback" not in relay.log(whole=True)
        relay.stop()
