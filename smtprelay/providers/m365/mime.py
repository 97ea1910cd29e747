"""How a stored message is cut for Microsoft Graph: which call, which recipients, which bytes.

Graph takes a message in one of two forms (``providers.md``, section m365):

* **MIME sendMail**: ``POST /users/{m}/sendMail`` with the base64 of the whole
  message; the request is capped at 4 MB (:data:`REQUEST_LIMIT`), so about
  3 MB of message (:func:`fits`).  Graph delivers to the To/Cc/Bcc headers and
  always keeps a copy in Sent Items.
* **A draft**: ``POST /users/{m}/messages`` with the base64 of a *skeleton* (the
  message less the attachments that do not fit), its recipients set
  explicitly where the headers disagree with the envelope, the attachments
  added one by one (upload sessions from 3 MB, a single POST below), then
  ``POST .../send``.

This module decides between them (:func:`prepare`, :func:`plan_draft`) and
reads what each needs from the message file: the payload, the decoded bytes
of an attachment in upload-sized chunks, the JSON of a small attachment.  It
parses the MIME structure once, streaming (:func:`scan`), and keeps
attachments as offsets into the file, so a 100 MB message is never in memory.
Nothing here touches the network; the functions that read the file are meant
to run on a thread.  Rule 1 of ``providers.md`` (the envelope decides who
receives) is :func:`smtprelay.recipients.plan_recipients`; here are Graph's
reading of the headers and its forms of the result (a Bcc header, a PATCH).
"""

from __future__ import annotations

import base64
import binascii
import email.errors
import email.header
import email.parser
import email.policy
import email.utils
import json
import mimetypes
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import IO, Any

import attr

from smtprelay.message import MAX_HEADER_BLOCK, parse_headers, split_header_block
from smtprelay.recipients import (
    Address,
    HeaderRecipients,
    RecipientPlan,
    plan_recipients,
    read_addresses,
)

REQUEST_LIMIT = 4 * 1024 * 1024  # a Graph request body, base64 included
UPLOAD_MIN = 3 * 1024 * 1024  # attachments from this size go through an upload session
UPLOAD_MAX = 150 * 1024 * 1024  # and up to this size
MESSAGE_MAX = 150 * 1024 * 1024  # Exchange Online's largest MaxSendSize
CHUNK_UNIT = 320 * 1024  # upload fragments are multiples of this ...
UPLOAD_CHUNK = (REQUEST_LIMIT // CHUNK_UNIT) * CHUNK_UNIT  # ... at most 4 MB: 3,932,160
MAX_DEPTH = 40  # nesting of multiparts we follow; deeper ones are opaque leaves
FILE_ATTACHMENT = "#microsoft.graph.fileAttachment"

_READ = 1 << 20
_MAX_DELIMITER_LINE = 1000
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_NOT_B64 = bytes(sorted(set(range(256)) - set(_B64_ALPHABET)))
_BODY_TYPES = ("text/plain", "text/html")

# the message file: binary, seekable
File = IO[bytes]
# a piece of the MIME to send: a (start, end) range of the file, or bytes of our own
Segment = bytes | tuple[int, int]


class Unsendable(Exception):
    """Graph cannot take this message by any method (a permanent failure)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


# ---------------------------------------------------------------- sizes


def base64_size(n: int) -> int:
    """Length of the padded base64 of ``n`` bytes (no line breaks)."""
    return 4 * ((n + 2) // 3)


def largest_fitting(limit: int = REQUEST_LIMIT) -> int:
    """The most bytes whose base64 fits in ``limit``."""
    return (limit // 4) * 3


def fits(n: int, limit: int = REQUEST_LIMIT) -> bool:
    """Does a message of ``n`` bytes go in one sendMail request?"""
    return base64_size(n) <= limit


def base64_decoded_size(alphabet_chars: int) -> int:
    """Bytes decoded from ``alphabet_chars`` base64 characters (padding not counted)."""
    return alphabet_chars * 3 // 4


# ---------------------------------------------------------------- recipients (rule 1)


def _decode_words(text: str) -> str:
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return text


def _header_text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def header_recipients(block: bytes) -> HeaderRecipients:
    """The To, Cc and Bcc addresses of a header block, as Graph reads them."""
    found: dict[str, list[Address]] = {"to": [], "cc": [], "bcc": []}
    for name, value in parse_headers(block):
        if name not in found:
            continue
        for display, address in read_addresses(_header_text(value)):
            address = address.strip()
            if address:
                found[name].append(Address(address, _decode_words(display).strip()))
    return HeaderRecipients(tuple(found["to"]), tuple(found["cc"]), tuple(found["bcc"]))


def bcc_header(addresses: Sequence[str]) -> bytes:
    """A ``Bcc:`` header naming ``addresses`` (one per folded line), or b""."""
    if not addresses:
        return b""
    clean = [a.replace("\r", "").replace("\n", "").encode("utf-8") for a in addresses]
    return b"Bcc: " + b",\r\n ".join(clean) + b"\r\n"


def recipients_patch(rplan: RecipientPlan) -> dict[str, list[dict[str, Any]]]:
    """The draft PATCH that sets the recipients of ``rplan`` (visible ones as the headers
    name them, everyone else in Bcc)."""
    return {
        "toRecipients": [recipient_resource(a) for a in rplan.to],
        "ccRecipients": [recipient_resource(a) for a in rplan.cc],
        "bccRecipients": [recipient_resource(a) for a in rplan.bcc],
    }


def recipient_resource(address: Address) -> dict[str, Any]:
    """A Graph ``recipient``."""
    email_address = {"address": address.address}
    if address.name:
        email_address["name"] = address.name
    return {"emailAddress": email_address}


# PidTagDeleteAfterSubmit: the sent draft is not kept in Sent Items
DELETE_AFTER_SUBMIT = {"id": "Boolean 0x0E01", "value": "true"}


# ---------------------------------------------------------------- the MIME structure


@attr.define
class Part:
    """One MIME entity of the message, as offsets into its file."""

    index: int
    start: int  # its first header byte
    body_start: int
    body_end: int = 0  # exclusive; the CRLF before the next delimiter is not the body's
    cut: tuple[int, int] | None = None  # (start, end): the bytes that take it out of its
    # multipart
    content_type: str = "text/plain"
    boundary: bytes | None = None  # for a multipart
    disposition: str | None = None
    filename: str | None = None
    content_id: str | None = None
    encoding: str = "7bit"
    b64_chars: int | None = None  # base64 alphabet characters in the body (base64 only)
    decoded_size: int | None = None
    parent: int | None = None
    children: list[int] = attr.field(factory=list)

    @property
    def multipart(self) -> bool:
        return self.boundary is not None

    @property
    def body_like(self) -> bool:
        """Text the draft keeps in its MIME (the message body, not an attachment)."""
        return (self.content_type in _BODY_TYPES and self.disposition != "attachment"
                and not self.filename)

    @property
    def is_inline(self) -> bool:
        # as Exchange reads a MIME part (the fake mirrors it)
        return self.disposition == "inline" or (self.disposition is None
                                                and bool(self.content_id))


@attr.frozen
class _Delimiter:
    crlf: int  # where the body before it ends
    line_start: int  # the "--boundary" line
    line_end: int  # after its CRLF
    boundary: bytes
    close: bool


def _match_boundary(line: bytes, boundaries: Sequence[bytes]) -> tuple[bytes, bool] | None:
    """(boundary, close) if ``line`` (after its leading "--") is a delimiter line."""
    for b in boundaries:
        if line.startswith(b):
            rest = line[len(b):]
            close = rest.startswith(b"--")
            if close:
                rest = rest[2:]
            if not rest.strip(b" \t"):
                return b, close
    return None


def _count_b64(data: bytes | bytearray) -> int:
    return len(data.translate(None, _NOT_B64))


def _next_delimiter(f: File, start: int, boundaries: Sequence[bytes],
                    count: bool = False) -> tuple[_Delimiter | None, int]:
    """The first delimiter line of ``boundaries`` at or after ``start`` (a line start).

    Returns ``(delimiter or None at end of file, base64 characters before it)``.
    Reads in 1 MB blocks; a base64 body cannot hold "--" at a line start, so
    its bytes are passed over at C speed.
    """
    f.seek(start)
    buf = bytearray(b"\r\n")  # ``start`` is a line start: as if a CRLF were before it
    base = start - 2  # the file offset of buf[0]
    search, counted, chars, eof = 0, 0, 0, False
    while True:
        hit = buf.find(b"\r\n--", search)
        if hit >= 0:
            eol = buf.find(b"\r\n", hit + 4)
            if eol < 0 and not eof and len(buf) - hit < _MAX_DELIMITER_LINE:
                more = f.read(_READ)
                if more:
                    buf += more
                else:
                    eof = True
                continue
            line = bytes(buf[hit + 4: eol if eol >= 0 else len(buf)])
            matched = _match_boundary(line, boundaries)
            if matched is not None:
                if count:
                    chars += _count_b64(buf[counted:hit])
                line_end = base + (eol + 2 if eol >= 0 else len(buf))
                return _Delimiter(max(base + hit, start), base + hit + 2, line_end,
                                  matched[0], matched[1]), chars
            search = hit + 2
            continue
        if eof:
            if count:
                chars += _count_b64(buf[counted:])
            return None, chars
        drop = max(len(buf) - 3, 0)  # "\r\n-" at the end may begin a delimiter
        if count and drop > counted:
            chars += _count_b64(buf[counted:drop])
        del buf[:drop]
        base += drop
        counted = max(counted - drop, 0)
        search = 0
        more = f.read(_READ)
        if more:
            buf += more
        else:
            eof = True


def _read_part_headers(f: File, start: int, end: int,
                       boundaries: Sequence[bytes]) -> tuple[bytes, int, _Delimiter | None]:
    """(header block, body start, delimiter met inside the headers or None)."""
    f.seek(start)
    data = b""
    while True:
        found = split_header_block(data)
        if found is not None:
            block, body_start = data[:found], start + found
            break
        if len(data) > MAX_HEADER_BLOCK:
            raise Unsendable("a MIME part has a header block over 1 MB")
        more = f.read(min(65536, max(end - start - len(data), 0)))
        if not more:
            block, body_start = data, start + len(data)  # headers up to the end of file
            break
        data += more
    # a delimiter inside what should be headers: a part without a blank line (malformed)
    offset = 0
    for line in block.split(b"\r\n"):
        if line.startswith(b"--") and boundaries:
            matched = _match_boundary(line[2:], boundaries)
            if matched is not None:
                line_start = start + offset
                eol = line_start + len(line) + 2
                return (block[:offset], line_start,
                        _Delimiter(line_start, line_start, min(eol, end), matched[0],
                                   matched[1]))
        offset += len(line) + 2
    return block, body_start, None


_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)


def _describe(part: Part, block: bytes) -> None:
    msg = _HEADER_PARSER.parsebytes(block)
    part.content_type = msg.get_content_type()
    if part.content_type.startswith("multipart/"):
        boundary = msg.get_param("boundary")
        if isinstance(boundary, tuple):  # RFC 2231 form
            boundary = email.utils.collapse_rfc2231_value(boundary)
        if boundary and 0 < len(boundary) <= 200:
            try:
                part.boundary = boundary.encode("ascii")
            except UnicodeEncodeError:
                part.boundary = None
    part.disposition = msg.get_content_disposition()
    filename = msg.get_filename()
    if filename:
        part.filename = _decode_words(filename).replace("\r", "").replace("\n", "")
    content_id = msg.get("Content-ID")
    if content_id:
        part.content_id = str(content_id).strip().strip("<>").strip() or None
    encoding = msg.get("Content-Transfer-Encoding")
    part.encoding = str(encoding).strip().lower() if encoding else "7bit"


def scan(f: File, size: int | None = None) -> list[Part]:
    """The MIME tree of the message in the binary file ``f``: a list of :class:`Part`,
    the message itself first, in document order.  Reads the file once."""
    if size is None:
        size = f.seek(0, 2)
    parts: list[Part] = []
    _entity(f, 0, size, (), None, parts, 0)
    return parts


def _entity(f: File, start: int, end: int, boundaries: tuple[bytes, ...], parent: int | None,
            parts: list[Part], depth: int) -> _Delimiter | None:
    """Parse the entity at ``start``; return the delimiter that ends it (None: end of file)."""
    block, body_start, early = _read_part_headers(f, start, end, boundaries)
    part = Part(index=len(parts), start=start, body_start=body_start, parent=parent)
    parts.append(part)
    _describe(part, block)
    if early is not None:
        part.body_end = body_start
        part.boundary = None
        return early
    boundary = part.boundary
    if boundary is not None and depth < MAX_DEPTH:  # a multipart we follow
        inner = (boundary,) + tuple(boundaries)
        delimiter, _ = _next_delimiter(f, body_start, inner)
        while (delimiter is not None and delimiter.boundary == part.boundary
               and not delimiter.close):
            child_index = len(parts)
            following = _entity(f, delimiter.line_end, end, inner, part.index, parts, depth + 1)
            child = parts[child_index]
            child.cut = (delimiter.line_start, following.line_start if following else end)
            part.children.append(child_index)
            delimiter = following
        if delimiter is not None and delimiter.boundary == part.boundary:  # closed
            if boundaries:
                delimiter, _ = _next_delimiter(f, delimiter.line_end, boundaries)
            else:
                delimiter = None  # the epilogue runs to the end
        part.body_end = delimiter.crlf if delimiter else end
        return delimiter
    part.boundary = None
    counting = part.encoding == "base64"
    if boundaries:
        delimiter, chars = _next_delimiter(f, body_start, boundaries, count=counting)
    else:
        delimiter, chars = None, None
    part.body_end = delimiter.crlf if delimiter else end
    if counting and chars is not None:
        part.b64_chars = chars
        part.decoded_size = base64_decoded_size(chars)
    elif part.encoding != "quoted-printable":
        part.decoded_size = part.body_end - part.body_start
    return delimiter


# ---------------------------------------------------------------- the draft's plan (pure)


@attr.frozen
class MovedAttachment:
    """An attachment taken out of the skeleton and added to the draft on its own."""

    part: int  # index into the scanned parts
    name: str
    content_type: str
    is_inline: bool
    content_id: str | None
    size: int  # decoded bytes
    upload: bool  # True: an upload session; False: one POST .../attachments

    def item(self) -> dict[str, Any]:
        """The ``AttachmentItem`` of createUploadSession."""
        out = {"attachmentType": "file", "name": self.name, "size": self.size,
               "contentType": self.content_type, "isInline": self.is_inline}
        if self.content_id:
            out["contentId"] = self.content_id
        return out

    def resource(self, content_b64: str = "") -> dict[str, Any]:
        """The ``fileAttachment`` of POST .../attachments."""
        out = {"@odata.type": FILE_ATTACHMENT, "name": self.name,
               "contentType": self.content_type, "isInline": self.is_inline}
        if self.content_id:
            out["contentId"] = self.content_id
        out["contentBytes"] = content_b64
        return out

    def json_size(self) -> int:
        """The exact length of the POST body for it."""
        return len(json.dumps(self.resource()).encode("utf-8")) + base64_size(self.size)


@attr.frozen
class Plan:
    form: str  # "mime" (sendMail) | "draft"
    segments: tuple[Segment, ...]  # the MIME to send
    mime_size: int
    recipients: RecipientPlan
    attachments: tuple[MovedAttachment, ...] = ()
    reasons: tuple[str, ...] = ()  # why a draft: "size", "recipients", "sent_items"
    # scanned, for attachments
    parts: tuple[Part, ...] = attr.field(default=(), eq=False, repr=False)


def attachment_name(part: Part) -> str:
    if part.filename:
        return part.filename
    if part.content_type == "message/rfc822":
        return "message.eml"
    extension = mimetypes.guess_extension(part.content_type) or ".bin"
    stem = part.content_id.split("@")[0] if part.content_id else "attachment"
    return f"{stem}{extension}"


def moved(part: Part, upload: bool) -> MovedAttachment:
    if part.decoded_size is None:
        raise ValueError(f"part {part.index}: decoded size unknown (call measure())")
    return MovedAttachment(part.index, attachment_name(part), part.content_type,
                           part.is_inline, part.content_id, part.decoded_size, upload)


def _placeholder(boundary: bytes) -> bytes:
    return (b"--" + boundary + b"\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n\r\n")


def skeleton_segments(parts: Sequence[Part], size: int,
                      removed: Iterable[int]) -> tuple[Segment, ...]:
    """The segments of the message less the ``removed`` parts (indices); an emptied
    multipart gets an empty text part (a multipart must have one)."""
    removed = set(removed)
    cuts = sorted((_cut(parts[i]), i) for i in removed)
    placeholders = {}
    for p in parts:
        if (p.boundary is not None and p.children
                and all(c in removed for c in p.children)):
            first = _cut(parts[p.children[0]])[0]
            placeholders[first] = _placeholder(p.boundary)
    segments: list[Segment] = []
    pos = 0
    for (start, end), _ in cuts:
        if start > pos:
            segments.append((pos, start))
        if start in placeholders:
            segments.append(placeholders[start])
        pos = max(pos, end)
    if pos < size:
        segments.append((pos, size))
    return tuple(segments)


def _cut(part: Part) -> tuple[int, int]:
    assert part.cut is not None, f"part {part.index} is not inside a multipart"
    return part.cut


def segments_size(segments: Iterable[Segment]) -> int:
    return sum(len(s) if isinstance(s, bytes) else s[1] - s[0] for s in segments)


def plan_draft(parts: Sequence[Part], size: int, limit: int = REQUEST_LIMIT,
               move_all: bool = False) -> tuple[tuple[Segment, ...], tuple[MovedAttachment, ...]]:
    """(segments, moved attachments) for a draft whose skeleton fits in ``limit``.

    Every attachment stays in the skeleton unless it must go: the largest go
    first (upload sessions from :data:`UPLOAD_MIN`, one POST below), until the
    base64 skeleton fits; with ``move_all`` every attachment goes.  Raises
    :class:`Unsendable` when no way is left.
    """
    candidates = [p for p in parts[1:] if not p.multipart and not p.body_like
                  and p.cut is not None]
    for p in candidates:
        if p.decoded_size is None:
            raise ValueError(f"part {p.index}: decoded size unknown (call measure())")
    candidates.sort(key=lambda p: (_cut(p)[1] - _cut(p)[0]), reverse=True)
    removed: list[int] = []
    segments = skeleton_segments(parts, size, removed)
    for p in candidates:
        if not move_all and fits(segments_size(segments), limit):
            break
        removed.append(p.index)
        segments = skeleton_segments(parts, size, removed)
    skeleton = segments_size(segments)
    if not fits(skeleton, limit):
        raise Unsendable(
            f"the message without its attachments is {skeleton:,} bytes; Graph takes at "
            f"most {largest_fitting(limit):,} bytes of MIME in one request")
    out = []
    for index in sorted(removed):
        p = parts[index]
        attachment = moved(p, upload=(p.decoded_size or 0) >= UPLOAD_MIN)  # never None here
        if attachment.upload and attachment.size > UPLOAD_MAX:
            raise Unsendable(f"the attachment {attachment.name!r} ({attachment.size:,} bytes) "
                             f"is larger than Graph's {UPLOAD_MAX:,} bytes")
        if not attachment.upload and attachment.json_size() > limit:
            raise Unsendable(
                f"the attachment {attachment.name!r} ({attachment.size:,} bytes) is too large "
                f"for one Graph request and smaller than an upload session's "
                f"{UPLOAD_MIN:,} bytes")
        out.append(attachment)
    return segments, tuple(out)


# ---------------------------------------------------------------- reading the file (threads)


def read_segments(f: File, segments: Iterable[Segment]) -> bytes:
    out = []
    for s in segments:
        if isinstance(s, bytes):
            out.append(s)
        else:
            f.seek(s[0])
            out.append(f.read(s[1] - s[0]))
    return b"".join(out)


def measure(f: File, parts: Iterable[Part]) -> None:
    """Fill in the decoded size of quoted-printable leaves (the others are known)."""
    for p in parts:
        if p.decoded_size is None and not p.multipart and p.encoding == "quoted-printable":
            p.decoded_size = sum(len(c) for c in decoded_pieces(f, p))


def _raw(f: File, start: int, end: int) -> Iterator[bytes]:
    pos = start
    while pos < end:
        f.seek(pos)
        data = f.read(min(_READ, end - pos))
        if not data:
            return
        pos += len(data)
        yield data


def decoded_pieces(f: File, part: Part) -> Iterator[bytes]:
    """The decoded body of ``part``, in pieces of any size."""
    if part.encoding == "base64":
        pending = b""
        for raw in _raw(f, part.body_start, part.body_end):
            clean = pending + raw.translate(None, _NOT_B64)
            n = len(clean) // 4 * 4
            if n:
                yield binascii.a2b_base64(clean[:n])
            pending = clean[n:]
        if len(pending) >= 2:
            yield binascii.a2b_base64(pending + b"=" * (4 - len(pending)))
    elif part.encoding == "quoted-printable":
        pending = b""
        for raw in _raw(f, part.body_start, part.body_end):
            data = pending + raw
            cut = data.rfind(b"\n") + 1  # a soft line break or =XX never spans lines
            if cut:
                yield binascii.a2b_qp(data[:cut])
            pending = data[cut:]
        if pending:
            yield binascii.a2b_qp(pending)
    else:
        yield from _raw(f, part.body_start, part.body_end)


def decoded_chunks(f: File, part: Part,
                   chunk: int = UPLOAD_CHUNK) -> Generator[bytes, None, None]:
    """The decoded body of ``part`` in chunks of exactly ``chunk`` bytes (the last shorter)."""
    out = bytearray()
    for piece in decoded_pieces(f, part):
        out += piece
        while len(out) >= chunk:
            yield bytes(out[:chunk])
            del out[:chunk]
    if out:
        yield bytes(out)


def attachment_body(f: File, part: Part, attachment: MovedAttachment) -> bytes:
    """The JSON body of ``POST .../attachments`` for a small moved attachment."""
    content = b"".join(decoded_pieces(f, part))
    resource = attachment.resource(base64.b64encode(content).decode("ascii"))
    return json.dumps(resource).encode("utf-8")


# ---------------------------------------------------------------- the decision (reads the file)


def prepare(f: File, envelope: Sequence[str], save_to_sent_items: bool = True,
            limit: int = REQUEST_LIMIT, move_all: bool = False) -> tuple[Plan, bytes]:
    """Plan the sending of the message in ``f`` to ``envelope``; read what it needs.

    Returns ``(plan, payload)``, the payload being the base64 MIME of the
    sendMail request or of the draft's skeleton.  ``move_all`` (after a 413)
    forces the draft form with every attachment on its own.  Raises
    :class:`Unsendable`.

    sendMail when Sent Items may keep a copy, the headers name nobody outside
    the envelope and the message fits; envelope-only recipients then ride in
    a Bcc header put in front (Graph removes it: every other byte passes
    unchanged).  A draft otherwise; its MIME is the message itself (less the
    attachments that do not fit) and its recipients, when they are not
    exactly the headers', are set by a PATCH.
    """
    size = f.seek(0, 2)
    if size > MESSAGE_MAX:
        raise Unsendable(f"the message is {size:,} bytes; Exchange Online sends at most "
                         f"{MESSAGE_MAX:,}")
    f.seek(0)
    head = f.read(min(size, MAX_HEADER_BLOCK))
    end = split_header_block(head)
    block = head if end is None else head[:end]
    rplan = plan_recipients(envelope, header_recipients(block))
    bcc = bcc_header(rplan.add_bcc)
    reasons = []
    if not save_to_sent_items:
        reasons.append("sent_items")
    if rplan.explicit:
        reasons.append("recipients")
    if move_all or not fits(size + len(bcc), limit):
        reasons.append("size")
    if not reasons:
        segments: tuple[Segment, ...] = (bcc, (0, size)) if bcc else ((0, size),)
        plan = Plan("mime", segments, size + len(bcc), rplan)
    elif not move_all and fits(size, limit):
        plan = Plan("draft", ((0, size),), size, rplan, reasons=tuple(reasons),)
    else:
        parts = scan(f, size)
        measure(f, parts)
        if not parts[0].multipart:
            raise Unsendable(
                f"the message is {size:,} bytes in a single MIME part; Graph takes at most "
                f"{largest_fitting(limit):,} bytes in one request and only attachments can "
                "be added on their own")
        segments, attachments = plan_draft(parts, size, limit, move_all)
        plan = Plan("draft", segments, segments_size(segments), rplan, attachments,
                    tuple(reasons), parts=tuple(parts))
    payload = base64.b64encode(read_segments(f, plan.segments))
    return plan, payload
