"""MIME fuzzing through the outbox: whatever the MIME (malformed multiparts,
missing boundaries, huge headers, broken encodings, 8-bit headers in legacy
charsets, odd attachment names), the bytes arrive unchanged, and nothing
crashes or sticks in the queue."""

import time

import pytest
from hypothesis import HealthCheck, given, settings

from tests import torture
from tests.mime_strategies import dot_stuff, mime_message
from tests.relay import RawSMTP, RelayProcess, parse_outbox, strip_received


@pytest.fixture(scope="module")
def mime_relay(tmp_path_factory):
    relay = RelayProcess(tmp_path_factory.mktemp("mime"))
    relay.start()
    yield relay
    relay.stop()


def test_any_mime_arrives_unchanged_through_the_outbox(mime_relay):
    sent = []

    @settings(max_examples=torture.scale(40, 500), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(mime_message())
    def send(message):
        with RawSMTP(mime_relay.port) as c:
            c.reply()
            c.cmd("EHLO mime")
            c.cmd("MAIL FROM:<fuzz@example.com>")
            c.cmd(f"RCPT TO:<m{len(sent)}@example.com>")
            assert c.cmd("DATA").code == 354
            c.send(dot_stuff(message) + b".\r\n")
            r = c.reply()
            assert r.code == 250, r
        sent.append(message)
        torture.figures["messages sent"] += 1

    send()
    deadline = time.monotonic() + 60
    while len(mime_relay.outbox_files()) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.1)
    got = {}
    for f in mime_relay.outbox_files():
        _, env_to, data = parse_outbox(f)
        got[int(env_to[0][1:].split("@")[0])] = strip_received(data)
    assert len(got) == len(sent)
    for i, message in enumerate(sent):
        assert got[i] == message, i
    stuck = mime_relay.query("SELECT COUNT(*) FROM messages WHERE status != 'sent'")
    assert stuck == [(0,)]
