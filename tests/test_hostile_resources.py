"""Resource abuse: connection floods, slowloris clients, many idle sessions."""

import socket
import threading
import time

from smtprelay import replies
from tests import torture
from tests.relay import RawSMTP


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_per_address_connection_limit(start_relay):
    relay = start_relay({"smtp": {"max_connections_per_address": 3}})
    held = [RawSMTP(relay.port) for _ in range(3)]
    for c in held:
        assert c.reply().code == 220
    with RawSMTP(relay.port) as c:
        assert c.reply().lines == [
            str(replies.TOO_MANY_FROM_ADDRESS.format(hostname="relay.test"))]
        assert c.closed()
    torture.figures["connections refused over a limit"] += 1
    held.pop().close()
    time.sleep(0.2)
    with RawSMTP(relay.port) as c:
        assert c.reply().code == 220
    for c in held:
        c.close()


def trickle(port, results, index, interval=0.25, duration=8.0):
    """Send one byte every ``interval`` seconds without ever ending a line."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=duration + 5)
        greeting = s.recv(1000)
        if not greeting.startswith(b"220"):
            results[index] = ("refused", greeting)
            return
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            try:
                s.sendall(b"E")
            except OSError:
                break
            s.settimeout(interval)
            try:
                data = s.recv(1000)
                if data:
                    results[index] = ("closed", data, time.monotonic() - (deadline - duration))
                    return
                results[index] = ("closed", b"", time.monotonic() - (deadline - duration))
                return
            except TimeoutError:
                pass
        results[index] = ("survived", b"")
    except OSError as e:
        results[index] = ("error", repr(e))


def test_a_byte_a_second_does_not_keep_a_session_alive(start_relay):
    relay = start_relay({"smtp": {"idle_timeout": "2s"}})
    results = {}
    trickle(relay.port, results, 0, interval=0.25, duration=6)
    kind, data, after = results[0]
    assert kind == "closed" and data.startswith(b"421 4.4.2"), results
    assert after < 4
    torture.figures["slowloris clients cut off"] += 1


def test_slowloris_under_stress_cannot_exhaust_the_server(start_relay):
    """Slow clients fill 80 % of the slots: the relay switches to the short
    stress timeout, drops them, and serves a real client."""
    relay = start_relay({"smtp": {"max_connections": 10, "idle_timeout": "60s",
                                  "stress_timeout": "2s"}})
    results = {}
    threads = [threading.Thread(target=trickle, args=(relay.port, results, i, 0.25, 8))
               for i in range(9)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    for t in threads:
        t.join()
    closed = [r for r in results.values() if r[0] == "closed"]
    assert len(closed) == 9, results
    assert all(r[1].startswith(b"421 4.4.2") and r[2] < 5 for r in closed), results
    torture.figures["slowloris clients cut off"] += len(closed)
    assert "under stress" in relay.log()
    with RawSMTP(relay.port) as c:
        assert c.reply().code == 220
        c.cmd("EHLO ok")
        c.cmd("MAIL FROM:<a@example.com>")
        c.cmd("RCPT TO:<b@example.com>")
        c.cmd("DATA")
        c.send(b"Subject: still served\r\n\r\nhi\r\n.\r\n")
        assert c.reply().code == 250


def test_a_thousand_concurrent_sessions(start_relay):
    relay = start_relay({"smtp": {"max_connections": 1100, "max_connections_per_address": 1100,
                                  "stress_timeout": "120s"}})
    before = rss_kb(relay.proc.pid)
    socks = []
    try:
        for _ in range(1000):
            socks.append(socket.create_connection(("127.0.0.1", relay.port), timeout=30))
        greetings = 0
        for s in socks:
            data = b""
            while not data.endswith(b"\r\n"):
                data += s.recv(100)
            greetings += data.startswith(b"220 ")
        assert greetings == 1000
        torture.figures["concurrent sessions held"] += 1000
        for s in socks:
            s.sendall(b"EHLO many\r\n")
        for s in socks:
            data = b""
            while b"250 HELP\r\n" not in data:
                data += s.recv(1000)
        peak = rss_kb(relay.proc.pid)
        print(f"\n1,000 idle sessions: relay RSS {before / 1024:.1f} MB -> {peak / 1024:.1f} MB")
        # one more real message goes through while they all sit there
        with RawSMTP(relay.port) as c:
            assert c.reply().code == 220
            c.cmd("EHLO real")
            c.cmd("MAIL FROM:<a@example.com>")
            c.cmd("RCPT TO:<b@example.com>")
            c.cmd("DATA")
            c.send(b"Subject: among a thousand\r\n\r\nhi\r\n.\r\n")
            assert c.reply().code == 250
        with RawSMTP(relay.port) as c:
            pass
    finally:
        for s in socks:
            s.close()
    relay.wait_outbox(1)
