"""What the hostile-world tests share: sending marked messages, waiting for the end, the audit.

Each message a test sends carries a marker (its Message-ID), so that what a
provider (fake or real server) received can be matched with the relay's
delivery log.  :func:`audit` then checks the guarantees of ``smtp.md`` against
the relay's own SQLite database and adds the figures to the report
(:mod:`tests.torture`):

- none lost: every accepted message has its row, and a row ``sent`` was
  received by the provider at least once;
- none stuck: every row ends ``sent`` or ``failed`` (nothing ``queued``,
  ``deferred`` or ``active`` left);
- every failure has a reason, every attempt a detail;
- duplicates only where the outcome was ambiguous: a message received n times
  has at least n - 1 attempts logged ``ambiguous``;
- nothing received that was not sent (forged), no traceback in the log.
"""

import collections
import smtplib
import time
import uuid

from tests import torture

FINAL = ("sent", "failed")


def marker(tag, n):
    return f"<hostile-{tag}-{n}-{uuid.uuid4().hex[:8]}@test.example>"


def tag_of(mark):
    """The tag of a marker (what :func:`marker` was given)."""
    return mark.rsplit("-", 2)[0]


def message(sender, to, message_id, size=0, subject=None, extra=b""):
    """A plain RFC 5322 message of about ``size`` bytes of body."""
    head = (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject or message_id}\r\n"
            f"Message-ID: {message_id}\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n").encode() + extra + b"\r\n"
    line = b"hostile world, line of seventy-odd characters, to fill the body up......\r\n"
    return head + line * max(1, size // len(line))


def submit(relay, sender, recipients, data, timeout=60):
    """Send over SMTP; the relay's id of the accepted message."""
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=timeout) as s:
        s.ehlo("hostile.test")
        s.mail(sender)
        for r in recipients:
            code, text = s.rcpt(r)
            assert code == 250, (code, text)
        code, text = s.data(data)
        assert code == 250, (code, text)
    return text.decode().rsplit(" ", 1)[1]


def rows(relay, ids):
    out = {}
    for relay_id in ids:
        r = relay.query("SELECT status, error, message_id FROM messages WHERE id = ?",
                        (relay_id,))
        out[relay_id] = r[0] if r else None
    return out


def attempts(relay, relay_id):
    return relay.query("SELECT outcome, detail FROM attempts WHERE message_id = ? ORDER BY at",
                       (relay_id,))


def settle(relay, ids, timeout):
    """Wait until every message is ``sent`` or ``failed``; the rows (stuck ones too)."""
    deadline = time.monotonic() + timeout
    while True:
        found = rows(relay, ids)
        if all(r is not None and r[0] in FINAL for r in found.values()):
            return found
        if time.monotonic() > deadline:
            return found
        time.sleep(0.2)


class Audit:
    """The outcome of one hostile run, with :meth:`check` for its guarantees."""

    def __init__(self, relay, accepted, received, faults=0):
        self.relay = relay
        self.accepted = accepted  # marker -> relay id
        self.received = collections.Counter(received)  # marker -> times the provider got it
        self.faults = faults
        self.rows = rows(relay, accepted.values())
        self.history = {relay_id: attempts(relay, relay_id) for relay_id in accepted.values()}
        by_id = {v: k for k, v in accepted.items()}
        self.lost, self.stuck, self.unexplained, self.unexplained_duplicates = [], [], [], []
        self.sent = self.failed = self.duplicates = self.ambiguous = 0
        for relay_id, row in self.rows.items():
            mark = by_id[relay_id]
            history = self.history[relay_id]
            ambiguous = sum(1 for outcome, detail in history if outcome == "ambiguous" or (
                outcome == "expired" and "(ambiguous:" in detail))
            self.ambiguous += ambiguous
            got = self.received.get(mark, 0)
            if row is None:
                self.lost.append((mark, "no row in the delivery log"))
                continue
            status, error, _ = row
            if status not in FINAL:
                self.stuck.append((mark, status, history))
            elif status == "sent":
                self.sent += 1
                if got == 0:
                    self.lost.append((mark, "logged sent, never received"))
            else:
                self.failed += 1
                if not error or not error.strip():
                    self.unexplained.append((mark, "failed without a reason"))
                if got and not ambiguous:
                    self.unexplained_duplicates.append((mark, "failed, yet received", history))
            if any(not (detail or "").strip() for _, detail in history):
                self.unexplained.append((mark, "an attempt without a detail", history))
            if got > 1:
                self.duplicates += got - 1
                if got - 1 > ambiguous:
                    self.unexplained_duplicates.append((mark, got, history))
        # received, never accepted: only among this run's markers (other runs share providers)
        tags = {tag_of(m) for m in accepted}
        self.forged = [m for m in self.received
                       if m not in accepted and m and tag_of(m) in tags]
        self.tracebacks = relay.log(whole=True).count("Traceback")

    def report(self):
        f = torture.figures
        f["messages sent"] += len(self.accepted)
        f["messages delivered"] += self.sent
        f["messages failed (with a reason)"] += self.failed
        f["faults injected"] += self.faults
        f["messages lost"] += len(self.lost) + len(self.stuck)
        f["messages forged"] += len(self.forged)
        f["duplicates"] += self.duplicates
        f["ambiguous outcomes"] += self.ambiguous
        return self

    def check(self, expect=None):
        """Assert the guarantees; ``expect``: the one final status every message must have."""
        self.report()
        log_tail = self.relay.log()[-4000:]
        assert not self.lost, (self.lost, log_tail)
        assert not self.stuck, (self.stuck, log_tail)
        assert not self.unexplained, self.unexplained
        assert not self.unexplained_duplicates, self.unexplained_duplicates
        assert not self.forged, self.forged
        assert self.tracebacks == 0, log_tail
        if expect is not None:
            wrong = {m: self.rows[i] for m, i in self.accepted.items() if self.rows[i][0] != expect}
            assert not wrong, (wrong, {m: self.history[self.accepted[m]] for m in wrong})
        return self

    def details(self):
        return [d for h in self.history.values() for _, d in h]
