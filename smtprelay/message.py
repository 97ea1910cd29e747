"""Message headers the relay reads or writes: pure, bytes in and bytes out.

The relay changes a message in exactly three ways: one ``Received:`` header
in front, and, with ``sender.on_disallowed = "rewrite"``, a new ``From:``
with the original kept as ``Reply-To:``.  Everything else here only reads:
the From addresses, Subject and Message-ID for policy and the delivery log.
"""

from __future__ import annotations

import email.header
import email.utils
import re
import time

import attr

_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")
MAX_HEADER_BLOCK = 1 << 20  # the header block we parse; beyond it, the rest is body


def split_header_block(data: bytes) -> int | None:
    """Index just past the blank line that ends the header block of ``data``,
    or None when ``data`` holds no complete header block."""
    if data.startswith(b"\r\n"):
        return 2
    i = data.find(b"\r\n\r\n")
    return None if i < 0 else i + 4


def parse_headers(block: bytes) -> list[tuple[str, bytes]]:
    """[(name_lower_str, raw_value_bytes)] from a header block (unfolded)."""
    headers: list[tuple[str, bytes]] = []
    for line in block.split(b"\r\n"):
        if not line:
            break
        if line[:1] in (b" ", b"\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + b" " + line.strip())
            continue
        m = _HEADER_NAME.match(line)
        if not m:
            # not a header line: the block ends (a body without a blank line)
            if not headers:
                return []
            break
        headers.append((m.group(1).decode("ascii").lower(), line[m.end():].strip()))
    return headers


def _text(value: bytes) -> str:
    """Decode RFC 2047 words; 8-bit bytes as UTF-8 or, failing that, Latin-1."""
    try:
        raw = value.decode("utf-8")
    except UnicodeDecodeError:
        raw = value.decode("latin-1")
    try:
        parts = email.header.decode_header(raw)
    except Exception:
        return raw
    out: list[str] = []
    for text, charset in parts:
        if isinstance(text, bytes):
            try:
                text = text.decode(charset or "ascii", errors="replace")
            except LookupError:
                text = text.decode("latin-1")
        out.append(text)
    return "".join(out)


@attr.frozen
class HeaderSummary:
    from_addresses: tuple[str, ...]  # lower-cased addr-specs in From:
    from_display: str  # the From header as text, for the log
    subject: str
    message_id: str
    has_reply_to: bool
    from_parse_error: bool = False


def summarize(block: bytes) -> HeaderSummary:
    headers = parse_headers(block)
    from_values = [v for n, v in headers if n == "from"]
    addresses: list[str] = []
    error = False
    for value in from_values:
        text = _text(value)
        pairs = email.utils.getaddresses([text])
        for _, addr in pairs:
            if not addr or "@" not in addr:
                error = True
            else:
                addresses.append(addr.strip().lower())
    subject = next((_text(v) for n, v in headers if n == "subject"), "")
    message_id = next((v.decode("latin-1") for n, v in headers if n == "message-id"), "")
    return HeaderSummary(
        from_addresses=tuple(addresses),
        from_display=_text(from_values[0])[:300] if from_values else "",
        subject=subject.replace("\r", " ").replace("\n", " ")[:300],
        message_id=message_id.strip()[:300],
        has_reply_to=any(n == "reply-to" for n, _ in headers),
        from_parse_error=error or (len(from_values) > 0 and not addresses),
    )


def rewrite_from(block: bytes, new_from: str) -> bytes:
    """The header block with every From: replaced by ``new_from`` and the
    original From kept as Reply-To: (unless the message has a Reply-To)."""
    lines = block.split(b"\r\n")
    out: list[bytes] = []
    original: list[bytes] = []
    has_reply_to, skipping = False, False
    for line in lines:
        if skipping and line[:1] in (b" ", b"\t"):
            original[-1] += b"\r\n" + line
            continue
        skipping = False
        m = _HEADER_NAME.match(line)
        if m and m.group(1).lower() == b"from":
            original.append(line[m.end():].lstrip(b" \t"))
            skipping = True
            continue
        if m and m.group(1).lower() == b"reply-to":
            has_reply_to = True
        out.append(line)
    # the block ends with an empty line (or two, for "\r\n\r\n"): insert before it
    insert_at = len(out)
    while insert_at > 0 and out[insert_at - 1] == b"":
        insert_at -= 1
    new = [b"From: " + new_from.encode("utf-8")]
    if original and not has_reply_to:
        new.append(b"Reply-To: " + original[0])
    out[insert_at:insert_at] = new
    return b"\r\n".join(out)


_SAFE_HELO = re.compile(rb"[^\x21-\x7e]")


def received_header(helo: bytes | None, client_ip: str, hostname: str, message_id: str,
                    protocol: str, when: float | None = None) -> bytes:
    """One Received: header (RFC 5321 4.4) without a ``for`` clause: naming a
    recipient there would show Bcc recipients to everyone."""
    helo_text = _SAFE_HELO.sub(b"", helo or b"")[:255].decode("ascii") or "unknown"
    date = email.utils.formatdate(time.time() if when is None else when, usegmt=True)
    return (
        f"Received: from {helo_text} ([{client_ip}])\r\n"
        f"\tby {hostname} (smtprelay) with {protocol} id {message_id};\r\n"
        f"\t{date}\r\n"
    ).encode("ascii")


def smtp_protocol(esmtp: bool, tls: bool, authenticated: bool) -> str:
    """RFC 3848 'with' keyword."""
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")
