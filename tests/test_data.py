"""DATA codecs: the end of data, dot-stuffing, line ends, limits, and the way back out.

The reader is checked against a slow reference written straight from smtp.md,
byte by byte, on random and on exhaustive small inputs, under every chunking.
Then one test per SMTP smuggling variant, the errors, memory, and the encoder
round trip.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtprelay.dotstuff import OutboundEncoder
from smtprelay.replies import (
    BARE_NEWLINE_NOT_ALLOWED,
    MESSAGE_TOO_BIG,
    NUL_NOT_ALLOWED,
    Reply,
)
from smtprelay.replies import DATA_LINE_TOO_LONG as LINE_TOO_LONG
from smtprelay.smtp.data import DataReader, FeedResult

CR, LF = 13, 10


# --------------------------------------------------------------------------
# The reference: one byte at a time, the contract as written, nothing clever.
# --------------------------------------------------------------------------


# (content, done, rest, error, bare_seen), as reference_read and run_reader give it
ReadResult = tuple[bytes, bool, bytes, "Reply | None", bool]


def reference_read(data: bytes, max_line_length: int = 65536, max_size: int = 35_000_000,
                   bare_newlines: str = "normalize") -> ReadResult:
    """Return (content, done, rest, error, bare_seen) for the whole input at once.

    Lines end at CRLF, at a CR not followed by LF, and at an LF not preceded by
    CR. The end of data is a line "." ended by CRLF whose previous line ended by
    CRLF (or which is the first line). A line is produced once it has ended.
    """
    content = bytearray()
    error: Reply | None = None
    bare_seen = False
    raw = bytearray()  # the current line as sent
    after_crlf = True
    i = 0
    n = len(data)
    while i < n:
        b = data[i]
        if b == CR:
            if i + 1 == n:
                break  # a CR is a line end either way, but which kind waits for the next byte
            crlf = data[i + 1] == LF
            i += 2 if crlf else 1
        elif b == LF:
            crlf = False
            i += 1
        else:
            raw.append(b)
            i += 1
            if error is None:
                if b == 0:
                    error = NUL_NOT_ALLOWED
                elif len(raw) > max_line_length:
                    error = LINE_TOO_LONG
            continue
        # A line has ended.
        if crlf and after_crlf and raw == b".":
            return bytes(content), True, data[i:], error, bare_seen
        if error is None and not crlf:
            bare_seen = True
            if bare_newlines == "reject":
                error = BARE_NEWLINE_NOT_ALLOWED
        if error is None:
            if raw.startswith(b".") and len(raw) > 1:
                piece = raw[1:] + b"\r\n"
            else:
                piece = raw + b"\r\n"
            if len(content) + len(piece) > max_size:
                error = MESSAGE_TOO_BIG
            else:
                content += piece
        after_crlf = crlf
        raw = bytearray()
    return bytes(content), False, b"", error, bare_seen


def run_reader(chunks: list[bytes], **kw: Any) -> ReadResult:
    """Feed ``chunks`` to a DataReader the way a session would; same tuple as the reference.

    Checks the per-feed promises on the way: content stops after an error,
    ``size`` counts what was produced, nothing large is held back.
    """
    reader = DataReader(**kw)
    limit = reader.max_line_length
    out = []
    for index, chunk in enumerate(chunks):
        error_before = reader.error
        result = reader.feed(chunk)
        assert isinstance(result, FeedResult)
        if error_before is not None:
            assert result.content == b""
            assert reader.error == error_before  # the first error wins
        out.append(result.content)
        assert reader.size == sum(map(len, out))
        assert reader.buffered <= limit + 5
        if result.done:
            assert reader.done
            with pytest.raises(RuntimeError):
                reader.feed(b"x")
            rest = result.rest + b"".join(chunks[index + 1 :])
            return b"".join(out), True, rest, reader.error, reader.bare_newlines_seen
        assert result.rest == b""
    return b"".join(out), False, b"", reader.error, reader.bare_newlines_seen


def same(got: ReadResult, want: ReadResult) -> None:
    """Compare reader and reference; bare_seen is only exact while there is no error."""
    if want[3] is None:
        assert got == want
    else:
        assert got[:4] == want[:4]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# The bytes that matter to the parser, runs of text, and the odd random byte.
TOKENS = [b"\r", b"\n", b".", b"\x00", b"a", b" ", b"\r\n", b"\r\n.", b".\r\n", b"..",
          b"\r\n.\r\n", b"\n.\n"]
pieces = st.one_of(
    st.sampled_from(TOKENS),
    st.integers(1, 40).map(lambda n: b"a" * n),
    st.integers(1, 3).map(lambda n: b"\r" * n),
    st.binary(max_size=4),
)
raw_messages = st.lists(pieces, max_size=60).map(b"".join)
reader_configs = st.fixed_dictionaries(
    {
        "max_line_length": st.one_of(st.integers(1, 12), st.just(65536)),
        "max_size": st.one_of(st.integers(0, 80), st.just(35_000_000)),
        "bare_newlines": st.sampled_from(["normalize", "reject"]),
    }
)


def cuts_for(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(data)), max_size=12)


# --------------------------------------------------------------------------
# Reader against the reference.
# --------------------------------------------------------------------------


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(data=raw_messages, cfg=reader_configs, draw=st.data())
def test_reader_matches_reference_under_any_chunking(data: bytes, cfg: dict[str, Any],
                                                     draw: st.DataObject) -> None:
    want = reference_read(data, **cfg)
    chunks = split_at(data, draw.draw(cuts_for(data)))
    same(run_reader(chunks, **cfg), want)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=raw_messages, cfg=reader_configs)
def test_reader_whole_and_bytewise_agree_with_reference(data: bytes,
                                                        cfg: dict[str, Any]) -> None:
    want = reference_read(data, **cfg)
    same(run_reader([data], **cfg), want)
    same(run_reader(bytewise(data), **cfg), want)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=raw_messages, cfg=reader_configs, draw=st.data())
def test_chunking_never_changes_anything(data: bytes, cfg: dict[str, Any],
                                         draw: st.DataObject) -> None:
    one = run_reader(split_at(data, draw.draw(cuts_for(data))), **cfg)
    two = run_reader(split_at(data, draw.draw(cuts_for(data))), **cfg)
    assert one == two or (one[3] is not None and one[:4] == two[:4])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(body=raw_messages, after=st.binary(max_size=20), cfg=reader_configs, draw=st.data())
def test_pipelined_bytes_after_the_end_are_rest(body: bytes, after: bytes, cfg: dict[str, Any],
                                                draw: st.DataObject) -> None:
    data = body + b"\r\n.\r\n" + after
    want = reference_read(data, **cfg)
    assert want[1]
    got = run_reader(split_at(data, draw.draw(cuts_for(data))), **cfg)
    same(got, want)


ALPHABET = [b"\r", b"\n", b".", b"\x00", b"a"]


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"bare_newlines": "reject"},
        {"max_line_length": 2, "max_size": 9},
    ],
    ids=["normalize", "reject", "tight-limits"],
)
def test_reader_matches_reference_on_every_short_input(cfg: dict[str, Any]) -> None:
    """Every string of up to 6 bytes over the parser's alphabet, whole and byte by byte."""
    for length in range(7):
        for combo in itertools.product(ALPHABET, repeat=length):
            data = b"".join(combo)
            want = reference_read(data, **cfg)
            same(run_reader([data], **cfg), want)
            same(run_reader(bytewise(data), **cfg), want)
            ended = data + b"\r\n.\r\nX"
            same(run_reader([ended], **cfg), reference_read(ended, **cfg))


def test_reader_matches_reference_on_every_short_input_split_anywhere() -> None:
    """Every string of up to 6 bytes, split once at every position: state kept across feeds."""
    for length in range(2, 7):
        for combo in itertools.product(ALPHABET, repeat=length):
            data = b"".join(combo)
            want = reference_read(data)
            for p in range(1, length):
                same(run_reader([data[:p], data[p:]]), want)


# --------------------------------------------------------------------------
# Plain behaviour.
# --------------------------------------------------------------------------


def read_all(data: bytes, chunks: list[bytes] | None = None,
             **kw: Any) -> tuple[bytes, bool, bytes, Reply | None]:
    content, done, rest, error, _ = run_reader(chunks or [data], **kw)
    return content, done, rest, error


def test_simple_message_and_pipelined_command() -> None:
    data = b"Subject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n"
    assert read_all(data) == (b"Subject: hi\r\n\r\nhello\r\n", True, b"QUIT\r\n", None)


def test_empty_message() -> None:
    assert read_all(b".\r\nQUIT\r\n") == (b"", True, b"QUIT\r\n", None)


def test_one_empty_line() -> None:
    assert read_all(b"\r\n.\r\n") == (b"\r\n", True, b"", None)


def test_dot_stuffing_is_removed_once() -> None:
    data = b"..\r\n...\r\n.x\r\n..x\r\nx.\r\n.\r\n"
    assert read_all(data) == (b".\r\n..\r\nx\r\n.x\r\nx.\r\n", True, b"", None)


def test_dot_stuffed_first_line() -> None:
    assert read_all(b"..\r\n.\r\n")[0] == b".\r\n"
    assert read_all(b".a\r\n.\r\n")[0] == b"a\r\n"


def test_not_done_without_the_end() -> None:
    reader = DataReader()
    assert reader.feed(b"hello\r\nworld\r\n") == (b"hello\r\nworld\r\n", False, b"")
    assert reader.feed(b"partial") == (b"", False, b"")
    assert reader.feed(b" line\r\n.") == (b"partial line\r\n", False, b"")
    assert reader.feed(b"\r") == (b"", False, b"")
    assert reader.feed(b"\nNOOP") == (b"", True, b"NOOP")
    assert reader.error is None


def test_cr_at_a_chunk_end_waits_for_the_next_byte() -> None:
    reader = DataReader()
    assert reader.feed(b"a\r") == (b"", False, b"")
    assert reader.feed(b"\nb\r") == (b"a\r\n", False, b"")
    assert reader.feed(b"c\r\n.\r\n") == (b"b\r\nc\r\n", True, b"")
    assert reader.bare_newlines_seen


def test_bare_newlines_normalized() -> None:
    assert read_all(b"a\nb\rc\r\r\n\r\n.\r\n") == (b"a\r\nb\r\nc\r\n\r\n\r\n", True, b"", None)
    # After a bare LF, ".\r\n" is a line ".", not the end.
    assert read_all(b"a\n.\r\nb\r\n.\r\n") == (b"a\r\n.\r\nb\r\n", True, b"", None)


def test_bare_newlines_seen_flag() -> None:
    reader = DataReader()
    reader.feed(b"a\r\nb\r\n.\r\n")
    assert not reader.bare_newlines_seen
    reader = DataReader()
    reader.feed(b"a\nb\r\n.\r\n")
    assert reader.bare_newlines_seen


def test_accepts_memoryview_and_bytearray() -> None:
    reader = DataReader()
    assert reader.feed(bytearray(b"a\r\n")).content == b"a\r\n"
    assert reader.feed(memoryview(b".\r\nX")) == (b"", True, b"X")


def test_feed_after_done_raises() -> None:
    reader = DataReader()
    assert reader.feed(b".\r\n").done
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        DataReader(bare_newlines="ignore")
    with pytest.raises(ValueError):
        DataReader(max_line_length=0)
    with pytest.raises(ValueError):
        OutboundEncoder(max_line_length=1)


def test_error_str_is_the_reply() -> None:
    assert str(LINE_TOO_LONG) == "500 5.5.6 Line too long"
    assert Reply(552, "5.3.4", "Message size exceeds fixed limit") == MESSAGE_TOO_BIG


# --------------------------------------------------------------------------
# SMTP smuggling: one test per way of faking the end of data.
# --------------------------------------------------------------------------

HEAD = b"From: a@example.com\r\nSubject: hi\r\n\r\nbody"
SMUGGLED = (
    b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
    b"From: ceo@example.com\r\n\r\nwire the money"
)
AFTER = b"QUIT\r\n"


def assert_not_smuggled(variant: bytes, stored_as: bytes | None, head: bytes = HEAD,
                        error: Reply | None = None, bare: bool = True) -> None:
    """``head + variant + SMUGGLED + real end + AFTER``, split at every position.

    The variant must never end the data: the reader finishes exactly at the
    real end, ``rest`` is exactly AFTER, and in normalize mode the variant is
    stored as ``stored_as`` (when there is no ``error``).
    """
    data = head + variant + SMUGGLED + b"\r\n.\r\n" + AFTER
    end = len(data) - len(AFTER)
    want_content = head + (stored_as or b"") + SMUGGLED + b"\r\n" if error is None else None
    ref_content, ref_done, ref_rest, ref_error, _ = reference_read(data)
    assert (ref_done, ref_rest, ref_error) == (True, AFTER, error)
    if error is None:
        assert ref_content == want_content
    splits = [[data]] + [[data[:p], data[p:]] for p in range(1, len(data))] + [bytewise(data)]
    for chunks in splits:
        for mode in ("normalize", "reject"):
            reader = DataReader(bare_newlines=mode)
            content = []
            fed = 0
            for index, chunk in enumerate(chunks):
                result = reader.feed(chunk)
                fed += len(chunk)
                content.append(result.content)
                if result.done:
                    assert fed - len(result.rest) == end
                    assert result.rest + b"".join(chunks[index + 1 :]) == AFTER
                    break
                assert fed < end
            else:
                raise AssertionError("the real end of data was not found")
            if mode == "normalize":
                assert reader.error == error
                if error is None:
                    assert b"".join(content) == want_content
            else:
                assert reader.error == (error or (BARE_NEWLINE_NOT_ALLOWED if bare else None))


def test_smuggling_lf_dot_lf() -> None:
    assert_not_smuggled(b"\n.\n", b"\r\n.\r\n")


def test_smuggling_cr_dot_cr() -> None:
    assert_not_smuggled(b"\r.\r", b"\r\n.\r\n")


def test_smuggling_crlf_dot_lf() -> None:
    assert_not_smuggled(b"\r\n.\n", b"\r\n.\r\n")


def test_smuggling_lf_dot_crlf() -> None:
    assert_not_smuggled(b"\n.\r\n", b"\r\n.\r\n")


def test_smuggling_crlf_dot_cr() -> None:
    assert_not_smuggled(b"\r\n.\r", b"\r\n.\r\n")


def test_smuggling_cr_dot_lf() -> None:
    assert_not_smuggled(b"\r.\n", b"\r\n.\r\n")


def test_smuggling_lf_dot_cr() -> None:
    assert_not_smuggled(b"\n.\r", b"\r\n.\r\n")


def test_smuggling_cr_dot_crlf() -> None:
    assert_not_smuggled(b"\r.\r\n", b"\r\n.\r\n")


def test_smuggling_crlf_dot_cr_crlf() -> None:
    # ".\r" is a line "." ended by a bare CR; the CRLF after it is an empty line.
    assert_not_smuggled(b"\r\n.\r\r\n", b"\r\n.\r\n\r\n")


def test_smuggling_lf_dot_lf_at_start() -> None:
    assert_not_smuggled(b"\n.\n", b"\r\n.\r\n", head=b"")


def test_smuggling_dot_lf_at_start() -> None:
    assert_not_smuggled(b".\n", b".\r\n", head=b"")


def test_smuggling_dot_cr_at_start() -> None:
    assert_not_smuggled(b".\r", b".\r\n", head=b"")


def test_smuggling_lf_dot_crlf_at_start() -> None:
    assert_not_smuggled(b"\n.\r\n", b"\r\n.\r\n", head=b"")


def test_smuggling_crlf_nul_dot_crlf() -> None:
    assert_not_smuggled(b"\r\n\x00.\r\n", None, error=NUL_NOT_ALLOWED)


def test_smuggling_crlf_dot_nul_crlf() -> None:
    assert_not_smuggled(b"\r\n.\x00\r\n", None, error=NUL_NOT_ALLOWED)


def test_smuggling_crlf_dot_space_crlf() -> None:
    # ". " is a stuffed line " ", not an end.
    assert_not_smuggled(b"\r\n. \r\n", b"\r\n \r\n", bare=False)


def test_smuggling_crlf_dot_dot_crlf() -> None:
    # ".." is a stuffed ".", not an end.
    assert_not_smuggled(b"\r\n..\r\n", b"\r\n.\r\n", bare=False)


def test_smuggling_lf_lf_dot_lf_lf() -> None:
    assert_not_smuggled(b"\n\n.\n\n", b"\r\n\r\n.\r\n\r\n")


def test_smuggling_cr_cr_dot_cr_cr() -> None:
    assert_not_smuggled(b"\r\r.\r\r", b"\r\n\r\n.\r\n\r\n")


def test_real_end_after_a_bare_cr_still_ends() -> None:
    # "\r\r\n.\r\n" holds a real CRLF . CRLF: a bare CR before it changes nothing.
    data = b"a\r\r\n.\r\nQUIT\r\n"
    for p in range(len(data) + 1):
        assert read_all(data, split_at(data, [p])) == (b"a\r\n\r\n", True, b"QUIT\r\n", None)


def test_real_end_split_at_every_position_and_in_every_pair_of_positions() -> None:
    data = b"x\r\n.\r\nNOOP"
    for p, q in itertools.combinations_with_replacement(range(len(data) + 1), 2):
        assert read_all(data, split_at(data, [p, q])) == (b"x\r\n", True, b"NOOP", None)


# --------------------------------------------------------------------------
# Errors: the message is refused, the body is still read to the real end.
# --------------------------------------------------------------------------


def every_split(data: bytes, **kw: Any) -> tuple[bytes, bool, bytes, Reply | None]:
    """The same outcome whole, split at each position, and byte by byte."""
    results = {read_all(data, **kw)}
    results |= {read_all(data, split_at(data, [p]), **kw) for p in range(len(data) + 1)}
    results.add(read_all(data, bytewise(data), **kw))
    assert len(results) == 1
    return results.pop()


def test_nul_refused_and_body_read_to_the_end() -> None:
    data = b"ok\r\nbad\x00line\r\nmore\r\n.\r\nQUIT\r\n"
    assert every_split(data) == (b"ok\r\n", True, b"QUIT\r\n", NUL_NOT_ALLOWED)


def test_bare_lf_rejected_in_reject_mode() -> None:
    data = b"ok\r\nbare\nmore\r\n.\r\nQUIT\r\n"
    assert every_split(data, bare_newlines="reject") == (b"ok\r\n", True, b"QUIT\r\n",
                                                         BARE_NEWLINE_NOT_ALLOWED)


def test_bare_cr_rejected_in_reject_mode() -> None:
    data = b"ok\r\nbare\rmore\r\n.\r\nQUIT\r\n"
    assert every_split(data, bare_newlines="reject") == (b"ok\r\n", True, b"QUIT\r\n",
                                                         BARE_NEWLINE_NOT_ALLOWED)


def test_line_too_long_then_more_lines_then_the_real_end() -> None:
    data = b"ok\r\n" + b"x" * 100 + b"\r\nmore\r\n.lines\r\n.\r\nQUIT\r\nNOOP\r\n"
    assert every_split(data, max_line_length=50) == (b"ok\r\n", True, b"QUIT\r\nNOOP\r\n",
                                                     LINE_TOO_LONG)


def test_line_at_the_limit_is_accepted_one_more_is_not() -> None:
    limit = 64
    fits = b"y" * limit + b"\r\n.\r\n"
    assert every_split(fits, max_line_length=limit) == (b"y" * limit + b"\r\n", True, b"", None)
    over = b"y" * (limit + 1) + b"\r\n.\r\n"
    assert every_split(over, max_line_length=limit) == (b"", True, b"", LINE_TOO_LONG)


def test_the_limit_counts_the_line_as_sent_with_its_stuffing_dot() -> None:
    limit = 10
    assert read_all(b"." + b"y" * 9 + b"\r\n.\r\n", max_line_length=limit)[3] is None
    assert read_all(b"." + b"y" * 10 + b"\r\n.\r\n", max_line_length=limit)[3] == LINE_TOO_LONG


def test_lines_over_998_within_the_limit_are_kept_as_they_came() -> None:
    line = b"<td>" + b"h" * 5000 + b"</td>"
    data = b"Subject: html\r\n\r\n" + line + b"\r\n.\r\n"
    chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    assert read_all(data, chunks) == (b"Subject: html\r\n\r\n" + line + b"\r\n", True, b"", None)


def test_over_size_refused_at_the_line_that_crosses_the_limit() -> None:
    data = b"12345678\r\n12345678\r\n12345678\r\n.\r\nQUIT\r\n"
    assert every_split(data, max_size=30) == (b"12345678\r\n" * 3, True, b"QUIT\r\n", None)
    assert every_split(data, max_size=29) == (b"12345678\r\n" * 2, True, b"QUIT\r\n",
                                              MESSAGE_TOO_BIG)
    assert every_split(data, max_size=0) == (b"", True, b"QUIT\r\n", MESSAGE_TOO_BIG)


def test_over_size_big_message_in_chunks() -> None:
    line = b"z" * 78 + b"\r\n"
    data = line * 20_000 + b".\r\nQUIT\r\n"  # 1.6 MB
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    content, done, rest, error = read_all(data, chunks, max_size=1_000_000)
    assert (done, rest, error) == (True, b"QUIT\r\n", MESSAGE_TOO_BIG)
    assert content == line * (1_000_000 // len(line))


@pytest.mark.parametrize(
    "data, kw, error",
    [
        (b"a\x00" + b"b" * 20 + b"\r\n.\r\n", {"max_line_length": 10}, NUL_NOT_ALLOWED),
        (b"b" * 20 + b"\x00\r\n.\r\n", {"max_line_length": 10}, LINE_TOO_LONG),
        (b"a\nb\x00\r\n.\r\n", {"bare_newlines": "reject"}, BARE_NEWLINE_NOT_ALLOWED),
        (b"a\x00\nb\r\n.\r\n", {"bare_newlines": "reject"}, NUL_NOT_ALLOWED),
        (b"aaaa\r\nb\x00\r\n.\r\n", {"max_size": 3}, MESSAGE_TOO_BIG),
        (b"aa\r\n" + b"b" * 20 + b"\r\n.\r\n", {"max_size": 3, "max_line_length": 10},
         MESSAGE_TOO_BIG),
    ],
    ids=["nul-then-long", "long-then-nul", "bare-then-nul", "nul-then-bare", "size-then-nul",
         "size-then-long"],
)
def test_first_error_wins(data: bytes, kw: dict[str, Any], error: Reply) -> None:
    assert every_split(data, **kw)[3] == error


def test_memory_bound_with_a_20_mb_line() -> None:
    reader = DataReader()
    block = b"A" * 65536
    assert reader.feed(b"Subject: big\r\n\r\n").content == b"Subject: big\r\n\r\n"
    for _ in range(20 * 16):
        assert reader.feed(block) == (b"", False, b"")
        assert reader.buffered <= reader.max_line_length + 5
        assert len(reader._line) <= reader.max_line_length
    assert reader.error == LINE_TOO_LONG
    assert reader.buffered <= 5
    assert reader.feed(b"\r\nafter\r\n.\r\nQUIT\r\n") == (b"", True, b"QUIT\r\n")


def test_memory_bound_with_a_20_mb_line_in_one_feed() -> None:
    reader = DataReader()
    assert reader.feed(b"B" * 20_000_000) == (b"", False, b"")
    assert reader.error == LINE_TOO_LONG
    assert reader.buffered <= 5
    assert reader.feed(b"\r\n.\r\n").done


def test_memory_bound_with_a_20_mb_message_of_normal_lines() -> None:
    reader = DataReader()
    data = b"".join(b"line %07d of a long and boring message body\r\n" % i for i in range(1000))
    size = 0
    for _ in range(20_000_000 // len(data)):
        result = reader.feed(data[:30_001])
        result2 = reader.feed(data[30_001:])
        size += len(result.content) + len(result2.content)
        assert reader.buffered <= 200
    assert reader.feed(b".\r\n") == (b"", True, b"")
    assert size == reader.size == (20_000_000 // len(data)) * len(data)


def test_a_flood_of_bare_crs_is_normalized_in_bulk() -> None:
    # One line end per byte: the normalize path must not spend Python time per line.
    reader = DataReader()
    result = reader.feed(b"\r" * 2_000_000 + b"\n.\r\n")
    assert result.done
    assert reader.size == 2 * 2_000_000


# --------------------------------------------------------------------------
# The encoder, and the round trip through the reader.
# --------------------------------------------------------------------------


def model_lines(data: bytes) -> list[bytes]:
    """Lines as the contract reads them: CRLF, bare CR and bare LF all end one."""
    lines: list[bytes] = []
    cur = bytearray()
    i = 0
    while i < len(data):
        if data[i : i + 2] == b"\r\n":
            lines.append(bytes(cur))
            cur = bytearray()
            i += 2
        elif data[i] in (CR, LF):
            lines.append(bytes(cur))
            cur = bytearray()
            i += 1
        else:
            cur.append(data[i])
            i += 1
    if cur:
        lines.append(bytes(cur))
    return lines


def model_fold(line: bytes, limit: int) -> list[bytes]:
    """Postfix smtp_line_length_limit: the first ``limit`` octets, then " " + ``limit - 1``
    at a time."""
    if not limit or len(line) <= limit:
        return [line]
    parts = [line[:limit]]
    rest = line[limit:]
    while rest:
        parts.append(b" " + rest[: limit - 1])
        rest = rest[limit - 1 :]
    return parts


def model_wire_lines(data: bytes, limit: int) -> list[bytes]:
    return [part for line in model_lines(data) for part in model_fold(line, limit)]


def model_encode(data: bytes, limit: int) -> bytes:
    stuffed = [(b"." + line if line.startswith(b".") else line)
               for line in model_wire_lines(data, limit)]
    return b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"


def model_stored(data: bytes, limit: int) -> bytes:
    return b"".join(line + b"\r\n" for line in model_wire_lines(data, limit))


def encode(chunks: list[bytes], limit: int = 998) -> bytes:
    enc = OutboundEncoder(max_line_length=limit)
    return b"".join(enc.feed(chunk) for chunk in chunks) + enc.finish()


def assert_wire_is_sound(wire: bytes, limit: int) -> None:
    """Canonical CRLF, every line within the limit, one end of data, at the very end."""
    assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n")
    assert wire.endswith(b".\r\n")
    lines = wire.split(b"\r\n")[:-1]
    assert lines[-1] == b"."
    for line in lines[:-1]:
        assert line != b"."
        if line.startswith(b"."):
            assert line.startswith(b"..")
            line = line[1:]
        if limit:
            assert len(line) <= limit
    # The reader, and the reference, see the end at the last byte and nowhere earlier.
    _, done, rest, _, _ = reference_read(wire)
    assert (done, rest) == (True, b"")
    assert wire.find(b"\r\n.\r\n") in (-1, len(wire) - 5)


content_pieces = st.one_of(
    st.sampled_from([b"\r\n", b".", b"..", b"\r\n.", b"\r\n.\r\n", b"a", b" ", b"\r", b"\n",
                     b"\x00"]),
    st.integers(1, 30).map(lambda n: b"x" * n),
    st.binary(max_size=3),
)
contents = st.lists(content_pieces, max_size=50).map(b"".join)
canonical_contents = st.lists(
    st.one_of(st.sampled_from([b"", b".", b"..", b".x", b" ", b"x."]),
              st.integers(1, 12).map(lambda n: b"y" * n)),
    max_size=30,
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(data=contents, limit=st.one_of(st.integers(2, 12), st.just(998), st.just(0)), draw=st.data())
def test_encoder_any_input_any_chunking(data: bytes, limit: int, draw: st.DataObject) -> None:
    chunks = split_at(data, draw.draw(cuts_for(data)))
    wire = encode(chunks, limit)
    assert wire == model_encode(data, limit)
    assert wire == encode([data], limit)
    assert_wire_is_sound(wire, limit)
    reader_chunks = split_at(wire, draw.draw(cuts_for(wire)))
    content, done, rest, error, _ = run_reader(reader_chunks, max_line_length=65536)
    assert (done, rest) == (True, b"")
    if b"\x00" in data:
        assert error == NUL_NOT_ALLOWED
    else:
        assert error is None
        assert content == model_stored(data, limit)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(data=canonical_contents, tail=st.sampled_from([b"", b"no line end", b"."]), draw=st.data())
def test_round_trip_is_exact_for_canonical_content(data: bytes, tail: bytes,
                                                   draw: st.DataObject) -> None:
    data += tail
    wire = encode(split_at(data, draw.draw(cuts_for(data))))
    content, done, rest, error, _ = run_reader(split_at(wire, draw.draw(cuts_for(wire))))
    assert (done, rest, error) == (True, b"", None)
    assert content == (data + b"\r\n" if tail else data)


def test_encoder_dot_at_every_chunk_boundary() -> None:
    data = b".\r\n.a\r\n..\r\n.\r\nx\r\n.\r\n"
    want = b"..\r\n..a\r\n...\r\n..\r\nx\r\n..\r\n.\r\n"
    for p, q in itertools.combinations_with_replacement(range(len(data) + 1), 2):
        assert encode(split_at(data, [p, q])) == want


def test_encoder_empty_message() -> None:
    assert encode([]) == b".\r\n"
    assert encode([b""]) == b".\r\n"
    assert run_reader([b".\r\n"])[:3] == (b"", True, b"")


def test_encoder_adds_a_line_end_only_when_missing() -> None:
    assert encode([b"a\r\n"]) == b"a\r\n.\r\n"
    assert encode([b"a"]) == b"a\r\n.\r\n"


def test_encoder_cr_at_a_chunk_end() -> None:
    assert encode([b"a\r", b"\nb"]) == b"a\r\nb\r\n.\r\n"
    assert encode([b"a\r", b"b"]) == b"a\r\nb\r\n.\r\n"
    assert encode([b"a\r", b"", b"\n.b"]) == b"a\r\n..b\r\n.\r\n"
    assert encode([b"a\r"]) == b"a\r\n.\r\n"


def test_encoder_bare_line_ends_become_crlf() -> None:
    assert encode([b"a\nb\rc\r\n\n.\r"]) == b"a\r\nb\r\nc\r\n\r\n..\r\n.\r\n"


def test_encoder_folds_like_postfix() -> None:
    assert encode([b"x" * 998 + b"\r\n"]) == b"x" * 998 + b"\r\n.\r\n"
    assert encode([b"x" * 999 + b"\r\n"]) == b"x" * 998 + b"\r\n x\r\n.\r\n"
    assert encode([b"x" * (998 + 997) + b"\r\n"]) == (b"x" * 998 + b"\r\n " + b"x" * 997
                                                     + b"\r\n.\r\n")
    assert encode([b"x" * (998 + 998)]) == b"x" * 998 + b"\r\n " + b"x" * 997 + b"\r\n x\r\n.\r\n"


def test_encoder_fold_decision_waits_for_the_next_chunk() -> None:
    assert encode([b"x" * 998, b"\r\n"]) == b"x" * 998 + b"\r\n.\r\n"
    assert encode([b"x" * 998, b"y"]) == b"x" * 998 + b"\r\n y\r\n.\r\n"
    assert encode([b"x" * 998]) == b"x" * 998 + b"\r\n.\r\n"


def test_encoder_does_not_count_the_stuffing_dot() -> None:
    # RFC 5321 4.5.3.1.6: the limit does not count the dot added for transparency.
    line = b"." + b"x" * 997
    assert encode([line + b"\r\n"]) == b"." + line + b"\r\n.\r\n"


def test_encoder_continuation_lines_are_never_stuffed_or_an_end() -> None:
    line = b"x" * 998 + b"." + b"y" * 3
    assert encode([line]) == b"x" * 998 + b"\r\n .yyy\r\n.\r\n"


def test_encoder_feed_after_finish_raises() -> None:
    enc = OutboundEncoder()
    enc.finish()
    with pytest.raises(RuntimeError):
        enc.feed(b"x")
    with pytest.raises(RuntimeError):
        enc.finish()


def _block(first_line: bytes, size: int = 16384) -> bytes:
    """``size`` bytes of CRLF lines starting with ``first_line``."""
    out = [first_line + b"\r\n"]
    remaining = size - len(out[0])
    while remaining >= 80:
        out.append(b"y" * 76 + b"\r\n")
        remaining -= 78
    out.append(b"z" * (remaining - 2) + b"\r\n")
    block = b"".join(out)
    assert len(block) == size
    return block


def test_multi_megabyte_message_with_dots_at_every_16k_boundary() -> None:
    firsts = [b".", b"..", b".x", b". starts with a dot", b"...\r\n."]
    message = b"".join(_block(firsts[i % len(firsts)]) for i in range(256))  # 4 MiB
    assert all(message[i] == ord(".") for i in range(0, len(message), 16384))
    # Fed as Twisted's sender reads a file: 16 KiB at a time, each starting with ".".
    enc = OutboundEncoder()
    wire = b"".join(enc.feed(message[i : i + 16384])
                    for i in range(0, len(message), 16384)) + enc.finish()
    assert wire == b"." + message.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")
    for size in (16384, 65536, 8191, 16385, 997):
        reader = DataReader()
        content = []
        for i in range(0, len(wire), size):
            result = reader.feed(wire[i : i + size])
            content.append(result.content)
            assert result.done == (i + size >= len(wire))
        assert (result.rest, reader.error) == (b"", None)
        assert b"".join(content) == message
