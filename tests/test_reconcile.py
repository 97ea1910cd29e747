"""Recipient headers reconciled with the envelope (smtprelay/recipients.py): pure, bytes in/out.

The oracle for "who would Gmail deliver to" is the fake's own reading of a message
(tests/fakes/gmail_message.py: To, Cc and Bcc through ``getaddresses``), so these
tests check the property that matters: after :func:`reconcile`, exactly the
envelope recipients receive the message, and nothing else in the block moved.
"""

import re
from email.utils import getaddresses

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from smtprelay import recipients as rc
from tests.fakes import gmail_message


def gmail_recipients(block):
    """Who Gmail delivers to: every address with an @ in To, Cc and Bcc (the fake's view)."""
    fields, _ = gmail_message.split_message(block)
    found = set()
    for name in ("To", "Cc", "Bcc"):
        values = gmail_message.header_values(fields, name)
        found.update(rc.normalize(a) for _, a in getaddresses(values) if "@" in a)
    return found


def non_recipient_fields(block):
    fields, rest = rc.split_fields(block)
    return [raw for name, raw in fields
            if name is None or name.lower() not in rc.RECIPIENT_FIELDS], rest


def run(block, envelope):
    result = rc.reconcile(block, envelope)
    assert gmail_recipients(result.block) == {rc.normalize(a) for a in envelope}
    assert non_recipient_fields(result.block) == non_recipient_fields(block)
    return result


def test_nothing_to_do_returns_the_same_bytes():
    block = (b"Received: from x\r\n\tby y; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
             b"From: Alice <alice@example.com>\r\n"
             b"To: Bob <bob@example.com>,\r\n \"Smith, Carol\" <carol@example.org> (CFO)\r\n"
             b"Cc: =?utf-8?q?J=C3=B6rg?= <joerg@example.de>\r\n"
             b"Subject: hi\r\n\r\n")
    result = rc.reconcile(block, ["bob@example.com", "CAROL@example.org", "joerg@example.de"])
    assert result.block == block
    assert not result.changed and not result.visible_changed
    assert result.describe() == "unchanged"


def test_envelope_only_recipient_becomes_bcc_at_the_end_of_the_block():
    block = b"From: a@example.com\r\nTo: bob@example.com\r\nSubject: s\r\n\r\n"
    result = run(block, ["bob@example.com", "hidden@example.com"])
    assert result.block == (b"From: a@example.com\r\nTo: bob@example.com\r\nSubject: s\r\n"
                            b"Bcc: hidden@example.com\r\n\r\n")
    assert result.added_bcc == ("hidden@example.com",)
    assert not result.visible_changed and result.changed


def test_header_only_recipient_is_cut_keeping_the_rest_byte_identical():
    block = (b"To: Bob <bob@example.com>, Mallory <m@example.net> (not me),\r\n"
             b"\t\"Smith, Carol\" <carol@example.org>\r\n\r\n")
    result = run(block, ["bob@example.com", "carol@example.org"])
    assert result.block == (b"To: Bob <bob@example.com>,\r\n"
                            b"\t\"Smith, Carol\" <carol@example.org>\r\n\r\n")
    assert result.removed == (("To", "m@example.net"),)
    assert result.visible_changed
    assert result.describe() == "removed m@example.net from To"


def test_first_and_last_items_cut():
    block = b"To: a@example.com,\r\n b@example.com,\r\n c@example.com\r\n\r\n"
    assert run(block, ["b@example.com"]).block == b"To: b@example.com\r\n\r\n"
    assert run(block, ["a@example.com", "c@example.com"]).block == (
        b"To: a@example.com,\r\n c@example.com\r\n\r\n")
    assert run(block, ["c@example.com"]).block == b"To: c@example.com\r\n\r\n"
    assert run(block, ["a@example.com"]).block == b"To: a@example.com\r\n\r\n"


def test_a_field_left_empty_is_dropped_and_everyone_goes_to_bcc():
    block = b"To: x@example.net\r\nCc: y@example.net\r\nSubject: s\r\n\r\nbody\r\n"
    result = run(block, ["z@example.com"])
    assert result.block == b"Subject: s\r\nBcc: z@example.com\r\n\r\nbody\r\n"
    assert result.dropped == ("To", "Cc")
    assert result.visible_changed


def test_bcc_field_outsiders_removed_invisibly():
    block = b"To: a@example.com\r\nBcc: b@example.com, spy@example.net\r\n\r\n"
    result = run(block, ["a@example.com", "b@example.com"])
    assert result.block == b"To: a@example.com\r\nBcc: b@example.com\r\n\r\n"
    assert not result.visible_changed


def test_groups():
    block = b"To: Team: a@example.com, b@example.com; , c@example.com\r\n\r\n"
    assert run(block, ["b@example.com"]).block == b"To: Team: b@example.com;\r\n\r\n"
    assert run(block, ["c@example.com"]).block == b"To: Team:; , c@example.com\r\n\r\n"
    # an empty group stays: it names nobody
    block = b"To: undisclosed-recipients:;\r\n\r\n"
    result = run(block, ["a@example.com"])
    assert result.block == b"To: undisclosed-recipients:;\r\nBcc: a@example.com\r\n\r\n"
    assert not result.visible_changed


def test_not_an_address_is_removed():
    # legacy applications write this; Gmail would refuse the message ("Invalid To header")
    result = run(b"To: undisclosed-recipients\r\n\r\n", ["a@example.com"])
    assert result.block == b"Bcc: a@example.com\r\n\r\n"


def test_encoded_words_with_specials_stay_one_word():
    block = b"To: =?utf-8?q?M=C3=BCller,_Hans?= <h@example.com>, o@example.com\r\n\r\n"
    result = rc.reconcile(block, ["h@example.com"])
    assert result.block == b"To: =?utf-8?q?M=C3=BCller,_Hans?= <h@example.com>\r\n\r\n"
    assert result.removed == (("To", "o@example.com"),)


def test_eight_bit_and_comments_and_quotes():
    block = (b"To: J\xc3\xb6rg <j@example.com> (Vertrieb), \"a, b\" <ab@example.com>,\r\n"
             b" J\xf6rg-latin1 <l@example.com>, (comment only)\r\n\r\n")
    result = run(block, ["j@example.com", "l@example.com"])
    assert result.block == (b"To: J\xc3\xb6rg <j@example.com> (Vertrieb),\r\n"
                            b" J\xf6rg-latin1 <l@example.com>, (comment only)\r\n\r\n")


def test_quoted_local_part_case_and_idna_compare_equal():
    block = (b'To: "john.doe"@Example.COM, Joe <joe@xn--bcher-kva.example>\r\n\r\n')
    result = rc.reconcile(block, ["John.Doe@example.com", "joe@b\u00fccher.example"])
    assert result.block == block


def test_route_and_domain_literal():
    block = b"To: <@relay.example:a@example.com>, b@[192.0.2.1]\r\n\r\n"
    assert rc.reconcile(block, ["a@example.com", "b@[192.0.2.1]"]).block == block
    assert rc.reconcile(block, ["a@example.com"]).block == (
        b"To: <@relay.example:a@example.com>\r\n\r\n")


def test_missing_commas_are_not_guessed():
    # "a b" is no address list Gmail could read either: the field goes, the envelope stays
    result = run(b"To: a@example.com b@example.com\r\n\r\n", ["a@example.com"])
    assert result.block == b"Bcc: a@example.com\r\n\r\n"


def test_obsolete_space_before_colon_and_case_of_names():
    block = b"tO : x@example.net, a@example.com\r\nCC: y@example.net\r\n\r\n"
    result = rc.reconcile(block, ["a@example.com"])
    assert result.block == b"tO : a@example.com\r\n\r\n"
    assert result.dropped == ("CC",)


def test_no_blank_line_and_no_final_line_end():
    result = rc.reconcile(b"Subject: x\r\nTo: o@example.net", ["a@example.com"])
    assert result.block == b"Subject: x\r\nBcc: a@example.com\r\n"
    assert rc.reconcile(b"", ["a@example.com"]).block == b"Bcc: a@example.com\r\n"


def test_body_is_never_touched():
    body = b"\r\nTo: o@example.net\r\nCc: p@example.net\r\n"
    result = rc.reconcile(b"To: a@example.com" + b"\r\n" + body, ["a@example.com"])
    assert result.block.endswith(body)
    assert not result.changed


def test_whitespace_only_lines_are_not_left_behind():
    block = b"To: a@example.com,\r\n \r\n b@example.com\r\n\r\n"
    out = rc.reconcile(block, ["a@example.com"]).block
    assert not re.search(rb"\n[ \t]*\r\n", out.split(b"\r\n\r\n")[0] + b"\r\n"), out


def test_long_bcc_is_folded():
    many = [f"user{n:03d}@example.com" for n in range(40)]
    field = rc.bcc_field(many)
    assert all(len(line) <= 78 for line in field.split(b"\r\n"))
    assert [a for _, a in getaddresses([field[4:].decode()])] == many
    assert rc.bcc_field(["a@x.example"]) == b"Bcc: a@x.example\r\n"


def test_duplicates_and_repeated_fields():
    block = (b"To: a@example.com\r\nTo: a@example.com, o@example.net\r\n"
             b"Cc: A@EXAMPLE.COM\r\n\r\n")
    result = run(block, ["a@example.com", "A@example.com"])
    assert result.block == b"To: a@example.com\r\nTo: a@example.com\r\nCc: A@EXAMPLE.COM\r\n\r\n"


def test_parse_address_list_spans():
    value = b' Bob <b@x.example> (c), Team: m@x.example; ,"q, r"@x.example'
    items = rc.parse_address_list(value)
    assert [value[i.start:i.end] for i in items] == [
        b"Bob <b@x.example> (c)", b"Team: m@x.example;", b'"q, r"@x.example']
    assert rc.addresses_in(value) == [b"b@x.example", b"m@x.example", b'"q, r"@x.example']


# --- properties ---------------------------------------------------------------------------

LOCALS = ["alice", "bob", "carol", "o.brien", "x+tag", "Dave"]
DOMAINS = ["example.com", "example.org", "sub.example.net"]
POOL = [f"{local}@{domain}" for local in LOCALS for domain in DOMAINS]
NAMES = [b"", b"Alice Smith", b'"Smith, Alice"', b"=?utf-8?q?J=C3=B6rg?=",
         b"=?iso-8859-1?q?M=FCller,_H?=", b"J\xc3\xb6rg", b"J\xf6rg", b'"Quote \\" in"']
COMMENTS = [b"", b" (work)", b" (nested (comment))"]
SEPARATORS = [b", ", b",", b",\r\n ", b",\r\n\t", b" ,\r\n  "]


@st.composite
def mailbox(draw):
    address = draw(st.sampled_from(POOL)).encode()
    name = draw(st.sampled_from(NAMES))
    comment = draw(st.sampled_from(COMMENTS))
    form = draw(st.integers(0, 2))
    if form == 0 or not name:
        text = (b"<" + address + b">") if form == 2 else address
        return text + comment, address
    return name + b" <" + address + b">" + comment, address


@st.composite
def address_list(draw):
    items, addresses = [], []
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.integers(0, 6)) == 0:
            members = draw(st.lists(mailbox(), max_size=3))
            sep = draw(st.sampled_from(SEPARATORS))
            items.append(b"Group: " + sep.join(m for m, _ in members) + b";")
            addresses.extend(a for _, a in members)
        else:
            text, address = draw(mailbox())
            items.append(text)
            addresses.append(address)
    out = items[0]
    for item in items[1:]:
        out += draw(st.sampled_from(SEPARATORS)) + item
    return out, addresses


@st.composite
def header_block(draw):
    fields, addresses = [], []
    other = [b"Subject: =?utf-8?q?caf=C3=A9?= and\r\n a fold\r\n",
             b"X-Custom: 8-bit \xc3\xa9 \xff kept\r\n",
             b"Received: from a\r\n\tby b; Mon, 1 Jan 2024 00:00:00 +0000\r\n",
             b"From: Alice <alice@example.com>\r\n",
             b"Message-ID: <1@x.example>\r\n"]
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            name = draw(st.sampled_from([b"To", b"Cc", b"Bcc", b"to", b"CC"]))
            value, found = draw(address_list())
            fields.append(name + b": " + value + b"\r\n")
            addresses.extend(found)
        else:
            fields.append(draw(st.sampled_from(other)))
    return b"".join(fields) + b"\r\n", addresses


@settings(max_examples=300, deadline=None)
@given(header_block(), st.lists(st.sampled_from(POOL), max_size=6), st.data())
def test_exactly_the_envelope_receives(generated, extra, data):
    block, in_headers = generated
    keep = data.draw(st.lists(st.sampled_from(in_headers), max_size=len(in_headers))
                     if in_headers else st.just([]))
    envelope = [a.decode() for a in keep] + extra
    assume(envelope)
    result = rc.reconcile(block, envelope)
    # who receives: the envelope, no one else
    assert gmail_recipients(result.block) == {rc.normalize(a) for a in envelope}
    # every other field unchanged, in order; the blank line too
    assert non_recipient_fields(result.block) == non_recipient_fields(block)
    assert result.block.endswith(b"\r\n\r\n")
    # a second pass changes nothing
    assert rc.reconcile(result.block, envelope).block == result.block
    # what recipients see is only ever less than before, never rewritten: every kept
    # To/Cc field is the original with some addresses cut
    for _name, raw in rc.split_fields(result.block)[0]:
        assert b"\n \r\n" not in raw and b"\n\t\r\n" not in raw


@settings(max_examples=200, deadline=None)
@given(header_block())
def test_a_matching_envelope_changes_nothing(generated):
    block, in_headers = generated
    assume(in_headers)
    envelope = sorted({a.decode() for a in in_headers})
    assert rc.reconcile(block, envelope).block == block


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.lists(st.sampled_from(POOL), min_size=1, max_size=3))
@example(b"To: \"unclosed <a@example.com>\r\n\r\n", ["alice@example.com"])
@example(b"To: (unclosed comment a@example.com\r\n\r\n", ["alice@example.com"])
@example(b"To: <unclosed@example.com\r\n\r\n", ["alice@example.com"])
@example(b"Cc: [literal, x@example.com\r\n\r\n", ["alice@example.com"])
@example(b"To: a:b:c@example.com;;;,,,@,\r\n\r\n", ["alice@example.com"])
def test_any_bytes_never_raise_and_never_leak(data, envelope):
    block = b"".join(
        b"To: " + data + b"\r\n" if n == 0 else (b"Cc:" + data[::-1] + b"\r\n")
        for n in range(2)) + b"\r\n"
    for candidate in (data, block):
        result = rc.reconcile(candidate, envelope)
        assert gmail_recipients(result.block) == {rc.normalize(a) for a in envelope}
        # (a last line without its line end gets one before the added Bcc)
        fields, rest = non_recipient_fields(result.block)
        before, rest_before = non_recipient_fields(candidate)
        assert rest == rest_before
        assert fields[:-1] == before[:-1]
        assert [f.rstrip(b"\r\n") for f in fields[-1:]] == [
            f.rstrip(b"\r\n") for f in before[-1:]]
