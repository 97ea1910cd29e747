"""Who receives a message: the envelope decides (rule 1 of ``providers.md``); pure, no I/O.

APIs that take a whole RFC 5322 message (Gmail's ``messages.send``, Graph's MIME
``sendMail``) deliver to the addresses in ``To``, ``Cc`` and ``Bcc`` and know
nothing of the SMTP envelope.  The relay's rule is the opposite: exactly the RCPT
TO addresses receive the message, each once.  The rule is :class:`Envelope`:
the envelope's recipients deduplicated, whether a header address is one of
them, and which of them no header names (those go in a Bcc).  The headers are
read as the APIs read them by one reader, :func:`read_addresses` (the standard
library's ``getaddresses``).  The rule is applied in two forms:

* :func:`reconcile` (Gmail) edits the header block with the smallest change:

  - an envelope recipient no recipient header names is added in one new ``Bcc:``
    field (the API removes Bcc on delivery, so the other recipients never see it);
  - an address in ``To``/``Cc``/``Bcc`` that is not an envelope recipient is cut
    out of its field, the bytes of everything else in the field kept as they are
    (display names, comments, encoded words, 8-bit text, groups, folding); a field
    left with nothing in it is dropped;
  - a field in which :func:`read_addresses` (close to what the API's own parser
    sees) still finds an outside address is dropped whole: for the rare header
    too broken to edit, the envelope wins over the appearance.

  Every other byte of the block, and the order of its fields, is unchanged.
  The cutting uses the tolerant address-list reader below, which keeps byte
  positions (the standard library's does not).

* :func:`plan_recipients` (Graph) leaves the bytes alone and says who receives:
  the headers' addresses when they name nobody outside the envelope (plus a
  Bcc for the envelope-only ones), else an explicit list of recipients for
  the API to use instead of the headers (:class:`RecipientPlan`).

The two forms compare addresses differently, on purpose: :func:`reconcile`
by :func:`normalize` (case, quotes and IDNA undone: the header keeps its own
spelling of a kept address), :func:`plan_recipients` by lower case only
(:func:`graph_key`), so that an address Graph reads from the headers is the
envelope's up to case, or the recipients are set explicitly from the envelope.
"""

from __future__ import annotations

import codecs
import email.utils
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attr

RECIPIENT_FIELDS = ("to", "cc", "bcc")
VISIBLE_FIELDS = ("to", "cc")

_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_WS = b" \t\r\n"
_ENCODED_WORD = re.compile(rb"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
_ATOM_STOP = frozenset(b' \t\r\n"(<[,:;')
_ROUTE = re.compile(rb"\s*@[^:<>\"]*:")
_FOLD_AT = 76


# --- the rule ------------------------------------------------------------------------


def normalize(address: str | bytes) -> str:
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


def graph_key(address: str) -> str:
    """Graph's comparison: lower case, nothing else (see the module's docstring)."""
    return address.lower()


@attr.frozen
class Envelope:
    """The envelope's recipients, each once (its first spelling kept), and how to compare."""

    recipients: tuple[tuple[str, str], ...]  # (key, address as given), in envelope order
    key: Callable[[str], str] = normalize
    keys: frozenset[str] = attr.field(init=False)

    @keys.default
    def _keys(self) -> frozenset[str]:
        return frozenset(k for k, _ in self.recipients)

    @classmethod
    def of(cls, recipients: Iterable[str], key: Callable[[str], str] = normalize) -> Envelope:
        seen: dict[str, str] = {}
        for address in recipients:
            seen.setdefault(key(address), address)
        return cls(tuple(seen.items()), key)

    def wants(self, address: str) -> bool:
        """Is ``address`` one of the envelope's recipients?"""
        return self.key(address) in self.keys

    def missing(self, named: Iterable[str]) -> tuple[str, ...]:
        """The recipients (as given) whose keys are not among ``named``: they go in a Bcc."""
        found = set(named)
        return tuple(address for k, address in self.recipients if k not in found)


def read_addresses(text: str) -> list[tuple[str, str]]:
    """(display name, address) of each mailbox in a field's value, as the APIs read them.

    The one reading of "what the API sees" (``email.utils.getaddresses``); the
    callers decide how the bytes become text.
    """
    return email.utils.getaddresses([text])


# --- the explicit form (Graph) ----------------------------------------------------------


@attr.frozen
class Address:
    """A mailbox as a header names it: its address and display name (decoded)."""

    address: str
    name: str = ""


@attr.frozen
class HeaderRecipients:
    to: tuple[Address, ...] = ()
    cc: tuple[Address, ...] = ()
    bcc: tuple[Address, ...] = ()


@attr.frozen
class RecipientPlan:
    """Who receives, and how the API is told.

    ``explicit``: the headers name someone outside the envelope, so the
    recipients must be set explicitly (``to``/``cc``/``bcc``) rather than read
    from the headers.  Otherwise ``add_bcc`` are the envelope recipients the
    headers do not name, added as a Bcc header (the API removes it).
    """

    explicit: bool
    add_bcc: tuple[str, ...]
    to: tuple[Address, ...]  # for the explicit form
    cc: tuple[Address, ...]
    bcc: tuple[Address, ...]
    dropped: tuple[str, ...]  # header addresses outside the envelope: they receive nothing

    @property
    def differ(self) -> bool:
        """Are the recipients other than the headers' (they must then be set)?"""
        return self.explicit or bool(self.add_bcc)


def plan_recipients(recipients: Iterable[str], headers: HeaderRecipients) -> RecipientPlan:
    """The :class:`RecipientPlan` that delivers to exactly the envelope ``recipients``.

    Visible recipients stay those of the headers (To, Cc) that are in the
    envelope, each once; every other envelope recipient is in Bcc.
    """
    envelope = Envelope.of(recipients, graph_key)
    named: set[str] = set()
    dropped: dict[str, str] = {}
    kept: list[list[Address]] = [[], [], []]
    for listed, out in zip((headers.to, headers.cc, headers.bcc), kept):
        for a in listed:
            key = envelope.key(a.address)
            if key not in envelope.keys:
                dropped.setdefault(key, a.address)
            elif key not in named:
                named.add(key)
                out.append(Address(a.address, a.name))
    add_bcc = envelope.missing(named)
    to, cc, bcc = kept
    bcc.extend(Address(a) for a in add_bcc)
    return RecipientPlan(explicit=bool(dropped), add_bcc=add_bcc, to=tuple(to), cc=tuple(cc),
                         bcc=tuple(bcc), dropped=tuple(dropped.values()))


# --- a tolerant RFC 5322 address-list reader that keeps byte positions ----------------


@attr.frozen
class _Token:
    kind: str  # ws | comment | quoted | angle | literal | special | atom
    start: int
    end: int


def _tokens(value: bytes, start: int = 0, end: int | None = None) -> list[_Token]:
    """Tokens of ``value[start:end]``; never fails (an unclosed construct runs to the end)."""
    end = len(value) if end is None else end
    out = []
    i = start
    while i < end:
        kind, j = _token_at(value, i, end)
        out.append(_Token(kind, i, j))
        i = j
    return out


def _token_at(value: bytes, i: int, end: int) -> tuple[str, int]:
    """(kind, end) of the token that starts at ``value[i]``."""
    c = value[i]
    if c in _WS:
        j = i
        while j < end and value[j] in _WS:
            j += 1
        return "ws", j
    if c == 0x22:  # "
        return "quoted", _skip_quoted(value, i + 1, end, 0x22)
    if c == 0x28:  # (
        return "comment", _comment_end(value, i, end)
    if c == 0x3C:  # <
        return "angle", _angle_end(value, i, end)
    if c == 0x5B:  # [
        return "literal", _skip_quoted(value, i + 1, end, 0x5D)
    if c in b",:;":
        return "special", i + 1
    return "atom", _atom_end(value, i, end)


def _comment_end(value: bytes, i: int, end: int) -> int:
    """Past the comment at ``i`` (nested comments, quoted pairs)."""
    j, depth = i + 1, 1
    while j < end and depth:
        d = value[j]
        if d == 0x5C:  # backslash
            j += 2
            continue
        depth += (d == 0x28) - (d == 0x29)
        j += 1
    return min(j, end)


def _angle_end(value: bytes, i: int, end: int) -> int:
    """Past the ``<...>`` at ``i`` (a quoted string inside may hold a ``>``)."""
    j = i + 1
    while j < end and value[j] != 0x3E:
        if value[j] == 0x22:
            j = _skip_quoted(value, j + 1, end, 0x22)
            continue
        if value[j] == 0x5C:
            j += 1
        j += 1
    return min(j + 1, end)


def _atom_end(value: bytes, i: int, end: int) -> int:
    """Past the atom at ``i``; an encoded word is one piece, whatever it holds."""
    m = _ENCODED_WORD.match(value, i, end) if value.startswith(b"=?", i) else None
    j = m.end() if m else i + 1
    while j < end and value[j] not in _ATOM_STOP:
        if value.startswith(b"=?", j):
            m = _ENCODED_WORD.match(value, j, end)
            if m:
                j = m.end()
                continue
        j += 1
    return j


def _skip_quoted(value: bytes, i: int, end: int, close: int) -> int:
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
    members: tuple[_Mailbox, ...]


_Item = _Mailbox | _Group


def _significant(tokens: Sequence[_Token]) -> list[_Token]:
    return [t for t in tokens if t.kind != "ws"]


def _address_of(value: bytes, tokens: Sequence[_Token]) -> bytes:
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


def _mailbox(value: bytes, tokens: Sequence[_Token]) -> _Mailbox | None:
    sig = _significant(tokens)
    if not sig:
        return None
    return _Mailbox(sig[0].start, sig[-1].end, _address_of(value, sig))


def _is_special(value: bytes, token: _Token, char: int) -> bool:
    return token.kind == "special" and value[token.start] == char


def _parse_list(value: bytes, tokens: list[_Token], i: int,
                in_group: bool) -> tuple[list[_Item], int]:
    """Items of an address list from ``tokens[i:]`` -> (items, index after).

    In a group the list ends at ``;`` (the index then points at it).
    """
    items: list[_Item] = []
    current: list[_Token] = []
    group: _Group | None = None  # the group just closed, to which trailing CFWS belongs
    while i < len(tokens):
        t = tokens[i]
        if _is_special(value, t, 0x2C):  # ,
            if group is None:
                m = _mailbox(value, current)
                if m is not None:
                    items.append(m)
            current, group = [], None
            i += 1
            continue
        if in_group and _is_special(value, t, 0x3B):  # ;
            break
        if (not in_group and group is None and _is_special(value, t, 0x3A)
                and not any(c.kind == "angle" for c in current)):  # :
            group, i = _group(value, tokens, i, current)
            items.append(group)
            current = []
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


def _group(value: bytes, tokens: list[_Token], i: int,
           display: list[_Token]) -> tuple[_Group, int]:
    """The group whose colon is ``tokens[i]`` -> (group, index after its semicolon)."""
    colon = tokens[i]
    sig = _significant(display)
    start = sig[0].start if sig else colon.start
    members, j = _parse_list(value, tokens, i + 1, True)
    if j < len(tokens):  # at the semicolon
        members_end, end = tokens[j].start, tokens[j].end
        j += 1
    else:  # no semicolon: the group runs to the end of the field
        members_end = end = tokens[-1].end
    # a colon inside a group is not a group: the members are all mailboxes
    mailboxes = tuple(m for m in members if isinstance(m, _Mailbox))
    return _Group(start, end, colon.end, members_end, mailboxes), j


def parse_address_list(value: bytes) -> list[_Item]:
    """Top-level items (mailboxes and groups, with byte spans) of a field value."""
    items, _ = _parse_list(value, _tokens(value), 0, False)
    return items


def addresses_in(value: bytes) -> list[bytes]:
    """Every addr-spec in a field value (group members included), as written."""
    out: list[bytes] = []
    for item in parse_address_list(value):
        if isinstance(item, _Group):
            out.extend(m.address for m in item.members)
        else:
            out.append(item.address)
    return [a for a in out if a]


# --- rebuilding a list without some items ---------------------------------------------


def _rebuild(value: bytes, start: int, end: int, items: Sequence[_Item],
             keep: Callable[[Any], bool], text_of: Callable[[Any], bytes]) -> bytes:
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


def _prune_field(value: bytes, wanted: frozenset[str]) -> tuple[bytes | None, list[str]]:
    """(the value without addresses outside ``wanted``, or None to drop the field;
    [the addresses removed, as written])."""
    items = parse_address_list(value)
    removed: list[str] = []
    keep: dict[int, bool] = {}

    def decide(mailbox: _Mailbox) -> bool:
        # an item without an address (a lone comment) delivers to nobody: it stays
        ok = not mailbox.address or normalize(mailbox.address) in wanted
        if not ok:
            removed.append(mailbox.address.decode("utf-8", "replace"))
        keep[id(mailbox)] = ok
        return ok

    texts: dict[int, bytes] = {}
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


# --- the header block (Gmail) -------------------------------------------------------------


@attr.frozen
class Reconciled:
    """The header block after :func:`reconcile`, and what was changed."""

    block: bytes
    removed: tuple[tuple[str, str], ...] = ()  # (field name as written, address) cut out
    dropped: tuple[str, ...] = ()  # field names (as written) dropped whole
    added_bcc: tuple[str, ...] = ()  # envelope recipients added in a new Bcc field

    @property
    def changed(self) -> bool:
        return bool(self.removed or self.dropped or self.added_bcc)

    @property
    def visible_changed(self) -> bool:
        """True when To or Cc changed (what the recipients can see)."""
        return any(name.lower() in VISIBLE_FIELDS for name, _ in self.removed) or any(
            name.lower() in VISIBLE_FIELDS for name in self.dropped)

    def describe(self) -> str:
        """One line for the log."""
        parts = []
        by_field: dict[str, list[str]] = {}
        for name, address in self.removed:
            by_field.setdefault(name, []).append(address)
        for name, addresses in by_field.items():
            parts.append(f"removed {', '.join(addresses)} from {name}")
        for name in self.dropped:
            parts.append(f"dropped a {name} field")
        if self.added_bcc:
            parts.append(f"added Bcc {', '.join(self.added_bcc)}")
        return "; ".join(parts) or "unchanged"


_Field = tuple[str | None, bytes]


def split_fields(block: bytes) -> tuple[list[_Field], bytes]:
    """(fields, rest): each field ``(name or None, raw bytes)`` with its line ends;
    ``rest`` starts at the blank line ending the block (``b""`` without one).

    ``b"".join(raw for _, raw in fields) + rest == block`` always holds.
    """
    fields: list[_Field] = []
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


def _value_span(raw: bytes) -> tuple[int, int]:
    """(start, end) of a field's value: after the colon, before its final line end."""
    start = raw.index(b":") + 1
    end = len(raw)
    if raw.endswith(b"\r\n"):
        end -= 2
    elif raw.endswith(b"\n"):
        end -= 1
    return start, end


def _value(raw: bytes) -> bytes:
    start, end = _value_span(raw)
    return raw[start:end]


def _api_addresses(value: bytes) -> list[str] | None:
    """What :func:`read_addresses` reads in a value (unfolded, as Gmail-like parsers see
    it): addresses with an ``@``; None when it cannot read it."""
    text = re.sub(rb"\r?\n(?=[ \t])", b"", value).decode("utf-8", "surrogateescape").strip()
    try:
        pairs = read_addresses(text)
    except Exception:  # a parser bug must not hide an address: treat as unreadable
        return None
    return [a for _, a in pairs if "@" in a]


def _outsider_in(envelope: Envelope, value: bytes) -> bool:
    """Does the API's reading of ``value`` find someone outside the envelope (or fail)?"""
    found = _api_addresses(value)
    return found is None or any(not envelope.wants(a) for a in found)


def bcc_field(addresses: Sequence[str], eol: bytes = b"\r\n") -> bytes:
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


# [name or None, raw]: a list, so that a line end can be added to the last field
_Out = list[list[Any]]


def reconcile(block: bytes, recipients: Iterable[str]) -> Reconciled:
    """The header block ``block`` rewritten so that To/Cc/Bcc name exactly ``recipients``.

    ``block`` is the message's header section (its terminating blank line, and
    anything after it, are kept as they are); ``recipients`` the envelope's.
    """
    fields, rest = split_fields(block)
    envelope = Envelope.of(recipients)
    out, removed, dropped = _prune_fields(fields, envelope)
    named = _check_joined(out, envelope, dropped)
    missing = envelope.missing(named)
    if missing:
        _insert_bcc(out, fields, missing)
    if not removed and not dropped and not missing:
        return Reconciled(block)
    return Reconciled(b"".join(raw for _, raw in out) + rest, tuple(removed), tuple(dropped),
                      missing)


def _prune_fields(fields: list[_Field],
                  envelope: Envelope) -> tuple[_Out, list[tuple[str, str]], list[str]]:
    """(fields with outside addresses cut, (name, address) cut, names of fields dropped)."""
    out: _Out = []
    removed: list[tuple[str, str]] = []
    dropped: list[str] = []
    for name, raw in fields:
        if name is None or name.lower() not in RECIPIENT_FIELDS:
            out.append([None, raw])
            continue
        start, end = _value_span(raw)
        new_value, cut = _prune_field(raw[start:end], envelope.keys)
        removed.extend((name, a) for a in cut)
        if new_value is None or _outsider_in(envelope, new_value):
            # nothing left, or the second reading sees someone outside: the envelope wins
            dropped.append(name)
            continue
        new_value = _fix_blank_lines(new_value) if cut else new_value
        out.append([name, raw[:start] + new_value + raw[end:]])
    return out, removed, dropped


def _check_joined(out: _Out, envelope: Envelope, dropped: list[str]) -> set[str]:
    """Drop (from ``out``, named in ``dropped``) the fields of a name whose joined values
    read with someone outside; the keys of the envelope recipients the rest name.

    Readers join the values of all fields of one name before parsing them (an
    unclosed quote or comment then runs on into the next field): check that way too.
    """
    named: set[str] = set()
    for lower in RECIPIENT_FIELDS:
        same = [f for f in out if f[0] is not None and f[0].lower() == lower]
        if not same:
            continue
        values = [_value(raw) for _, raw in same]
        found = _api_addresses(b", ".join(values))
        if found is None or any(not envelope.wants(a) for a in found):
            dropped.extend(f[0] for f in same)
            out[:] = [f for f in out if all(f is not g for g in same)]
            continue
        mine = {normalize(a) for value in values for a in addresses_in(value)}
        named |= {normalize(a) for a in found} & mine
    return named


def _insert_bcc(out: _Out, fields: list[_Field], missing: Sequence[str]) -> None:
    """Put a Bcc naming ``missing`` in ``out``, in the line ends the block uses."""
    first = fields[0][1] if fields else b""
    eol = b"\n" if first.endswith(b"\n") and not first.endswith(b"\r\n") else b"\r\n"
    # before any Bcc the message has, so that nothing before it can swallow it
    at = next((n for n, f in enumerate(out) if f[0] and f[0].lower() == "bcc"), len(out))
    if at == len(out) and out and not out[-1][1].endswith(b"\n"):
        out[-1][1] += eol
    out.insert(at, [None, bcc_field(missing, eol)])


def _fix_blank_lines(value: bytes) -> bytes:
    """No continuation line made of white space only (RFC 5322 3.2.2) after a cut."""
    return re.sub(rb"\r?\n[ \t]+(?=\r?\n|$)", b"", value)
