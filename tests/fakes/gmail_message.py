"""What Gmail does to a message it is asked to send: pure functions, bytes in and bytes out.

Owns, for :mod:`tests.fakes.gmail`:

* splitting the header block into fields without changing a byte of it
  (:func:`split_message`), folded lines, odd line ends and non-header lines included;
* the recipients Gmail computes from the ``To``, ``Cc`` and ``Bcc`` headers (the
  envelope of an API send is the headers: nothing else decides who receives), and the
  400 answers it gives when there are none or one of them is not an address;
* the delivered copy (:func:`prepare_delivery`): ``Bcc`` removed, ``From`` rewritten to
  the mailbox's primary address unless it already is that address or one of the
  mailbox's *verified* send-as aliases, ``From``, ``Message-ID`` and ``Date`` added when
  missing.  Every other byte, body included, passes unchanged;
* what threading looks at (``In-Reply-To``, ``References``, ``Subject``).

Nothing here does I/O or keeps state, so it is tested directly, with hypothesis too.
"""

import re
from dataclasses import dataclass, field
from email.header import Header
from email.utils import formataddr, getaddresses

RECIPIENT_HEADERS = ("To", "Cc", "Bcc")

# RFC 5322 field names: printable US-ASCII except colon; no space.
_FIELD_NAME = re.compile(rb"^[\x21-\x39\x3b-\x7e]+$")
# Gmail refuses "human@f": a domain needs at least two labels.
_ADDRESS = re.compile(r"^[^@\s]+@[^@\s.]+(?:\.[^@\s.]+)+$")
_MSGID = re.compile(r"<[^<>\s]+>")
_REPLY_PREFIX = re.compile(r"^\s*((re|fw|fwd|aw|wg|sv|vs)\s*(\[\d+\])?\s*:\s*)+", re.I)


class MessageRejected(Exception):
    """Gmail answers 400 ``invalidArgument`` with ``message`` for this message."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class HeaderField:
    """One header field as it stands in the message.

    ``name`` is None for a line in the header block that is not a field (an mbox
    ``From `` line, a line without a colon): Gmail keeps those, so do we.
    """

    name: str | None
    raw: bytes  # the whole field: first line, continuation lines, line ends

    @property
    def value(self):
        """The unfolded value, decoded as UTF-8 (RFC 6532) with bytes kept as escapes."""
        if self.name is None:
            return ""
        text = self.raw.split(b":", 1)[1]
        text = re.sub(rb"\r?\n(?=[ \t])", b"", text).rstrip(b"\r\n")
        return text.decode("utf-8", "surrogateescape").strip()

    def is_(self, name):
        return self.name is not None and self.name.lower() == name.lower()


def split_message(raw):
    """Split ``raw`` into (header fields, rest): ``rest`` starts at the blank line.

    ``b"".join(f.raw for f in fields) + rest == raw`` always holds.
    """
    fields = []
    pos = 0
    end = len(raw)
    while pos < end:
        nl = raw.find(b"\n", pos)
        line_end = end if nl < 0 else nl + 1
        line = raw[pos:line_end]
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            fields[-1] = HeaderField(last.name, last.raw + line)
        else:
            name, colon, _ = line.partition(b":")
            if colon and _FIELD_NAME.match(name):
                fields.append(HeaderField(name.decode("ascii"), line))
            else:
                fields.append(HeaderField(None, line))
        pos = line_end
    return fields, raw[pos:]


def line_ending(fields, rest=b""):
    """The line end the message uses (CRLF unless its first line ends in a bare LF)."""
    first = fields[0].raw if fields else rest
    nl = first.find(b"\n")
    if nl > 0 and first[nl - 1 : nl] != b"\r":
        return b"\n"
    return b"\r\n"


def header_values(fields, name):
    return [f.value for f in fields if f.is_(name)]


def addresses(values, header_name):
    """The addresses in the values of one header; MessageRejected for a bad one."""
    found = []
    for display, address in getaddresses(values):
        if not display and not address:
            continue  # an empty group ("undisclosed-recipients:;") or a stray comma
        if not _ADDRESS.match(address):
            raise MessageRejected(f"Invalid {header_name} header")
        found.append(address)
    return found


@dataclass(frozen=True)
class Recipients:
    to: tuple
    cc: tuple
    bcc: tuple

    @property
    def all(self):
        """Every recipient once (compared without case), in To, Cc, Bcc order."""
        seen = set()
        out = []
        for address in self.to + self.cc + self.bcc:
            if address.lower() not in seen:
                seen.add(address.lower())
                out.append(address)
        return tuple(out)


def recipients(fields):
    """The recipients Gmail will deliver to, from To, Cc and Bcc."""
    found = {
        name: tuple(addresses(header_values(fields, name), name)) for name in RECIPIENT_HEADERS
    }
    result = Recipients(found["To"], found["Cc"], found["Bcc"])
    if not result.all:
        raise MessageRejected("Recipient address required")
    return result


def _from_value(display, address):
    try:
        display.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in the name: keep the address only
        display = ""
    if not display:
        return address
    if "=?" in display:  # already an RFC 2047 encoded word: must stay unquoted
        return f"{display} <{address}>"
    try:
        display.encode("ascii")
    except UnicodeEncodeError:
        return formataddr((str(Header(display, "utf-8")), address))
    return formataddr((display, address))


@dataclass(frozen=True)
class Delivery:
    """What Gmail makes of one message: who receives it and the bytes they get."""

    recipients: Recipients
    from_original: str | None  # the From header as sent (None: there was none)
    from_address: str | None  # the address in it
    from_delivered: str  # the From header the recipients see
    from_rewritten: bool
    delivered: bytes
    headers: tuple  # ((name, value), ...) of the message as sent
    delivered_headers: tuple
    added_headers: tuple = field(default=())  # names Gmail added
    message_id: str = ""  # of the delivered copy


def prepare_delivery(raw, primary, send_as=(), *, new_message_id, date):
    """Apply Gmail's send rules to ``raw`` for the mailbox ``primary``.

    ``send_as`` holds the verified send-as aliases; ``new_message_id()`` returns a
    ``<...>`` id used only when the message has none; ``date`` is an RFC 5322 date
    used only when it has no Date.  Raises MessageRejected (400 invalidArgument).
    """
    fields, rest = split_message(raw)
    rcpts = recipients(fields)
    eol = line_ending(fields, rest)
    allowed = {primary.lower()} | {a.lower() for a in send_as}

    from_fields = [f for f in fields if f.is_("From")]
    from_original = from_fields[0].value if from_fields else None
    from_address = None
    display = ""
    if from_original is not None:
        parsed = [(d, a) for d, a in getaddresses([from_original]) if a]
        if parsed:
            display, from_address = parsed[0]
    keep_from = (
        from_address is not None
        and from_address.lower() in allowed
        and (len(getaddresses([from_original])) == 1)
    )
    from_delivered = from_original if keep_from else _from_value(display, primary)

    out = []
    added = []
    if not from_fields:
        out.append(b"From: " + from_delivered.encode("utf-8") + eol)
        added.append("From")
    if not any(f.is_("Message-ID") for f in fields):
        message_id = new_message_id()
        out.append(b"Message-ID: " + message_id.encode("ascii") + eol)
        added.append("Message-ID")
    else:
        message_id = header_values(fields, "Message-ID")[0]
    if not any(f.is_("Date") for f in fields):
        out.append(b"Date: " + date.encode("ascii") + eol)
        added.append("Date")
    for f in fields:
        if f.is_("Bcc"):
            continue
        if f is (from_fields[0] if from_fields else None) and not keep_from:
            out.append(b"From: " + from_delivered.encode("utf-8") + eol)
            continue
        out.append(f.raw)
    if not fields and not rest:
        rest = eol
    delivered = b"".join(out) + rest

    delivered_fields, _ = split_message(delivered)
    return Delivery(
        recipients=rcpts,
        from_original=from_original,
        from_address=from_address,
        from_delivered=from_delivered,
        from_rewritten=from_fields != [] and not keep_from,
        delivered=delivered,
        headers=tuple((f.name, f.value) for f in fields if f.name is not None),
        delivered_headers=tuple((f.name, f.value) for f in delivered_fields if f.name),
        added_headers=tuple(added),
        message_id=message_id,
    )


def referenced_ids(fields):
    """Message-IDs named by In-Reply-To and References (for threading)."""
    ids = []
    for name in ("In-Reply-To", "References"):
        for value in header_values(fields, name):
            ids.extend(m.lower() for m in _MSGID.findall(value))
    return ids


def thread_subject(fields):
    """The Subject without reply/forward prefixes, as threading compares it."""
    values = header_values(fields, "Subject")
    return _REPLY_PREFIX.sub("", values[0]).strip().lower() if values else ""
