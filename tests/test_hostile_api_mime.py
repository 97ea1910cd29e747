"""MIME fuzzing through the API providers (m365, gmail), end to end.

The generator of :mod:`tests.test_hostile_mime` (malformed multiparts, missing
boundaries, huge headers, broken encodings, 8-bit headers in legacy charsets)
plus recipient headers that disagree with the envelope in every way a header
can (groups, comments, unterminated quotes, encoded words, raw 8-bit, names
outside the envelope) and attachments with odd names and broken base64.
Each example goes in over SMTP to the real relay, which sends it to the Graph
or the Google fake, and the test waits for its end.  Either:

- it was delivered: the fake recorded it, to exactly the envelope's recipients
  (rule 1 of providers.md: nobody only in a header, nobody of the envelope left
  out), in one attempt; or
- it failed at once with a permanent reason (one attempt, ``permanent``);

never a crash, a traceback in the log, a temporary failure (the fakes are
healthy here: a retry of a malformed message would loop until max_age) or a
message left in the queue.
"""

import collections
import re
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests import torture
from tests.hostile import attempts, settle
from tests.mime_strategies import dot_stuff, line, mime_message
from tests.relay import RawSMTP, RelayProcess

pytestmark = [pytest.mark.slow, pytest.mark.torture]

EXAMPLES = torture.scale(25, 300)
POOL = ["ann@example.com", "Bob@Example.org", "carl@example.net"]

addresses = st.sampled_from(POOL + ["outsider@example.com", "boss@contoso.com"])
recipient_values = st.one_of(
    st.lists(addresses, min_size=1, max_size=3).map(lambda a: ", ".join(a).encode()),
    line(160),
    st.sampled_from([
        b"undisclosed-recipients:;", b"team: ann@example.com, outsider@example.com;",
        b'"Ann, the one" <ann@example.com>', b"ann@example.com (comment",
        b'"open <ann@example.com>',
        b"=?utf-8?b?w6lsw6huZQ==?= <carl@example.net>", b"\xe9l\xe8ne <carl@example.net>",
        b"<@relay.example:ann@example.com>", b"ann@example.com,,, ,", b"<>", b"@", b"a@b@c",
        b"Ann <ann@example.com>\r\n\t, Bob <bob@example.org>", b"ANN@EXAMPLE.COM",
    ]),
)
recipient_header = st.tuples(st.sampled_from([b"To", b"Cc", b"Bcc", b"to", b"CC", b"Resent-To"]),
                             recipient_values)
odd_names = st.sampled_from([
    b'"../../etc/passwd"', b'"C:\\\\temp\\\\x.doc"', b"\"" + b"n" * 300 + b".pdf\"", b'""',
    b"=?utf-8?b?0LfQsNGP0LLQutCwLnBkZg==?=", b'"\xe5\x90\x8d\xe5\x89\x8d.pdf"', b'"CON"',
    b"\"file.exe \"", b"*0=\"split\"; filename*1=\"-name.txt\"", b"noquotes with spaces.txt",
    b"\"a\\\"b.txt\"", b"\"\xff\xfe.bin\"", b"\"%00.txt\"",
])
broken_base64 = st.sampled_from([
    b"QUJD\r\nRE=", b"!!!not base64!!!", b"QUJDRA", b"====", b"", b"QU JD RA ==",
    b"QUJDRA==QUJDRA==", b"\xe9\xe8\xe7",
])


@st.composite
def api_message(draw, sender):
    body = draw(mime_message())
    # the generator's From and To: From becomes the sending mailbox, To is ours
    body = body.replace(b"From: fuzz@example.com\r\n", b"", 1)
    body = body.replace(b"To: someone@example.com\r\n", b"", 1)
    head = b"From: " + sender.encode() + b"\r\n"
    head += b"".join(name + b": " + value + b"\r\n"
                     for name, value in draw(st.lists(recipient_header, max_size=4)))
    attachments = b""
    if draw(st.booleans()):
        # odd attachments after the body (outside or inside its multipart: both happen)
        for _ in range(draw(st.integers(1, 3))):
            attachments += (b"--b1\r\nContent-Type: application/octet-stream; name="
                            + draw(odd_names) + b"\r\nContent-Disposition: attachment; filename="
                            + draw(odd_names) + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                            + draw(broken_base64) + b"\r\n")
        attachments += b"--b1--\r\n"
    envelope = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=3, unique=True))
    return head + body + attachments, envelope


def submit_raw(relay, sender, envelope, data):
    """Exact bytes over SMTP (smtplib would fix line ends); the relay's id."""
    with RawSMTP(relay.port, timeout=30) as c:
        assert c.reply().code == 220
        c.cmd("EHLO fuzz.test")
        assert c.cmd(f"MAIL FROM:<{sender}>").code == 250
        for r in envelope:
            assert c.cmd(f"RCPT TO:<{r}>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(dot_stuff(data) + b".\r\n")
        r = c.reply()
        assert r.code == 250, r
        return r.text.rsplit(" ", 1)[1]


def fuzz(relay, sender, delivered_to, tag):
    """Run the examples; ``delivered_to(marker)`` -> the recipients the fake recorded for
    the message whose envelope holds ``marker`` (or None)."""
    counts = {"sent": 0, "failed": 0}
    reasons = collections.Counter()

    # no shrinking: each example is a delivery through a relay (minutes for a shrink);
    # the failing example is printed as it was found
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              database=None, phases=[Phase.explicit, Phase.generate])
    @given(api_message(sender))
    def one(example):
        data, envelope = example
        n = sum(counts.values())
        mark = f"{tag}{n}-{time.monotonic_ns()}@example.com"
        envelope = envelope + [mark]
        relay_id = submit_raw(relay, sender, envelope, data)
        torture.figures["messages sent"] += 1
        row = settle(relay, [relay_id], 60)[relay_id]
        history = attempts(relay, relay_id)
        assert row is not None and row[0] in ("sent", "failed"), (row, history)
        assert "Traceback" not in relay.log(), relay.log()[-3000:]
        if row[0] == "sent":
            assert [o for o, _ in history] == ["sent"], history
            got = delivered_to(mark)
            assert got is not None, f"logged sent, not received: {history}"
            assert sorted(a.lower() for a in got) == sorted(a.lower() for a in envelope), \
                (got, envelope)
            torture.figures["messages delivered"] += 1
        else:
            # failed at once, for good, with a reason
            assert [o for o, _ in history] == ["permanent"], history
            assert history[0][1].strip() and row[1].strip(), history
            assert delivered_to(mark) is None
            torture.figures["messages failed (with a reason)"] += 1
            reasons[re.sub(r"request-id \S+", "request-id ...", history[0][1])[:160]] += 1
        counts[row[0]] += 1

    one()
    print(f"\n{tag}: {counts['sent']} delivered, {counts['failed']} failed permanently")
    for reason, n in reasons.most_common():
        print(f"  {n} x {reason}")
    return counts


# ------------------------------------------------------------------------------- m365

@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    from tests.graph_support import FakeGraphProcess

    fake = FakeGraphProcess(tmp_path_factory.mktemp("graph-ca"))
    fake.setup()
    yield fake
    fake.stop()


def test_mime_fuzz_through_m365(graph, tmp_path):
    from tests.graph_support import MAILBOX, relay_provider

    relay = RelayProcess(tmp_path / "relay", {"sender": {"default": MAILBOX, "allowed": ["*"]},
                                              "delivery": {"retry": ["1s"], "max_age": "20s"}})
    relay.config["provider"] = {**relay_provider(graph), "timeout": "10s",
                                "save_to_sent_items": True}
    relay.start()
    try:
        def delivered_to(mark):
            for m in graph.messages(content=False):
                if mark.lower() in [r.lower() for r in m["recipients"]]:
                    return m["recipients"]
            return None

        counts = fuzz(relay, MAILBOX, delivered_to, "m365-")
        assert counts["sent"] > 0
    finally:
        relay.stop()


# ------------------------------------------------------------------------------- gmail

@pytest.fixture(scope="module")
def google(tmp_path_factory, ca):
    from tests.gmail_support import FakeGoogleProcess

    fake = FakeGoogleProcess(ca.directory, tmp_path_factory.mktemp("google") / "fake.log")
    yield fake
    fake.stop()


def test_mime_fuzz_through_gmail(google, ca, tmp_path):
    from tests.fakes.google_accounts import GMAIL_SEND, ServiceAccountKey

    sender = "app@example.com"
    account = ServiceAccountKey.generate()
    google.control("POST", "reset")
    google.control("POST", "mailboxes", {"address": sender})
    google.control("POST", "service-accounts", account.registration({sender: [GMAIL_SEND]}))
    directory = tmp_path / "relay"
    directory.mkdir()
    relay = RelayProcess(directory, {"sender": {"default": sender, "allowed": ["*"]},
                                     "delivery": {"retry": ["1s"], "max_age": "20s"}})
    relay.config["provider"] = {
        "type": "gmail", "service_account_file": str(account.write(directory / "sa.json")),
        "token_uri": google.token_uri, "api_endpoint": google.url, "ca_file": str(ca.ca_path),
        "timeout": "10s"}
    relay.start()
    try:
        def delivered_to(mark):
            for m in google.messages(bodies=False):
                if mark.lower() in [r.lower() for r in m["recipients"]]:
                    return m["recipients"]
            return None

        counts = fuzz(relay, sender, delivered_to, "gmail-")
        assert counts["sent"] > 0
    finally:
        relay.stop()
