"""Sender patterns, the sender decision and network rules: pure functions."""

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtprelay.policy import (
    SenderPatterns,
    SenderPolicy,
    Verdict,
    decide_sender,
    is_loopback,
    is_mailbox,
    network_allowed,
)


def patterns(*texts):
    return SenderPatterns.parse(texts)


@pytest.mark.parametrize("pattern,address,expected", [
    ("noreply@company.com", "noreply@company.com", True),
    ("noreply@company.com", "NoReply@Company.COM", True),
    ("noreply@company.com", "other@company.com", False),
    ("@company.com", "anyone@company.com", True),
    ("@company.com", "anyone@sub.company.com", False),
    ("*@company.com", "anyone@company.com", True),
    ("*@company.com", "anyone@evilcompany.com", False),
    ("*.company.com", "x@eu.company.com", True),
    ("*.company.com", "x@a.b.company.com", True),
    ("*.company.com", "x@company.com", False),
    ("*.company.com", "x@evil-company.com", False),
    ("*.company.com", "x@company.com.evil.org", False),
    ("*", "whoever@wherever.example", True),
])
def test_patterns(pattern, address, expected):
    assert patterns(pattern).matches(address) is expected


@pytest.mark.parametrize("bad", ["company.com", "@", "*@", "*.", "a b@c.d", "*@*.x.com", ""])
def test_bad_patterns_are_refused(bad):
    with pytest.raises(ValueError):
        SenderPatterns.parse([bad])


def test_policy_default_is_always_allowed_and_empty_means_only_default():
    p = SenderPolicy("relay@company.com", patterns())
    assert p.allows("Relay@Company.com")
    assert not p.allows("other@company.com")
    assert SenderPolicy("", patterns()).unrestricted
    assert SenderPolicy("", patterns()).allows("anyone@anywhere.example")


def test_decide_sender():
    relay = SenderPolicy("relay@company.com", patterns("@company.com"))
    assert decide_sender("a@company.com", relay, "reject").verdict is Verdict.ACCEPT
    d = decide_sender("a@other.com", relay, "reject")
    assert d.verdict is Verdict.REJECT
    d = decide_sender("a@other.com", relay, "rewrite")
    assert (d.verdict, d.address) == (Verdict.REWRITE, "relay@company.com")
    # the null sender is sent as the default
    assert decide_sender("", relay, "reject").address == "relay@company.com"
    # a user's own list narrows the relay's
    user = patterns("scanner@company.com")
    assert decide_sender("scanner@company.com", relay, "reject", user).verdict is Verdict.ACCEPT
    assert decide_sender("boss@company.com", relay, "reject", user).verdict is Verdict.REJECT
    # ... and a user's list cannot widen it
    wide = patterns("*")
    assert decide_sender("a@other.com", relay, "reject", wide).verdict is Verdict.REJECT
    # rewrite only to a default the user may use
    assert decide_sender("boss@company.com", relay, "rewrite", user).verdict is Verdict.REJECT
    # the null sender goes out as the default: not for a user who may not send as it
    assert decide_sender("", relay, "reject", user).verdict is Verdict.REJECT
    assert decide_sender("", relay, "reject", patterns("relay@company.com")).address == \
        "relay@company.com"
    assert decide_sender("", SenderPolicy("", patterns()), "reject", user).verdict is \
        Verdict.ACCEPT  # no default: a true null sender, nobody impersonated


@given(st.emails())
def test_generated_addresses_are_mailboxes(address):
    if address.isascii():
        assert is_mailbox(address)


@pytest.mark.parametrize("bad", ["", "no-at-sign", "a@", "@b.c", "a b@c.d", "a@b c", "a@@b.c",
                                 "a\r\n@b.c", "a@b.c\x00", "<a@b.c>", "a@b..c"])
def test_not_mailboxes(bad):
    assert not is_mailbox(bad)


def test_networks():
    nets = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    assert network_allowed("10.1.2.3", nets)
    assert network_allowed("::ffff:10.1.2.3", nets)
    assert network_allowed("2001:db8::1", nets)
    assert not network_allowed("192.168.1.1", nets)
    assert not network_allowed("garbage", nets)
    assert network_allowed("192.168.1.1", ())
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.0.0.1")
