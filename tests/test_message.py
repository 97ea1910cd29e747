"""Header reading and the relay's only changes to a message: pure, bytes in and out."""

from hypothesis import given
from hypothesis import strategies as st

from smtprelay import message as msg

BLOCK = (b"From: \"Scanner 3\" <Scanner@Company.com>\r\n"
         b"To: a@example.com\r\n"
         b"Subject: =?iso-8859-1?q?R=E9sum=E9?= of\r\n the day\r\n"
         b"Message-ID: <abc@company.com>\r\n"
         b"\r\n")


def test_summarize():
    s = msg.summarize(BLOCK)
    assert s.from_addresses == ("scanner@company.com",)
    assert s.subject == "Résumé of the day"
    assert s.message_id == "<abc@company.com>"
    assert not s.has_reply_to and not s.from_parse_error


def test_summarize_8bit_and_broken():
    s = msg.summarize(b"From: J\xe9r\xf4me <j@x.org>\r\nSubject: caf\xc3\xa9\r\n\r\n")
    assert s.from_addresses == ("j@x.org",)
    assert s.subject == "café"
    assert msg.summarize(b"From: not an address\r\n\r\n").from_parse_error
    assert msg.summarize(b"no headers at all\r\n").from_addresses == ()
    assert msg.summarize(b"").subject == ""


def test_rewrite_from_keeps_the_original_as_reply_to():
    out = msg.rewrite_from(BLOCK, "relay@company.com")
    assert out.count(b"From:") == 1
    assert b"From: relay@company.com\r\n" in out
    assert b'Reply-To: "Scanner 3" <Scanner@Company.com>\r\n' in out
    assert out.endswith(b"\r\n\r\n")
    assert b"Subject: =?iso-8859-1?q?R=E9sum=E9?= of\r\n the day\r\n" in out
    s = msg.summarize(out)
    assert s.from_addresses == ("relay@company.com",) and s.has_reply_to


def test_rewrite_from_keeps_an_existing_reply_to_and_folded_from():
    block = b"From: a@x.org,\r\n b@x.org\r\nReply-To: c@x.org\r\n\r\n"
    out = msg.rewrite_from(block, "relay@company.com")
    assert out == b"Reply-To: c@x.org\r\nFrom: relay@company.com\r\n\r\n"


@given(st.binary(max_size=300))
def test_header_parsing_never_raises(data):
    msg.summarize(data)
    msg.rewrite_from(data + b"\r\n\r\n", "a@b.c")


def test_received_header():
    h = msg.received_header(b"scanner\r\nX-Evil: 1", "10.0.0.5", "relay.test", "ID1", "ESMTPSA", 0)
    assert h.startswith(b"Received: from scannerX-Evil:1 ([10.0.0.5])\r\n"
                        b"\tby relay.test (smtprelay) with ESMTPSA id ID1;\r\n\t")
    assert h.endswith(b"GMT\r\n")
    assert b"for " not in h  # a "for" clause would show Bcc recipients
    assert msg.smtp_protocol(True, True, True) == "ESMTPSA"
    assert msg.smtp_protocol(False, False, False) == "SMTP"
