"""Provider faults, end to end: the real relay (twistd, SQLite, the queue) against a
provider that misbehaves, for each provider.

- smtp: aiosmtpd (a real SMTP server, :mod:`tests.upstream`) behind a
  :class:`~tests.faultproxy.FaultProxy`;
- m365: the Graph fake (``python -m tests.fakes.graph``) behind the proxy;
- gmail: the Google fake (``python -m tests.fakes.gmail``) behind the proxy.

The proxy gives every provider the same network faults (refused connections,
resets in the middle of the body, aborted TLS handshakes, a server that says
nothing); the fakes and aiosmtpd give the answers (429/5xx storms with and
without Retry-After, slow answers past ``provider.timeout``, a message accepted
and then the answer lost: the ambiguous outcome); a CA that did not sign the
provider's certificate gives the TLS failure that never heals.

The relay runs with ``provider.timeout = "2s"``, ``delivery.retry = ["1s"]``
and a short ``max_age``, so that the end comes quickly.  For each fault,
:class:`tests.hostile.Audit` checks against the relay's own database that every
accepted message ended ``sent`` or ``failed`` with its reason, none lost, none
stuck, duplicates only where an attempt was logged ``ambiguous``; the figures
go to the report.

The m365 and gmail worlds (:mod:`tests.fault_worlds`) script the same faults, each
in its fake's words, so each of those tests runs once per ``provider``.
"""

import threading
import time

import pytest

from tests.fakes.google_accounts import ServiceAccountKey
from tests.fakes.tlsca import TestCA
from tests.fault_worlds import (
    SETTLE,
    TIMEOUT,
    GmailWorld,
    M365World,
    N,
    send_batch,
    start_relay,
)
from tests.faultproxy import FaultProxy
from tests.gmail_support import FakeGoogleProcess
from tests.graph_support import FakeGraphProcess
from tests.hostile import Audit, marker, message, settle, submit
from tests.upstream import Upstream

pytestmark = [pytest.mark.slow]

PROVIDERS = ["m365", "gmail"]


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    """A CA that signed nothing the providers present."""
    return TestCA(tmp_path_factory.mktemp("other-ca"))


def wait_until(predicate, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ============================================================================ smtp

SMTP_SENDER = "app@example.com"
SMTP_TO = "to@example.net"


class SMTPWorld:
    """aiosmtpd (STARTTLS, or TLS from the first byte) behind the proxy, and a relay."""

    def __init__(self, tmp_path, ca, mode="starttls", ca_file=None, delivery=None):
        self.upstream = Upstream(ca, mode=mode).start()
        self.proxy = FaultProxy(self.upstream.port)
        self.relay = start_relay(tmp_path / "relay", {
            "type": "smtp", "host": "127.0.0.1", "port": self.proxy.port,
            "security": mode, "ca_file": str(ca_file or ca.ca_path), "timeout": TIMEOUT},
            delivery)

    def received(self):
        got = self.upstream.messages + self.upstream.dropped
        return [_message_id(m.content) for m in got]

    def stop(self):
        self.relay.stop()
        self.proxy.stop()
        self.upstream.stop()


def _message_id(content):
    for line in content.split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode()
        if not line:
            break
    return None


@pytest.fixture
def smtp_world(tmp_path, ca):
    worlds = []

    def make(**kw):
        w = SMTPWorld(tmp_path / f"w{len(worlds)}", ca, **kw)
        worlds.append(w)
        return w

    yield make
    for w in worlds:
        w.stop()


def smtp_audit(world, accepted, faults=None, expect="sent", grace=0.5):
    """``faults``: how many were injected (default: what the proxy applied)."""
    settle(world.relay, accepted.values(), SETTLE)
    time.sleep(grace)  # an answer the relay gave up on may still land upstream
    if faults is None:
        faults = world.proxy.faults
    return Audit(world.relay, accepted, world.received(), faults).check(expect)


def test_smtp_refused_connections(smtp_world):
    w = smtp_world()
    w.proxy.refuse_for(1.5)
    accepted = send_batch(w.relay, "smtp-refused", SMTP_SENDER, SMTP_TO)
    a = smtp_audit(w, accepted)
    assert any("refused" in d for d in a.details()), a.details()


@pytest.mark.parametrize("size", [60_000, 8_000_000])
def test_smtp_reset_in_the_middle_of_the_body(smtp_world, size):
    """Reset when a third of the message has reached the server.  A small message
    is all in the socket buffers by then, its final dot included: the relay cannot
    tell that from a server that took it and died, so that attempt is ambiguous.
    A large one is still being sent: not delivered, plainly temporary."""
    w = smtp_world()
    w.proxy.arm(*[("reset_after", size // 3)] * N)
    accepted = send_batch(w.relay, f"smtp-reset-{size}", SMTP_SENDER, SMTP_TO, size=size)
    a = smtp_audit(w, accepted)
    assert w.proxy.injected["reset_after"] == N
    assert a.duplicates == 0
    assert any("reset" in d for d in a.details()), a.details()
    if size > 1_000_000:
        assert any("while the message was being sent (not delivered)" in d
                   for d in a.details()), a.details()


@pytest.mark.parametrize("mode", ["starttls", "tls"])
def test_smtp_tls_handshake_aborted(smtp_world, mode):
    w = smtp_world(mode=mode)
    w.proxy.arm(*(["abort_tls", "garbage" if mode == "tls" else "close"] * N)[:N])
    accepted = send_batch(w.relay, f"smtp-handshake-{mode}", SMTP_SENDER, SMTP_TO)
    a = smtp_audit(w, accepted)
    assert any("TLS" in d for d in a.details()), a.details()


def test_smtp_tls_wrong_ca_fails_with_the_reason(smtp_world, other_ca):
    w = smtp_world(ca_file=other_ca.ca_path, delivery={"max_age": "4s"})
    accepted = send_batch(w.relay, "smtp-wrong-ca", SMTP_SENDER, SMTP_TO)
    settle(w.relay, accepted.values(), SETTLE)
    a = Audit(w.relay, accepted, w.received())
    a.faults = len(a.details())  # every attempt met the wrong CA
    a.check("failed")
    for _, error, _ in a.rows.values():
        assert "delivery.max_age" in error and "certificate verify failed" in error, error
    assert w.upstream.mail_commands == []


def test_smtp_silent_and_slow_servers_past_the_timeout(smtp_world):
    w = smtp_world()
    w.proxy.arm(*(["hang", ("slow", 3)] * N)[:N])
    accepted = send_batch(w.relay, "smtp-slow", SMTP_SENDER, SMTP_TO)
    a = smtp_audit(w, accepted)
    assert any("no reply to" in d and "within 2s" in d for d in a.details()), a.details()


def test_smtp_slow_answer_after_the_dot_is_ambiguous(smtp_world):
    """The upstream takes 3 s to answer the final dot, the relay waits 2 s: it cannot
    know whether the message was taken, logs the attempt ambiguous and sends again.
    (aiosmtpd drops a message whose client left before its answer: no duplicate.)"""
    w = smtp_world()
    w.upstream.data_delay = 3
    accepted = send_batch(w.relay, "smtp-late", SMTP_SENDER, SMTP_TO)
    wait_until(lambda: w.relay.query("SELECT COUNT(*) FROM attempts WHERE outcome = "
                                     "'ambiguous'")[0][0] >= N, 30, "the late answers")
    w.upstream.data_delay = 0
    a = smtp_audit(w, accepted, N, grace=3.5)
    assert a.ambiguous >= N


def test_smtp_accepted_then_dropped_is_ambiguous(smtp_world):
    w = smtp_world()
    w.upstream.drop_after_dot = N
    accepted = send_batch(w.relay, "smtp-dropped", SMTP_SENDER, SMTP_TO)
    a = smtp_audit(w, accepted, N)
    assert a.duplicates == N and a.ambiguous >= N


def test_smtp_4xx_storm_then_5xx(smtp_world):
    """A storm of 4xx at the end of data (deferred, then sent), then 5xx (failed at once)."""
    w = smtp_world()
    lock = threading.Lock()
    storm = {"left": 2 * N, "refuse": set()}

    def data_reply(got):
        mark = _message_id(got.content)
        with lock:
            if mark in storm["refuse"]:
                return "554 5.7.1 Rejected by upstream policy"
            if storm["left"] > 0:
                storm["left"] -= 1
                return "451 4.3.0 Try again later"
        return None

    w.upstream.data_reply = data_reply
    accepted = send_batch(w.relay, "smtp-4xx", SMTP_SENDER, SMTP_TO)
    smtp_audit(w, accepted, 2 * N - storm["left"])
    refused = {marker("smtp-5xx", n) for n in range(N)}
    storm["refuse"] = refused
    accepted = {}
    for mark in refused:
        accepted[mark] = submit(w.relay, SMTP_SENDER, [SMTP_TO],
                                message(SMTP_SENDER, SMTP_TO, mark))
    a = smtp_audit(w, accepted, N, expect="failed")
    for relay_id in accepted.values():
        [(outcome, detail)] = a.history[relay_id]
        assert (outcome, detail) == ("permanent", "554 5.7.1 Rejected by upstream policy")


# ============================================================================ m365 and gmail


@pytest.fixture(scope="module")
def graph_process(tmp_path_factory):
    fake = FakeGraphProcess(tmp_path_factory.mktemp("graph-ca"))
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def google_process(tmp_path_factory, ca):
    fake = FakeGoogleProcess(ca.directory, tmp_path_factory.mktemp("google") / "fake.log")
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def google_account():
    return ServiceAccountKey.generate()


@pytest.fixture
def world(request, tmp_path, provider):
    """``world(**kw)`` -> an :class:`~tests.fault_worlds.M365World` or a
    :class:`~tests.fault_worlds.GmailWorld`, as ``provider`` says; only that
    provider's fake is started."""
    worlds = []

    def make(**kw):
        directory = tmp_path / f"w{len(worlds)}"
        if provider == "m365":
            w = M365World(directory, request.getfixturevalue("graph_process"), **kw)
        else:
            w = GmailWorld(directory, request.getfixturevalue("google_process"),
                           request.getfixturevalue("google_account"),
                           request.getfixturevalue("ca"), **kw)
        worlds.append(w)
        return w

    yield make
    for w in worlds:
        w.stop()


def warm(world, tag):
    """One message through, so that the token and a pooled connection exist."""
    accepted = world.send(f"{tag}-warm", count=1)
    settle(world.relay, accepted.values(), SETTLE)
    return accepted


@pytest.mark.parametrize("provider", PROVIDERS)
def test_refused_connections(world, provider):
    w = world()
    accepted = warm(w, f"{provider}-refused")
    w.proxy.refuse_for(1.5)
    accepted.update(w.send(f"{provider}-refused"))
    a = w.audit(accepted)
    assert any("refused" in d for d in a.details()), a.details()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_reset_in_the_middle_of_the_body(world, provider):
    w = world()
    accepted = warm(w, f"{provider}-reset")
    w.proxy.arm(*[("reset_after", 40_000)] * N)
    accepted.update(w.send(f"{provider}-reset", size=200_000))
    w.audit(accepted)
    assert w.proxy.injected["reset_after"] == N


@pytest.mark.parametrize("provider", PROVIDERS)
def test_tls_handshake_aborted(world, provider):
    w = world()
    accepted = warm(w, f"{provider}-handshake")
    w.proxy.arm(*(["abort_tls", "garbage", "close", "reset"] * N)[:N + 2])
    accepted.update(w.send(f"{provider}-handshake"))
    a = w.audit(accepted)
    assert a.ambiguous == 0, a.details()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_tls_wrong_ca_fails_with_the_reason(world, provider, other_ca):
    w = world(ca_file=other_ca.ca_path, delivery={"max_age": "4s"})
    accepted = w.send(f"{provider}-wrong-ca")
    settle(w.relay, accepted.values(), SETTLE)
    a = Audit(w.relay, accepted, w.received())
    a.faults = len(a.details())
    a.check("failed")
    for _, error, _ in a.rows.values():
        assert "delivery.max_age" in error and "certificate" in error, error


@pytest.mark.parametrize("provider", PROVIDERS)
def test_slow_answers_past_the_timeout(world, provider):
    """The token endpoint, then the send, hold their answers past provider.timeout:
    the sends are ambiguous (the relay cannot know), retried, and delivered once."""
    w = world()
    w.hang("token", times=1)
    w.hang("send", times=N)
    accepted = w.send(f"{provider}-slow")
    a = w.audit(accepted)
    assert a.duplicates == 0 and a.ambiguous >= 1
    assert any(f"within {TIMEOUT}" in d for d in a.details()), a.details()


@pytest.mark.parametrize("retry_after", [1, None])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_429_and_5xx_storms(world, provider, retry_after):
    """A storm of 429s (with Retry-After only) and 5xx: the messages get through
    (:meth:`M365World.storm` and :meth:`GmailWorld.storm` say what each fake answers)."""
    w = world()
    w.storm(retry_after)
    accepted = w.send(f"{provider}-storm-{retry_after}")
    a = w.audit(accepted)
    assert retry_after is None or any("429" in d for d in a.details()), a.details()
    if provider == "gmail":
        # Graph's storm ends in 504s, an ambiguous answer to a send: duplicates may follow
        assert a.duplicates == 0


@pytest.mark.parametrize("provider,loss", [
    (provider, loss) for provider, kind in (("m365", M365World), ("gmail", GmailWorld))
    for loss in kind.LOSSES])
def test_accepted_then_the_answer_is_lost(world, provider, loss):
    w = world()
    w.lose_answers(loss, times=N)
    accepted = w.send(f"{provider}-lost-{loss}")
    a = w.audit(accepted)
    assert a.duplicates == N and a.ambiguous >= N


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_storm_of_400s_fails_at_once_with_the_reason(world, provider):
    w = world()
    w.reject(times=N)
    accepted = w.send(f"{provider}-400")
    a = w.audit(accepted, expect="failed")
    for relay_id in accepted.values():
        [(outcome, detail)] = a.history[relay_id]
        assert outcome == "permanent" and "400" in detail, detail
