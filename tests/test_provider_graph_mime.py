"""The pure planning of the Microsoft 365 provider (m365.mime) and its credential helpers.

Size arithmetic against the real base64; rule 1 (the envelope decides) as a
property over arbitrary envelopes and headers; the streaming MIME scanner
against Python's email parser over generated messages (offsets, decoded
attachments, parts taken out); the plans for every size; the expiry words.
"""

import base64
import datetime
import email
import email.policy
import io
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtprelay import recipients as rcp
from smtprelay.providers.m365 import credentials as cred
from smtprelay.providers.m365 import mime as gm
from tests.graph_support import MIB, build_message, sized_message

# ---------------------------------------------------------------- sizes


@given(st.integers(0, 10_000))
def test_base64_size_is_exact(n):
    assert gm.base64_size(n) == len(base64.b64encode(b"\0" * n))


def test_the_sendmail_limit():
    assert gm.largest_fitting() == 3 * MIB
    assert gm.fits(3 * MIB) and not gm.fits(3 * MIB + 1)
    assert gm.base64_size(3 * MIB) == gm.REQUEST_LIMIT
    assert gm.UPLOAD_CHUNK % gm.CHUNK_UNIT == 0
    assert gm.UPLOAD_CHUNK <= gm.REQUEST_LIMIT < gm.UPLOAD_CHUNK + gm.CHUNK_UNIT


@given(st.integers(0, 50 * MIB), st.integers(1, 8 * MIB))
def test_fits_is_the_largest_raw_size(n, limit):
    assert gm.fits(n, limit) == (n <= gm.largest_fitting(limit))


@given(st.binary(max_size=300))
def test_base64_decoded_size(data):
    text = base64.b64encode(data).rstrip(b"=")
    assert gm.base64_decoded_size(len(text)) == len(data)


# ---------------------------------------------------------------- rule 1

ADDRESSES = st.sampled_from([f"{n}@example.{d}" for n in "abcdefg" for d in ("com", "org")])


def cased(address, upper):
    return address.upper() if upper else address


@given(envelope=st.lists(ADDRESSES, min_size=1, max_size=6, unique=True),
       to=st.lists(ADDRESSES, max_size=4), cc=st.lists(ADDRESSES, max_size=3),
       bcc=st.lists(ADDRESSES, max_size=3), upper=st.booleans())
def test_the_envelope_decides_who_receives(envelope, to, cc, bcc, upper):
    headers = rcp.HeaderRecipients(tuple(rcp.Address(cased(a, upper)) for a in to),
                                   tuple(rcp.Address(a) for a in cc),
                                   tuple(rcp.Address(a) for a in bcc))
    plan = rcp.plan_recipients(envelope, headers)
    wanted = {a.lower() for a in envelope}
    named = {a.address.lower() for a in headers.to + headers.cc + headers.bcc}
    # the explicit form delivers to exactly the envelope, each once
    explicit = [a.address.lower() for a in plan.to + plan.cc + plan.bcc]
    assert sorted(explicit) == sorted(wanted)
    # visible recipients are only header ones; the others are in Bcc
    assert {a.address.lower() for a in plan.to + plan.cc} <= named
    assert set(a.lower() for a in plan.dropped) == named - wanted
    assert plan.explicit == bool(named - wanted)
    if not plan.explicit:
        # the MIME form: Graph takes the headers plus the added Bcc
        assert named | {a.lower() for a in plan.add_bcc} == wanted
        assert not named & {a.lower() for a in plan.add_bcc}


def test_header_recipients_as_graph_reads_them():
    block = (b"To: Ann <ann@example.com>, \"Doe, John\" <j@example.com>\r\n"
             b"To: second@example.com\r\n"
             b"Cc: =?utf-8?q?J=C3=BCrgen?= <jurgen@example.com>,\r\n team: x@example.com;\r\n"
             b"Bcc: undisclosed-recipients:;\r\n\r\n")
    found = gm.header_recipients(block)
    assert [(a.address, a.name) for a in found.to] == [
        ("ann@example.com", "Ann"), ("j@example.com", "Doe, John"), ("second@example.com", "")]
    assert [(a.address, a.name) for a in found.cc] == [
        ("jurgen@example.com", "Jürgen"), ("x@example.com", "")]
    assert found.bcc == ()


def test_recipient_resources():
    plan = rcp.plan_recipients(["a@x.com", "B@x.com"], rcp.HeaderRecipients(
        (rcp.Address("a@x.com", "Ann"), rcp.Address("c@x.com")), (), ()))
    assert gm.recipients_patch(plan) == {
        "toRecipients": [{"emailAddress": {"address": "a@x.com", "name": "Ann"}}],
        "ccRecipients": [],
        "bccRecipients": [{"emailAddress": {"address": "B@x.com"}}],
    }
    assert plan.dropped == ("c@x.com",) and plan.explicit and plan.differ


def test_bcc_header():
    assert gm.bcc_header([]) == b""
    assert gm.bcc_header(["a@x.com", "b@y.org"]) == b"Bcc: a@x.com,\r\n b@y.org\r\n"


# ---------------------------------------------------------------- the scanner

PAYLOADS = st.binary(min_size=0, max_size=3000)


@st.composite
def messages(draw):
    """(raw, [leaf payloads in document order]) of a generated multipart message."""
    text = draw(st.text(st.characters(min_codepoint=32, max_codepoint=0x24F), max_size=300))
    html = draw(st.none() | st.just("<p>hello <img src=\"cid:i0\"></p>"))
    inline = draw(st.lists(PAYLOADS, max_size=2)) if html else []
    attachments = []
    for i in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["application/octet-stream", "application/pdf",
                                     "text/plain", "image/png"]))
        data = draw(PAYLOADS)
        if kind == "text/plain":
            data = draw(st.text(st.characters(min_codepoint=32, max_codepoint=0x17F),
                                max_size=500)).replace("\r", "").encode("utf-8")
        attachments.append((f"file {i}.bin", data, kind))
    raw = build_message(body=text + "\n", html=html,
                        inline=[(f"i{j}", data) for j, data in enumerate(inline)],
                        attachments=attachments)
    if draw(st.booleans()):
        raw = b"Received: from x ([127.0.0.1])\r\n\tby relay; Mon, 1 Jan 2024 00:00:00 +0000\r\n" \
              + raw
    return raw


def email_leaves(raw):
    parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
    return [p for p in parsed.walk() if not p.is_multipart()]


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_the_scanner_agrees_with_the_email_package(raw):
    f = io.BytesIO(raw)
    parts = gm.scan(f)
    gm.measure(f, parts)
    leaves = [p for p in parts if not p.multipart]
    expected = email_leaves(raw)
    assert [p.content_type for p in leaves] == [e.get_content_type() for e in expected]
    for p, e in zip(leaves, expected, strict=True):
        decoded = b"".join(gm.decoded_pieces(f, p))
        assert decoded == (e.get_payload(decode=True) or b""), p
        assert p.decoded_size == len(decoded)
        assert p.filename == e.get_filename()
    # every part can be taken out, and the rest still parses to the same leaves
    for leaf in leaves:
        if leaf.cut is None:
            continue
        rest = gm.read_segments(f, gm.skeleton_segments(parts, len(raw), [leaf.index]))
        left = email_leaves(rest)
        kept = [e for p, e in zip(leaves, expected, strict=True) if p is not leaf]
        if not kept or all(p is leaf for p in leaves if p.parent == leaf.parent):
            continue  # an emptied multipart got a placeholder text part
        assert [x.get_payload(decode=True) for x in left] == [
            x.get_payload(decode=True) for x in kept]


def test_chunks_are_exact():
    data = os.urandom(gm.UPLOAD_CHUNK * 2 + 12345)
    raw = build_message(attachments=[("a.bin", data, "application/octet-stream")])
    f = io.BytesIO(raw)
    parts = gm.scan(f)
    [leaf] = [p for p in parts if p.filename == "a.bin"]
    chunks = list(gm.decoded_chunks(f, leaf))
    assert [len(c) for c in chunks] == [gm.UPLOAD_CHUNK, gm.UPLOAD_CHUNK, 12345]
    assert b"".join(chunks) == data
    assert leaf.decoded_size == len(data) and leaf.b64_chars is not None


def test_quoted_printable_and_8bit_attachments():
    raw = (b"From: relay@contoso.com\r\nTo: a@x.com\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\npreamble\r\n--b1\r\n"
           b"Content-Type: text/plain\r\n\r\nbody\r\n--b1\r\n"
           b"Content-Type: text/csv; name=\"r.csv\"\r\nContent-Transfer-Encoding: "
           b"quoted-printable\r\nContent-Disposition: attachment; filename=\"r.csv\"\r\n\r\n"
           b"a=3Db,=C3=BC=\r\nsoft\r\nline2\r\n--b1\r\n"
           b"Content-Type: text/plain; name=\"n.txt\"\r\nContent-Transfer-Encoding: 8bit\r\n"
           b"Content-Disposition: attachment; filename*=utf-8''%C3%BCber.txt\r\n\r\n"
           b"\xc3\xbcber\r\n--b1--\r\nepilogue\r\n")
    f = io.BytesIO(raw)
    parts = gm.scan(f)
    gm.measure(f, parts)
    qp, eight = parts[2], parts[3]
    assert b"".join(gm.decoded_pieces(f, qp)) == "a=b,üsoft\r\nline2".encode()
    assert qp.decoded_size == len("a=b,üsoft\r\nline2".encode())
    assert (eight.filename, b"".join(gm.decoded_pieces(f, eight))) == ("über.txt",
                                                                    "über".encode())
    assert parts[0].body_end == len(raw)


def test_a_lone_delimiter_prefix_is_not_a_delimiter():
    raw = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: text/plain\r\n\r\n--bx not a delimiter\r\n-- b\r\n--b--\r\n")
    parts = gm.scan(io.BytesIO(raw))
    assert len(parts) == 2
    assert raw[parts[1].body_start:parts[1].body_end] == b"--bx not a delimiter\r\n-- b"


def test_an_unclosed_multipart_ends_at_the_end():
    raw = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\nQUJD\r\n")
    f = io.BytesIO(raw)
    parts = gm.scan(f)
    assert b"".join(gm.decoded_pieces(f, parts[1])) == b"ABC"
    assert parts[1].cut == (raw.index(b"--b"), len(raw))


def test_an_emptied_multipart_gets_a_placeholder():
    data = os.urandom(5000)
    raw = build_message(body="", attachments=[("a.bin", data, "application/octet-stream")])
    f = io.BytesIO(raw)
    parts = gm.scan(f)
    everything = [p.index for p in parts if not p.multipart]
    rest = gm.read_segments(f, gm.skeleton_segments(parts, len(raw), everything))
    parsed = email.message_from_bytes(rest)
    assert [p.get_content_type() for p in parsed.walk()] == ["multipart/mixed", "text/plain"]


# ---------------------------------------------------------------- plans


def plan(raw, envelope=("ann@example.com",), save=True, **kw):
    f = io.BytesIO(raw)
    result, payload = gm.prepare(f, envelope, save, **kw)
    return result, base64.b64decode(payload)


def test_a_small_message_is_one_sendmail_with_a_bcc_in_front():
    raw = build_message()
    p, mime = plan(raw, ("ann@example.com", "hidden@example.com"))
    assert (p.form, p.reasons) == ("mime", ())
    assert mime == b"Bcc: hidden@example.com\r\n" + raw
    assert p.mime_size == len(mime)


@pytest.mark.parametrize("envelope,save,reasons", [
    (("ann@example.com",), False, ("sent_items",)),
    (("other@example.com",), True, ("recipients",)),
    (("other@example.com",), False, ("sent_items", "recipients")),
])
def test_a_draft_when_sendmail_cannot_keep_the_rules(envelope, save, reasons):
    raw = build_message()
    p, mime = plan(raw, envelope, save)
    assert (p.form, p.reasons, mime, p.attachments) == ("draft", reasons, raw, ())


def test_the_size_boundary():
    assert plan(sized_message(3 * MIB))[0].form == "mime"
    with pytest.raises(gm.Unsendable, match="single MIME part"):
        plan(sized_message(3 * MIB + 1))
    # the added Bcc would not fit: a draft with the message as it is, recipients PATCHed
    p, mime = plan(sized_message(3 * MIB), ("ann@example.com", "b@example.com"))
    assert (p.form, p.reasons, len(mime)) == ("draft", ("size",), 3 * MIB)


def test_large_attachments_are_moved_largest_first():
    big, medium, small = os.urandom(5 * MIB), os.urandom(5 * MIB // 2), os.urandom(1000)
    raw = build_message(attachments=[("small", small, "application/pdf"),
                                     ("big", big, "application/pdf"),
                                     ("medium", medium, "application/pdf")])
    p, skeleton = plan(raw)
    assert p.form == "draft" and p.reasons == ("size",)
    assert [(a.name, a.upload, a.size) for a in p.attachments] == [
        ("big", True, len(big)), ("medium", False, len(medium))]
    assert gm.fits(len(skeleton)) and len(skeleton) == p.mime_size
    left = email_leaves(skeleton)
    assert [x.get_filename() for x in left] == [None, "small"]
    f = io.BytesIO(raw)
    [medium_attachment] = [a for a in p.attachments if not a.upload]
    body = gm.attachment_body(f, p.parts[medium_attachment.part], medium_attachment)
    assert len(body) == medium_attachment.json_size()
    resource = json.loads(body)
    assert resource["@odata.type"] == "#microsoft.graph.fileAttachment"
    assert base64.b64decode(resource["contentBytes"]) == medium


def test_move_all_takes_every_attachment_out():
    raw = build_message(attachments=[("a", b"x" * 100, "application/pdf")])
    p, skeleton = plan(raw, move_all=True)
    assert [a.name for a in p.attachments] == ["a"]
    assert [x.get_content_type() for x in email_leaves(skeleton)] == ["text/plain"]


def test_what_no_method_can_send():
    with pytest.raises(gm.Unsendable, match="too large for one Graph request"):
        plan(build_message(attachments=[("gap", os.urandom(3 * MIB - 30), "image/png")]))
    huge_text = build_message(body="x" * 70 + "\n" * 1, attachments=[
        ("a", os.urandom(4 * MIB), "application/pdf")], html="<p>" + "y" * (4 * MIB) + "</p>")
    with pytest.raises(gm.Unsendable, match="without its attachments"):
        plan(huge_text)


def test_attachment_names():
    part = gm.Part(0, 0, 0, content_type="image/png", content_id="logo@app")
    assert gm.attachment_name(part) == "logo.png"
    assert gm.attachment_name(gm.Part(0, 0, 0, content_type="message/rfc822")) == "message.eml"
    assert gm.attachment_name(gm.Part(0, 0, 0, content_type="x/unknown")) == "attachment.bin"


# ---------------------------------------------------------------- credentials (pure)

NOW = datetime.datetime(2027, 1, 10, 12, 0, tzinfo=datetime.UTC)


def secret(end, hint):
    return {"endDateTime": end, "hint": hint, "keyId": "k"}


def test_the_secret_is_found_by_its_hint():
    found = cred.pick_secret_expiry([secret("2027-06-30T10:00:00.1234567Z", "Q~x"),
                                     secret("2029-01-01T00:00:00Z", "abc")], "Q~x8.s", NOW)
    assert found == datetime.date(2027, 6, 30)


def test_several_secrets_without_a_matching_hint_give_the_latest_valid():
    found = cred.pick_secret_expiry([secret("2027-06-30T10:00:00Z", "aaa"),
                                     secret("2028-02-01T00:00:00Z", "bbb"),
                                     secret("2026-01-01T00:00:00Z", "ccc")], "zzz-s", NOW)
    assert found == datetime.date(2028, 2, 1)
    same_hint = cred.pick_secret_expiry([secret("2027-03-01T00:00:00Z", "Q~x"),
                                         secret("2027-09-01T00:00:00Z", "Q~x")], "Q~x", NOW)
    assert same_hint == datetime.date(2027, 9, 1)
    assert cred.pick_secret_expiry([], "x", NOW) is None
    assert cred.pick_secret_expiry([{"endDateTime": "garbage"}], "x", NOW) is None


def test_graph_dates():
    assert cred.parse_graph_date("2027-06-30T10:00:00.1234567Z") == datetime.datetime(
        2027, 6, 30, 10, 0, tzinfo=datetime.UTC)
    assert cred.parse_graph_date("2027-06-30T10:00:00+02:00").hour == 10
    assert cred.parse_graph_date("2027-06-30") is None
    assert cred.parse_graph_date(None) is None


@pytest.mark.parametrize("days,words", [
    (31, []),
    (30, ["the client secret expires in 30 days (2027-02-09)"]),
    (1, ["the client secret expires in 1 day (2027-01-11)"]),
    (0, ["the client secret expires today (2027-01-10)"]),
    (-1, ["the client secret expired on 2027-01-09: messages are deferred until it is "
          "renewed"]),
])
def test_expiry_warnings(days, words):
    today = NOW.date()
    expiry = cred.Expiry(today + datetime.timedelta(days=days), "configured", "client secret")
    assert cred.expiry_warnings(expiry, today, 30) == words
    note = cred.expired_note(expiry, today)
    assert (note is not None) == (days < 0)


def test_unknown_expiry_says_nothing():
    assert cred.expiry_warnings(cred.Expiry(None, "", "client secret"), NOW.date(), 30) == []
    assert cred.expired_note(None, NOW.date()) is None
