"""The bytes of an SMTP DATA phase as received: a pure streaming codec, no I/O.

This module owns where a received message body ends and what its bytes
become. ``DataReader`` (server side) is fed what a client sends after ``354``
in the chunks TCP happens to deliver, and yields the message as it will be
stored (CRLF line ends, dot-stuffing removed) until the end of data. The end
of data is ``CRLF . CRLF`` (or ``. CRLF`` as the very first line) and nothing
else, so no bare CR or LF trick can end a message early or start a second one
(SMTP smuggling). Bare line ends are normalised or rejected, NUL bytes,
over-long lines and over-size bodies are refused, and after a refusal the rest
is read and discarded, with bounded memory, up to the real end of data. (The
way back out, dot-stuffing for an upstream, is :mod:`smtprelay.dotstuff`.)

Content comes out line by line: a line is produced only once its line end has
been seen. That makes what ``DataReader`` produces (including how much was
produced before an error) a function of the bytes alone, never of how they
were chunked, and bounds what is held back to one partial line.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from smtprelay import replies

# module globals under the names the hot loops below were written with
from smtprelay.dotstuff import CR as _CR
from smtprelay.dotstuff import LF as _LF
from smtprelay.dotstuff import has_long_line as _has_long_line
from smtprelay.replies import Reply

_END = b"\r\n.\r\n"
# The bytes after which the careful path must stop and think.
_SPECIAL = re.compile(rb"[\r\n\x00]")




class FeedResult(NamedTuple):
    """What one ``DataReader.feed`` produced.

    ``content``: message bytes to store (empty once an error is set);
    ``done``: the end of data was in this chunk; ``rest``: the bytes after it
    (pipelined commands), empty unless ``done``.
    """

    content: bytes
    done: bool
    rest: bytes


def _unstuff(complete: bytes, bare: bool) -> bytes:
    """The stored form of ``complete``, whole lines that hold no NUL.

    ``bare``: the lines end in ``\\n`` (bare line ends already normalised),
    else in real CRLFs. One call per chunk, all C-level replaces.
    """
    if bare:
        # Unstuff every line start, but a line that is just "." keeps its
        # dot. NUL (absent, checked by the caller) marks line-start dots; those
        # followed by a line end are put back (twice: a run of "." lines
        # shares line ends, so one replace pass skips every other one).
        marked = (b"\n" + complete).replace(b"\n.", b"\n\x00")
        marked = marked.replace(b"\n\x00\n", b"\n.\n").replace(b"\n\x00\n", b"\n.\n")
        return marked.replace(b"\x00", b"").replace(b"\n", b"\r\n")[2:]
    # With only real CRLFs, a "." line after a CRLF would have been the
    # end of data; so every line start dot here is stuffing, except a
    # first line "." that follows a bare line end.
    content = complete.replace(b"\r\n.", b"\r\n")
    if complete[:1] == b"." and complete[:3] != b".\r\n":
        content = content[1:]
    return content


class DataReader:
    """Server side of DATA: from the bytes after ``354`` to the stored message.

    Feed every chunk the client sends, in order, until a result says ``done``;
    then ``rest`` holds the bytes that followed the end of data, and ``error``
    (a :class:`~smtprelay.replies.Reply` from the relay's table, or None) says
    whether the message must be refused.  Once an error is set, no more content
    is produced, but the reader still consumes the body up to the real end of data.
    """

    def __init__(self, max_line_length: int = 65536, max_size: int = 35_000_000,
                 bare_newlines: str = "normalize") -> None:
        if bare_newlines not in ("normalize", "reject"):
            raise ValueError("bare_newlines must be 'normalize' or 'reject', "
                             f"not {bare_newlines!r}")
        if max_line_length < 1:
            raise ValueError("max_line_length must be at least 1")
        if max_size < 0:
            raise ValueError("max_size must not be negative")
        self.max_line_length = max_line_length
        self.max_size = max_size
        self.bare_newlines = bare_newlines
        self._reject = bare_newlines == "reject"
        self.error: Reply | None = None
        self.size = 0
        # Exact while error is None; after an error, only what was looked at.
        self.bare_newlines_seen = False
        self.done = False
        # The last raw bytes seen, so that an end of data split across chunks is
        # found. It starts as a virtual CRLF so that ".\r\n" as the very first
        # line ends the data, as RFC 5321 wants.
        self._tail = b"\r\n"
        # The partial line (raw, dot and all), a CR whose meaning waits for the
        # next byte, and whether the last line ended in a real CRLF.
        self._line = bytearray()
        self._cr = False
        self._after_crlf = True

    @property
    def buffered(self) -> int:
        """How many bytes are held back waiting for the rest of their line."""
        return len(self._line) + self._cr + len(self._tail)

    def feed(self, chunk: bytes | bytearray | memoryview) -> FeedResult:
        """Consume one chunk; return a ``FeedResult``."""
        if self.done:
            raise RuntimeError("DataReader.feed() called after the end of data")
        if not isinstance(chunk, bytes):
            chunk = bytes(chunk)
        cut = self._find_end(chunk)
        if cut < 0:
            region, rest = chunk, b""
            self._tail = chunk[-4:] if len(chunk) >= 4 else (self._tail + chunk)[-4:]
        else:
            region, rest = chunk[:cut], chunk[cut:]
        content = b""
        if self.error is None and region:
            content = self._content(region, cut >= 0)
        if cut >= 0:
            self.done = True
            self._line = bytearray()
            self._cr = False
            self._tail = b""
        return FeedResult(content, cut >= 0, rest)

    def _find_end(self, chunk: bytes) -> int:
        """Offset just past the end of data in ``chunk``, or -1.

        Every CR followed by LF is a real CRLF, so the end of data is simply the
        first raw ``\\r\\n.\\r\\n`` in the stream (with the virtual CRLF in front):
        no line parsing, and the same answer after an error as before.
        """
        tail = self._tail
        # A match here can only start inside the tail: chunk[:4] is too short to hold one.
        m = (tail + chunk[:4]).find(_END)
        if m >= 0:
            return m + len(_END) - len(tail)
        m = chunk.find(_END)
        return m + len(_END) if m >= 0 else -1

    def _content(self, region: bytes, final: bool) -> bytes:
        """Content for ``region``; with ``final``, it ends with the terminating ``.\\r\\n``."""
        if not self._cr and b"\n" not in region and b"\r" not in region and b"\x00" not in region:
            # Middle of a long line: append without re-copying what is held.
            if len(self._line) + len(region) <= self.max_line_length:
                self._line += region
                return b""
            return self._careful(region)
        if self._line or self._cr:
            data = bytes(self._line) + (b"\r" if self._cr else b"") + region
        else:
            data = region
        content = self._bulk(data, final)
        if content is None:
            content = self._careful(region)
        return content

    def _fail(self, error: Reply) -> None:
        if self.error is None:
            self.error = error
        # Nothing held is needed any more: only the tail, to find the end.
        self._line = bytearray()
        self._cr = False

    def _bulk(self, data: bytes, final: bool) -> bytes | None:
        """Whole-chunk path built on C-level bytes operations; None if it cannot.

        ``data`` starts at a line start. It handles clean CRLF text and, in
        normalize mode, bare CR/LF; it gives up (to the careful path, without
        touching any state) on a NUL, a bare line end in reject mode or an
        over-long line, all of which end in an error anyway.
        """
        if b"\x00" in data:
            return None
        held_cr = False
        if final:
            body = data[:-3]  # the ".\r\n" that ends the data
        elif data[-1] == _CR:
            body = data[:-1]
            held_cr = True
        else:
            body = data
        ncrlf = body.count(b"\r\n")
        bare = body.count(b"\r") != ncrlf or body.count(b"\n") != ncrlf
        if bare:
            if self._reject:
                return None
            # CRLF first: a CR followed by LF is never two line ends.
            text = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            sep = b"\n"
        else:
            text = body
            sep = b"\r\n"
        k = text.rfind(sep)
        end = k + len(sep) if k >= 0 else 0
        limit = self.max_line_length
        if len(text) - end > limit or _has_long_line(text, end, limit, len(sep)):
            return None
        content = _unstuff(text[:end], bare)
        if bare:
            self.bare_newlines_seen = True
        room = self.max_size - self.size
        if len(content) > room:
            # Produce the whole lines that fit, as line by line would have.
            k = content.rfind(b"\r\n", 0, room)
            content = content[: k + 2] if k >= 0 else b""
            self.size += len(content)
            self._fail(replies.MESSAGE_TOO_BIG)
            return content
        self.size += len(content)
        if final:
            return content
        self._line = bytearray(text[end:])
        self._cr = held_cr
        if end:
            if bare:
                j = max(body.rfind(b"\r"), body.rfind(b"\n"))
                self._after_crlf = body[j] == _LF and j > 0 and body[j - 1] == _CR
            else:
                self._after_crlf = True
        return content

    def _careful(self, region: bytes) -> bytes:
        """Line by line, exactly as the contract reads; used when an error is due."""
        out: list[bytes] = []
        pos = 0
        n = len(region)
        limit = self.max_line_length
        while pos < n and self.error is None:
            if self._cr:
                # The byte after a CR says whether it was a CRLF or a bare CR.
                self._cr = False
                if region[pos] == _LF:
                    pos += 1
                    if self._end_line(out, crlf=True):
                        # _find_end cut the region here; anything else is a bug in the state kept.
                        assert pos == n, "end of data inside a region"
                        break
                else:
                    self._end_line(out, crlf=False)
                continue
            m = _SPECIAL.search(region, pos)
            stop = m.start() if m is not None else n
            if stop > pos:
                if len(self._line) + (stop - pos) > limit:
                    self._fail(replies.DATA_LINE_TOO_LONG)
                    break
                self._line += region[pos:stop]
            if m is None:
                break
            c = region[stop]
            pos = stop + 1
            if c == 0:
                self._fail(replies.NUL_NOT_ALLOWED)
            elif c == _LF:
                self._end_line(out, crlf=False)
            else:
                self._cr = True
        return b"".join(out)

    def _end_line(self, out: list[bytes], crlf: bool) -> bool:
        """Finish the held line; True if it was the end of data."""
        line = self._line
        if crlf and self._after_crlf and line == b".":
            return True
        if not crlf:
            self.bare_newlines_seen = True
            if self._reject:
                self._fail(replies.BARE_NEWLINE_NOT_ALLOWED)
                return False
        if line[:1] == b"." and len(line) > 1:
            piece = bytes(line[1:]) + b"\r\n"
        else:
            piece = bytes(line) + b"\r\n"
        if self.size + len(piece) > self.max_size:
            self._fail(replies.MESSAGE_TOO_BIG)
            return False
        out.append(piece)
        self.size += len(piece)
        line.clear()
        self._after_crlf = crlf
        return False
