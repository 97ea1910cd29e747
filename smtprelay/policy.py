"""Who may send what, from where: pure functions over addresses, no I/O.

Sender patterns (``sender.allowed`` and a user's ``allowed``):

- ``"noreply@company.com"``: that address (case-insensitive);
- ``"@company.com"`` or ``"*@company.com"``: any address at company.com;
- ``"*.company.com"``: any address at a subdomain of company.com;
- ``"*"``: any address (an extension, for trials and closed networks).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Sequence

import attr

# RFC 5321 dot-string or quoted local part, a domain or an address literal.
# Deliberately plain: what a relay must accept from legacy applications, and
# nothing that could smuggle a line ending, a NUL or a second address.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\xff]+"
_LOCAL = rf'(?:{_ATOM}(?:\.{_ATOM})*|"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\x20-\x7e])*")'
_LABEL = r"[A-Za-z0-9\x80-\xff](?:[A-Za-z0-9\-\x80-\xff]*[A-Za-z0-9\x80-\xff])?"
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})*\.?|\[[A-Za-z0-9:.]+\])"
_MAILBOX = re.compile(rf"{_LOCAL}@{_DOMAIN}")
_DOMAIN_RE = re.compile(_DOMAIN)


def is_mailbox(address: str | bytes) -> bool:
    """True for ``local@domain`` as RFC 5321 allows it (str or bytes)."""
    if isinstance(address, bytes):
        address = address.decode("latin-1")
    return len(address) <= 320 and bool(_MAILBOX.fullmatch(address))


def split_address(address: str) -> tuple[str, str]:
    local, _, domain = address.rpartition("@")
    return local, domain.lower().rstrip(".")


@attr.frozen
class SenderPatterns:
    patterns: tuple[tuple[str, str], ...]  # (kind, value): "any", "exact", "domain", "subdomain"

    @classmethod
    def parse(cls, texts: Iterable[str]) -> SenderPatterns:
        out = []
        for text in texts:
            t = text.strip()
            if t == "*":
                out.append(("any", ""))
            elif t.startswith("*."):
                domain = t[2:]
                if not _DOMAIN_RE.fullmatch(domain):
                    raise ValueError(
                        f'"{text}" is not a pattern: "*." must be followed by a domain')
                out.append(("subdomain", domain.lower()))
            elif t.startswith(("@", "*@")):
                domain = t.split("@", 1)[1]
                if not _DOMAIN_RE.fullmatch(domain):
                    raise ValueError(f'"{text}" is not a pattern: "@" must be followed by a domain')
                out.append(("domain", domain.lower()))
            elif is_mailbox(t):
                local, domain = split_address(t)
                out.append(("exact", f"{local.lower()}@{domain}"))
            else:
                raise ValueError(
                    f'"{text}" is not an address or a pattern ("@company.com", "*.company.com")'
                )
        return cls(tuple(out))

    def matches(self, address: str | None) -> bool:
        if not address or "@" not in address:
            return False
        local, domain = split_address(address)
        for kind, value in self.patterns:
            if kind == "any":
                return True
            if kind == "exact" and f"{local.lower()}@{domain}" == value:
                return True
            if kind == "domain" and domain == value:
                return True
            if kind == "subdomain" and domain.endswith("." + value):
                return True
        return False


@attr.frozen
class SenderPolicy:
    """``sender.default`` plus ``sender.allowed``; neither set means no restriction."""

    default: str
    allowed: SenderPatterns

    @property
    def unrestricted(self) -> bool:
        return not self.default and not self.allowed.patterns

    def allows(self, address: str | None) -> bool:
        if self.unrestricted:
            return True
        if self.default and address and address.lower() == self.default.lower():
            return True
        return self.allowed.matches(address)


class Verdict(enum.Enum):
    ACCEPT = "accept"
    REWRITE = "rewrite"
    REJECT = "reject"


@attr.frozen
class SenderDecision:
    verdict: Verdict
    address: str  # the address to send as (the default when rewritten)
    reason: str = ""


def decide_sender(address: str, relay: SenderPolicy, on_disallowed: str,
                  user_allowed: SenderPatterns | None = None) -> SenderDecision:
    """May ``address`` send?  ``relay``: SenderPolicy; ``user_allowed``: the
    authenticated user's own SenderPatterns, or None.  An empty ``address``
    (``MAIL FROM:<>``) is sent as the default, so only by a user who may send
    as the default."""

    def permitted(a: str) -> bool:
        return relay.allows(a) and (user_allowed is None or user_allowed.matches(a))

    if not address:
        if relay.default and user_allowed is not None and not user_allowed.matches(relay.default):
            return SenderDecision(Verdict.REJECT, address,
                                  f"the null sender goes out as {relay.default}, "
                                  "which this user may not send as")
        return SenderDecision(Verdict.ACCEPT, relay.default)
    if permitted(address):
        return SenderDecision(Verdict.ACCEPT, address)
    if on_disallowed == "rewrite" and relay.default and permitted(relay.default):
        return SenderDecision(Verdict.REWRITE, relay.default,
                              f"{address} is not an allowed sender")
    return SenderDecision(Verdict.REJECT, address, f"{address} is not an allowed sender")


def network_allowed(host: str,
                    networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Is the client address ``host`` inside one of ``networks`` (empty: any)?"""
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
