"""Dot-stuffing and line discipline for sending a message body over SMTP: pure, no I/O.

This module owns what a stored message becomes on the wire after an upstream
server's ``354``: ``OutboundEncoder`` gives canonical CRLF, dot-stuffing line
by line, lines over 998 octets folded as Postfix's ``smtp_line_length_limit``
does, and exactly one end of data, at the end.  It belongs to neither side of
the relay: the SMTP provider sends with it, and the receiving side's
``smtprelay.smtp.data.DataReader`` shares its line-length scan
(:func:`has_long_line`) and byte constants.
"""

from __future__ import annotations

CR = 0x0D
LF = 0x0A
DOT = 0x2E


def has_long_line(text: bytes, end: int, limit: int, sep_len: int, used: int = 0) -> bool:
    """True if a line in ``text[:end]`` is longer than ``limit`` octets.

    ``text[:end]`` must be whole lines, each ending in ``\\n`` (``sep_len`` 1)
    or ``\\r\\n`` (``sep_len`` 2) with no other CR or LF in them; the first
    line already has ``used`` octets before it. Rather than splitting into
    lines, jump to the last line end within reach of each line start: a run
    of short lines costs one C-level ``rfind`` per ``limit`` octets.
    """
    p = 0
    room = limit - used
    while end - p > room + sep_len:
        q = text.rfind(b"\n", p, p + room + sep_len)
        if q < 0:
            return True
        p = q + 1
        room = limit
    return False


class OutboundEncoder:
    """Client side of DATA: from a stored message to the bytes after ``354``.

    Any input (canonical CRLF or not, any chunking) gives CRLF lines,
    dot-stuffed line by line, no wire line over ``max_line_length`` octets
    (RFC 5321 does not count the stuffing dot, nor does Postfix), and exactly
    one end of data: the one ``finish()`` writes. Twisted's own sender
    dot-stuffs each chunk on its own and so misses a "." at a chunk start.
    """

    def __init__(self, max_line_length: int = 998) -> None:
        if max_line_length == 1 or max_line_length < 0:
            # A continuation line holds its leading space: it needs room for one more octet.
            raise ValueError("max_line_length must be 0 (no folding) or at least 2")
        self.max_line_length = max_line_length
        # Octets on the wire line being written, not counting a stuffing dot;
        # 0 means at a line start.
        self._used = 0
        # A chunk ended in CR, already written as CRLF: an LF next is its other half.
        self._skip_lf = False
        self._finished = False

    def feed(self, chunk: bytes | bytearray | memoryview) -> bytes:
        """Wire bytes for ``chunk``."""
        if self._finished:
            raise RuntimeError("OutboundEncoder.feed() called after finish()")
        if not isinstance(chunk, bytes):
            chunk = bytes(chunk)
        if not chunk:
            return b""
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == LF:
                chunk = chunk[1:]
                if not chunk:
                    return b""
        ncrlf = chunk.count(b"\r\n")
        if chunk.count(b"\r") != ncrlf or chunk.count(b"\n") != ncrlf:
            # A CR at the end may be half a CRLF: write CRLF now and drop the LF if it comes.
            self._skip_lf = chunk[-1] == CR
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        k = chunk.rfind(b"\r\n")
        limit = self.max_line_length
        if limit and self._too_long(chunk, k, limit):
            return self._fold(chunk)
        wire = chunk.replace(b"\r\n.", b"\r\n..")
        if self._used == 0 and chunk[0] == DOT:
            wire = b"." + wire
        self._used = self._used + len(chunk) if k < 0 else len(chunk) - k - 2
        return wire

    def _too_long(self, chunk: bytes, k: int, limit: int) -> bool:
        """Whether ``chunk`` (CRLF-canonical, its last CRLF at ``k``) needs folding."""
        if k < 0:
            return self._used + len(chunk) > limit
        return len(chunk) - k - 2 > limit or has_long_line(chunk, k + 2, limit, 2, self._used)

    def _fold(self, chunk: bytes) -> bytes:
        """Line by line for chunks with an over-long line (CRLF-canonical input)."""
        out: list[bytes] = []
        limit = self.max_line_length
        for i, seg in enumerate(chunk.split(b"\r\n")):
            if i:
                out.append(b"\r\n")
                self._used = 0
            if not seg:
                continue
            if self._used == 0 and seg[0] == DOT:
                out.append(b".")
            pos = 0
            while pos < len(seg):
                if self._used == limit:
                    # Postfix folds only when more of the line follows, so a line
                    # of exactly the limit goes out whole.
                    out.append(b"\r\n ")
                    self._used = 1
                take = min(limit - self._used, len(seg) - pos)
                out.append(seg[pos : pos + take])
                self._used += take
                pos += take
        return b"".join(out)

    def finish(self) -> bytes:
        """The last wire bytes: a line end if the message lacked one, then the end of data."""
        if self._finished:
            raise RuntimeError("OutboundEncoder.finish() called twice")
        self._finished = True
        # At a line start (including an empty message) ".\r\n" follows the
        # CRLF that ended the previous line, or the CRLF of the DATA command.
        return b"\r\n.\r\n" if self._used else b".\r\n"
