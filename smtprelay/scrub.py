"""Secret scrubbing, written once: the forms a secret takes, token shapes, and the replacing.

The relay never puts a secret in a log line, an API answer or an exception text on
purpose; this module is the net under that rule, used by the log observers
(:mod:`smtprelay.logs`), the delivery log (the queue), the admin API's one-line
reasons and the providers.  A secret is replaced by ``[redacted]`` in every form it
takes on the way (:func:`secret_forms`): as is, base64 (at any of the three
alignments: an AUTH PLAIN payload holds the password after the user name),
URL-encoded (a token request's form body) and JSON-escaped.  A provider that quotes
back what it was sent puts them in its answer.

* :func:`scrub` - a text without the given secrets, in all their forms;
* :func:`redact` - a text without exactly the given strings (longest first is the
  caller's order: :func:`forms_of` gives it);
* :func:`scrub_tokens` - a text without anything shaped like an OAuth bearer,
  access or refresh token (Google's ``ya29.`` / ``1//0``), known or not;
* :func:`set_secrets` / :func:`scrub_configured` - the process-wide set of the
  configured secrets (set when a configuration is loaded), for the log observers
  and the delivery log.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

REDACTED = "[redacted]"
MIN_BASE64_CORE = 8  # shorter runs of base64 would match text by chance
MIN_CONFIGURED_SECRET = 4  # shorter configured values would redact ordinary words

_TOKENISH = re.compile(r"(?i)(bearer\s+)\S+|\bya29\.[\w.\-~+/=]+|\b1//0[\w.\-~+/=]+")

_configured: list[str] = []


def secret_forms(value: str) -> set[str]:
    """``value`` and the ways it is written on the wire (see the module docstring)."""
    raw = value.encode("utf-8")
    found = {value, base64.b64encode(raw).decode("ascii").rstrip("="),
             quote_plus(value), quote(value), quote(value, safe=""), json.dumps(value)[1:-1]}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw).decode("ascii")
        # only the 4-character groups made of the value's bytes alone: the same
        # whatever precedes or follows it
        start = 4 if offset else 0
        end = len(encoded) - (4 if (offset + len(raw)) % 3 else 0)
        if end - start >= MIN_BASE64_CORE:
            found.add(encoded[start:end])
    return found


def forms_of(values: Iterable[str | None], min_length: int = 1) -> list[str]:
    """Every form of every value (empty ones and those under ``min_length`` skipped),
    longest first: a form inside a longer one must not break the longer one up."""
    found: set[str] = set()
    for value in values:
        if value and len(value) >= min_length:
            found.update(secret_forms(value))
    return sorted(found, key=len, reverse=True)


def redact(text: str, forms: Iterable[str | None]) -> str:
    """``text`` with each of ``forms`` (literal strings, in the given order) replaced."""
    for form in forms:
        if form and form in text:
            text = text.replace(form, REDACTED)
    return text


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` without any of ``secrets``, in any of their forms."""
    return redact(text, forms_of(secrets))


def scrub_tokens(text: str) -> str:
    """``text`` without anything shaped like an access or refresh token."""
    return _TOKENISH.sub(lambda m: (m.group(1) or "") + REDACTED, text)


def set_secrets(values: Iterable[str | None]) -> None:
    """The configured secrets that :func:`scrub_configured` removes (called when a
    configuration is loaded)."""
    _configured[:] = forms_of(values, MIN_CONFIGURED_SECRET)


def scrub_configured(text: str) -> str:
    """``text`` without any configured secret, in any of its forms."""
    return redact(text, _configured)
