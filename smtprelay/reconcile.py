"""Make a message's recipient headers say what its envelope says: pure, bytes in and out.

APIs that take a whole RFC 5322 message (Gmail's ``messages.send``, Graph's MIME
``sendMail``) deliver to the addresses in ``To``, ``Cc`` and ``Bcc`` and know
nothing of the SMTP envelope.  The relay's rule is the opposite: exactly the RCPT
TO addresses receive the message (``providers.md`` rule 1).  :func:`reconcile`
closes the gap with the smallest change to the header block:

* an envelope recipient no recipient header names is added in one new ``Bcc:``
  field at the end of the header block (the API removes Bcc on delivery, so the
  other recipients never see it);
* an address in ``To``/``Cc``/``Bcc`` that is not an envelope recipient is cut
  out of its field, the bytes of everything else in the field kept as they are
  (display names, comments, encoded words, 8-bit text, groups, folding); a field
  left with nothing in it is dropped;
* a field that a second, independent reading (the standard library's
  ``getaddresses``, close to what the API's own parser sees) still finds an
  outside address in is dropped whole: for the rare header too broken to edit,
  the envelope wins over the appearance.

Every other byte of the block, and the order of its fields, is unchanged.  No
I/O, no clock: the caller reads the header block and logs what changed.
"""

import codecs
import email.utils
import re

import attr

RECIPIENT_FIELDS = ("to", "cc", "bcc")
VISIBLE_FIELDS = ("to", "cc")

_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_WS = b" \t\r\n"
_ENCODED_WORD = re.compile(rb"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
_ATOM_STOP = frozenset(b' \t\r\n"(<[,:;')
_ROUTE = re.compile(rb"\s*@[^:<>\"]*:")
_FOLD_AT = 76


@attr.frozen
class Reconciled:
    """The header block after :func:`reconcile`, and what was changed."""

    block: bytes
    removed: tuple = ()  # ((field name as written, address), ...) cut out of a field
    dropped: tuple = ()  # field names (as written) dropped whole
    added_bcc: tuple = ()  # envelope recipients added in a new Bcc field

    @property
    def changed(self):
        return bool(self.removed or self.dropped or self.added_bcc)

    @property
    def visible_changed(self):
        """True when To or Cc changed (what the recipients can see)."""
        return any(name.lower() in VISIBLE_FIELDS for name, _ in self.removed) or any(
            name.lower() in VISIBLE_FIELDS for name in self.dropped)

    def describe(self):
        """One line for the log."""
        parts = []
        by_field = {}
        for name, address in self.removed:
            by_field.setdefault(name, []).append(address)
        for name, addresses in by_field.items():
            parts.append(f"removed {', '.join(addresses)} from {name}")
        for name in self.dropped:
            parts.append(f"dropped a {name} field")
        if self.added_bcc:
            parts.append(f"added Bcc {', '.join(self.added_bcc)}")
        return "; ".join(parts) or "unchanged"


# --- addresses ---------------------------------------------------------------------


def normalize(address):
    """A form of ``address`` for comparing: case folded, quotes and IDNA undone."""
    if isinstance(address, bytes):
        address = address.decode("utf-8", "surrogateescape")
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower()
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    domain = domain.strip().rstrip(".").lower()
    labels = []
    for label in domain.split("."):
        if label.startswith("xn--"):
            try:
                label = codecs.decode(label.encode("ascii"), "idna")
            except (UnicodeError, ValueError):
                pass
        labels.append(label)
    return local.lower() + "@" + ".".join(labels).lower()


# --- a tolerant RFC 5322 address-list reader that keeps byte positions ----------------


@attr.frozen
class _Token:
    kind: str  # ws | comment | quoted | angle | literal | special | atom
    start: int
    end: int


def _tokens(value, start=0, end=None):
    """Tokens of ``value[start:end]``; never fails (an unclosed construct runs to the end)."""
    end = len(value) if end is None else end
    out = []
    i = start
    while i < end:
        c = value[i]
        if c in _WS:
            j = i
            while j < end and value[j] in _WS:
                j += 1
            out.append(_Token("ws", i, j))
        elif c == 0x22:  # "
            j = _skip_quoted(value, i + 1, end, 0x22)
            out.append(_Token("quoted", i, j))
        elif c == 0x28:  # (
            j, depth = i + 1, 1
            while j < end and depth:
                d = value[j]
                if d == 0x5C:  # backslash
                    j += 2
                    continue
                depth += (d == 0x28) - (d == 0x29)
                j += 1
            out.append(_Token("comment", i, min(j, end)))
        elif c == 0x3C:  # <
            j = i + 1
            while j < end and value[j] != 0x3E:
                if value[j] == 0x22:
                    j = _skip_quoted(value, j + 1, end, 0x22)
                    continue
                if value[j] == 0x5C:
                    j += 1
                j += 1
            out.append(_Token("angle", i, min(j + 1, end)))
        elif c == 0x5B:  # [
            j = _skip_quoted(value, i + 1, end, 0x5D)
            out.append(_Token("literal", i, j))
        elif c in b",:;":
            out.append(_Token("special", i, i + 1))
        else:
            m = _ENCODED_WORD.match(value, i, end) if value.startswith(b"=?", i) else None
            if m:
                j = m.end()
            else:
                j = i + 1
            while j < end and value[j] not in _ATOM_STOP:
                if value.startswith(b"=?", j):
                    m = _ENCODED_WORD.match(value, j, end)
                    if m:
                        j = m.end()
                        continue
                j += 1
            out.append(_Token("atom", i, j))
        i = out[-1].end
    return out


def _skip_quoted(value, i, end, close):
    while i < end:
        c = value[i]
        if c == 0x5C:
            i += 2
            continue
        i += 1
        if c == close:
            return i
    return end


@attr.frozen
class _Mailbox:
    start: int
    end: int
    address: bytes  # the addr-spec as written, CFWS removed ("" when there is none)


@attr.frozen
class _Group:
    start: int
    end: int
    members_start: int  # just past the colon
    members_end: int  # at the semicolon (or the end of the field)
    members: tuple


def _significant(tokens):
    return [t for t in tokens if t.kind != "ws"]


def _address_of(value, tokens):
    angle = next((t for t in tokens if t.kind == "angle"), None)
    if angle is not None:
        inner_end = angle.end - 1 if value[angle.end - 1:angle.end] == b">" else angle.end
        inner_start = angle.start + 1
        route = _ROUTE.match(value, inner_start, inner_end)
        if route:
            inner_start = route.end()
        tokens = _tokens(value, inner_start, inner_end)
    return b"".join(value[t.start:t.end] for t in tokens
                    if t.kind not in ("ws", "comment"))


def _mailbox(value, tokens):
    sig = _significant(tokens)
    if not sig:
        return None
    return _Mailbox(sig[0].start, sig[-1].end, _address_of(value, sig))


def _parse_list(value, tokens, i, in_group):
    """Items of an address list from ``tokens[i:]`` -> (items, index after).

    In a group the list ends at ``;`` (the index then points at it).
    """
    items = []
    current = []
    group = None  # the group just closed, to which trailing CFWS belongs
    while i < len(tokens):
        t = tokens[i]
        if t.kind == "special" and value[t.start] == 0x2C:  # ,
            if group is None:
                m = _mailbox(value, current)
                if m is not None:
                    items.append(m)
            current, group = [], None
            i += 1
            continue
        if t.kind == "special" and value[t.start] == 0x3B and in_group:  # ;
            break
        if (t.kind == "special" and value[t.start] == 0x3A and not in_group
                and group is None and not any(c.kind == "angle" for c in current)):  # :
            sig = _significant(current)
            start = sig[0].start if sig else t.start
            members, j = _parse_list(value, tokens, i + 1, True)
            if j < len(tokens):  # at the semicolon
                members_end, end = tokens[j].start, tokens[j].end
                j += 1
            else:  # no semicolon: the group runs to the end of the field
                members_end = end = tokens[-1].end
            group = _Group(start, end, t.end, members_end, tuple(members))
            items.append(group)
            current = []
            i = j
            continue
        if group is not None:
            if t.kind != "ws":
                # CFWS (or junk) after the semicolon: part of the group
                group = attr.evolve(group, end=t.end)
                items[-1] = group
            i += 1
            continue
        current.append(t)
        i += 1
    if group is None:
        m = _mailbox(value, current)
        if m is not None:
            items.append(m)
    return items, i


def parse_address_list(value):
    """Top-level items (mailboxes and groups, with byte spans) of a field value."""
    items, _ = _parse_list(value, _tokens(value), 0, False)
    return items


def addresses_in(value):
    """Every addr-spec in a field value (group members included), as written."""
    out = []
    for item in parse_address_list(value):
        if isinstance(item, _Group):
            out.extend(m.address for m in item.members)
        else:
            out.append(item.address)
    return [a for a in out if a]


# --- rebuilding a list without some items ---------------------------------------------


def _rebuild(value, start, end, items, keep, text_of):
    """``value[start:end]`` (a list of ``items``) with only the items ``keep`` says.

    Kept items are written as ``text_of`` says (their own bytes, or a group with
    fewer members); between two kept items the separator is the one that followed
    the first if it folds the line, else the one that preceded the second, so no
    line grows.  With nothing kept the list is empty.
    """
    if not items:
        return value[start:end]
    kept = [n for n, item in enumerate(items) if keep(item)]
    if not kept:
        return b""
    out = [value[start:items[0].start]]
    for pos, n in enumerate(kept):
        out.append(text_of(items[n]))
        if pos + 1 < len(kept):
            nxt = kept[pos + 1]
            after = value[items[n].end:items[n + 1].start]
            before = value[items[nxt - 1].end:items[nxt].start]
            out.append(after if b"\n" in after or b"\n" not in before else before)
    out.append(value[items[-1].end:end])
    return b"".join(out)


def _prune_field(value, wanted):
    """(the value without addresses outside ``wanted``, or None to drop the field;
    [the addresses removed, as written])."""
    items = parse_address_list(value)
    removed = []
    keep = {}

    def decide(mailbox):
        # an item without an address (a lone comment) delivers to nobody: it stays
        ok = not mailbox.address or normalize(mailbox.address) in wanted
        if not ok:
            removed.append(mailbox.address.decode("utf-8", "replace"))
        keep[id(mailbox)] = ok
        return ok

    texts = {}
    for item in items:
        if isinstance(item, _Group):
            for m in item.members:
                decide(m)
            members = _rebuild(value, item.members_start, item.members_end, item.members,
                               lambda m: keep[id(m)], lambda m: value[m.start:m.end])
            texts[id(item)] = (value[item.start:item.members_start] + members
                               + value[item.members_end:item.end])
            keep[id(item)] = True
        else:
            decide(item)
    if not removed:
        return value, []
    if not any(keep[id(i)] and (isinstance(i, _Group) or i.address) for i in items):
        return None, removed
    new = _rebuild(value, 0, len(value), items, lambda i: keep[id(i)],
                   lambda i: texts.get(id(i), value[i.start:i.end]))
    return new, removed


# --- the header block -------------------------------------------------------------------


def split_fields(block):
    """(fields, rest): each field ``(name or None, raw bytes)`` with its line ends;
    ``rest`` starts at the blank line ending the block (``b""`` without one).

    ``b"".join(raw for _, raw in fields) + rest == block`` always holds.
    """
    fields = []
    pos, end = 0, len(block)
    while pos < end:
        nl = block.find(b"\n", pos)
        line_end = end if nl < 0 else nl + 1
        line = block[pos:line_end]
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line)
        else:
            m = _FIELD.match(line)
            fields.append((m.group(1).decode("ascii") if m else None, line))
        pos = line_end
    return fields, block[pos:]


def _value_span(raw):
    """(start, end) of a field's value: after the colon, before its final line end."""
    start = raw.index(b":") + 1
    end = len(raw)
    if raw.endswith(b"\r\n"):
        end -= 2
    elif raw.endswith(b"\n"):
        end -= 1
    return start, end


def _stdlib_addresses(value):
    """What ``email.utils.getaddresses`` reads in a value (unfolded, as Gmail-like
    parsers see it): addresses with an ``@``."""
    text = re.sub(rb"\r?\n(?=[ \t])", b"", value).decode("utf-8", "surrogateescape").strip()
    try:
        pairs = email.utils.getaddresses([text])
    except Exception:  # a parser bug must not hide an address: treat as unreadable
        return None
    return [a for _, a in pairs if "@" in a]


def bcc_field(addresses, eol=b"\r\n"):
    """A ``Bcc:`` field naming ``addresses``, folded near 76 columns."""
    line = b"Bcc:"
    lines = []
    for n, address in enumerate(addresses):
        word = address.encode("utf-8", "surrogateescape")
        if n + 1 < len(addresses):
            word += b","
        if len(line) + 1 + len(word) > _FOLD_AT and line != b"Bcc:":
            lines.append(line)
            line = b""
        line += b" " + word
    lines.append(line)
    return eol.join(lines) + eol


def reconcile(block, recipients):
    """The header block ``block`` rewritten so that To/Cc/Bcc name exactly ``recipients``.

    ``block`` is the message's header section (its terminating blank line, and
    anything after it, are kept as they are); ``recipients`` the envelope's.
    """
    fields, rest = split_fields(block)
    envelope = []
    seen = set()
    for r in recipients:
        key = normalize(r)
        if key not in seen:
            seen.add(key)
            envelope.append((key, r))
    wanted = {key for key, _ in envelope}

    out = []  # [name or None, raw] in order; recipient fields may be dropped below
    removed, dropped = [], []
    for name, raw in fields:
        if name is None or name.lower() not in RECIPIENT_FIELDS:
            out.append([None, raw])
            continue
        start, end = _value_span(raw)
        value = raw[start:end]
        new_value, cut = _prune_field(value, wanted)
        removed.extend((name, a) for a in cut)
        if new_value is None:
            dropped.append(name)
            continue
        stdlib = _stdlib_addresses(new_value)
        if stdlib is None or any(normalize(a) not in wanted for a in stdlib):
            # the second reading sees someone outside the envelope: the envelope wins
            dropped.append(name)
            continue
        new_value = _fix_blank_lines(new_value) if cut else new_value
        out.append([name, raw[:start] + new_value + raw[end:]])

    # readers join the values of all fields of one name before parsing them (an
    # unclosed quote or comment then runs on into the next field): check that way too
    covered = set(wanted)
    for lower in RECIPIENT_FIELDS:
        same = [f for f in out if f[0] is not None and f[0].lower() == lower]
        if not same:
            continue
        values = [_value(raw) for _, raw in same]
        found = _stdlib_addresses(b", ".join(values))
        if found is None or any(normalize(a) not in wanted for a in found):
            dropped.extend(f[0] for f in same)
            out = [f for f in out if all(f is not g for g in same)]
            continue
        mine = set()
        for value in values:
            mine.update(normalize(a) for a in addresses_in(value))
        covered -= {normalize(a) for a in found} & mine
    missing = [r for key, r in envelope if key in covered]

    if missing:
        eol = b"\n" if fields and fields[0][1].endswith(b"\n") and not fields[0][1].endswith(
            b"\r\n") else b"\r\n"
        bcc = [None, bcc_field(missing, eol)]
        # before any Bcc the message has, so that nothing before it can swallow it
        at = next((n for n, f in enumerate(out) if f[0] and f[0].lower() == "bcc"), len(out))
        if at == len(out) and out and not out[-1][1].endswith(b"\n"):
            out[-1][1] += eol
        out.insert(at, bcc)
    if not removed and not dropped and not missing:
        return Reconciled(block)
    return Reconciled(b"".join(raw for _, raw in out) + rest, tuple(removed), tuple(dropped),
                      tuple(missing))


def _value(raw):
    start, end = _value_span(raw)
    return raw[start:end]


def _fix_blank_lines(value):
    """No continuation line made of white space only (RFC 5322 3.2.2) after a cut."""
    return re.sub(rb"\r?\n[ \t]+(?=\r?\n|$)", b"", value)
