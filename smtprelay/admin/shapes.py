"""What goes over the wire: pure conversions between the relay's values and JSON.

Times: the store keeps epoch seconds, the API speaks RFC 3339 in UTC with a
``Z`` (``2026-11-23T22:40:00Z``), whole seconds.  Query strings and request
bodies are validated here, and every problem names its field, so that the
API answers ``400 {"error", "fields"}`` without touching the store.
No I/O, no clock: the caller passes ``now`` where one is needed.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from smtprelay import policy
from smtprelay.model import Status
from smtprelay.scrub import scrub
from smtprelay.store import (
    AttemptRow,
    DeliveryQuery,
    DeliveryRow,
    InstanceRow,
    RecipientRow,
    Stats,
    decode_cursor,
)

Args = Mapping[str, Sequence[str]]  # a query string: {name: [value, ...]}

STATUSES = ("queued", "deferred", "sent", "failed")
MAX_LIMIT = 500
DEFAULT_LIMIT = 50
MAX_TEXT = 320  # longest filter text (an address is at most 254 octets)
MAX_SUBJECT = 200
DEFAULT_SUBJECT = "smtprelay test message"


class ValidationError(Exception):
    """A request the API refuses with 400; ``fields`` maps a name to its problem."""

    def __init__(self, message: str, fields: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fields = dict(fields or {})


# ---------------------------------------------------------------------------
# times


def rfc3339(seconds: float | None) -> str | None:
    """Epoch seconds -> ``"2026-11-23T22:40:00Z"`` (None stays None)."""
    if seconds is None:
        return None
    moment = datetime.datetime.fromtimestamp(int(seconds), tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)


def parse_rfc3339(text: object) -> float:
    """``"2026-11-23T22:40:00Z"`` (any offset, optional fraction) -> epoch seconds."""
    if not isinstance(text, str) or not _RFC3339.match(text):
        raise ValueError('must be an RFC 3339 time with a zone, e.g. "2026-11-23T22:40:00Z"')
    normal = text.upper().replace(" ", "T")
    if normal.endswith("Z"):
        normal = normal[:-1] + "+00:00"
    frac = re.search(r"\.(\d+)", normal)
    if frac and len(frac.group(1)) > 6:  # datetime takes microseconds at most
        normal = normal.replace(frac.group(0), "." + frac.group(1)[:6])
    try:
        return datetime.datetime.fromisoformat(normal).timestamp()
    except ValueError:
        raise ValueError(f'"{text}" is not a valid date and time') from None


def date_text(value: datetime.date | None) -> str | None:
    """A date (or None) as ``"2027-06-30"``."""
    return None if value is None else value.isoformat()


def days_left(expires: datetime.date | None, now: float) -> int | None:
    """Whole days from ``now`` (epoch seconds, UTC) until the date ``expires``."""
    if expires is None:
        return None
    if isinstance(expires, datetime.datetime):
        expires = expires.astimezone(datetime.UTC).date()
    today = datetime.datetime.fromtimestamp(now, tz=datetime.UTC).date()
    return (expires - today).days


# ---------------------------------------------------------------------------
# the delivery log


def _single(args: Args, name: str) -> str | None:
    values = args.get(name)
    if values is None:
        return None
    if len(values) != 1:
        raise ValidationError("invalid query", {name: "given more than once"})
    return values[0]


_KNOWN = ("status", "sender", "recipient", "q", "since", "until", "limit", "cursor")


def _singles(args: Args, fields: dict[str, str]) -> dict[str, str | None]:
    """Each known parameter's one value (None when absent); problems go to ``fields``."""
    for name in args:
        if name not in _KNOWN:
            fields[name] = "unknown parameter; known: " + ", ".join(sorted(_KNOWN))
    values: dict[str, str | None] = {}
    for name in _KNOWN:
        try:
            values[name] = _single(args, name)
        except ValidationError as e:
            fields.update(e.fields)
            values[name] = None
    return values


def _check_texts(values: dict[str, str | None], fields: dict[str, str]) -> None:
    status = values["status"]
    if status is not None and status not in STATUSES:
        fields["status"] = "must be one of " + ", ".join(STATUSES)
    for name in ("sender", "recipient", "q"):
        v = values[name]
        if v is not None and len(v) > MAX_TEXT:
            fields[name] = f"at most {MAX_TEXT} characters"


def _times(values: dict[str, str | None], fields: dict[str, str]) -> dict[str, float]:
    times = {}
    for name in ("since", "until"):
        v = values[name]
        if v is not None:
            try:
                times[name] = parse_rfc3339(v)
            except ValueError as e:
                fields[name] = str(e)
    if "since" in times and "until" in times and times["until"] < times["since"]:
        fields["until"] = "is before since"
    return times


def _limit(text: str | None, fields: dict[str, str]) -> int:
    if text is None:
        return DEFAULT_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        fields["limit"] = f"must be a whole number from 1 to {MAX_LIMIT}"
        return DEFAULT_LIMIT
    return int(text)


def _cursor(text: str | None, fields: dict[str, str]) -> str | None:
    cursor = text or None
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except ValueError as e:
            fields["cursor"] = str(e)
    return cursor


def delivery_query(args: Args) -> DeliveryQuery:
    """Query parameters (``{name: [value, ...]}``, text) -> DeliveryQuery.

    Raises ValidationError naming every bad parameter.
    """
    fields: dict[str, str] = {}
    values = _singles(args, fields)
    _check_texts(values, fields)
    times = _times(values, fields)
    limit = _limit(values["limit"], fields)
    cursor = _cursor(values["cursor"], fields)
    if fields:
        raise ValidationError("invalid query", fields)
    return DeliveryQuery(
        status=values["status"],
        sender=values["sender"] or None,
        recipient=values["recipient"] or None,
        q=values["q"] or None,
        since=times.get("since"),
        until=times.get("until"),
        limit=limit,
        cursor=cursor,
    )


_ID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
# the states in which a delivery waits for a next attempt (and says when)
_WAITING = (Status.QUEUED, Status.DEFERRED)


def is_delivery_id(text: str) -> bool:
    """A ULID as the store makes them (anything else cannot name a delivery)."""
    return bool(_ID.match(text))


def _recipient_json(r: RecipientRow) -> dict[str, Any]:
    return {"address": r.address, "status": r.status, "detail": r.detail}


def _attempt_json(a: AttemptRow) -> dict[str, Any]:
    return {"at": rfc3339(a.at), "outcome": a.outcome, "detail": a.detail,
            "duration_ms": a.duration_ms, "instance": a.instance}


def delivery_json(row: DeliveryRow, provider: str) -> dict[str, Any]:
    """A delivery from the store -> the API's delivery (times as RFC 3339).

    ``status`` shows a message in flight as queued (``state`` says "active");
    ``next_attempt_at`` is only given while the delivery waits for one;
    ``provider`` is the configured provider type; ``attempts`` is there when
    the store read the history (one delivery, not a page of the log).
    """
    out: dict[str, Any] = {
        "id": row.id,
        "received_at": rfc3339(row.received_at),
        "finished_at": rfc3339(row.finished_at),
        "status": str(Status.QUEUED if row.status is Status.ACTIVE else row.status),
        "state": str(row.status),
        "sender": row.sender,
        "original_sender": row.original_sender,
        "mailbox": row.mailbox,
        "recipients": [r.address for r in row.recipients],
        "recipient_status": [_recipient_json(r) for r in row.recipients],
        "header_from": row.header_from,
        "subject": row.subject,
        "message_id": row.message_id,
        "size": row.size,
        "provider": provider,
        "attempts_count": row.attempts_count,
        "next_attempt_at": rfc3339(row.next_attempt_at) if row.status in _WAITING else None,
        "error": row.error,
        "client_address": row.client_address,
        "auth_user": row.auth_user,
        "provider_id": row.provider_id,
        "mode": row.mode,
        "helo": row.helo,
    }
    if row.attempts is not None:
        out["attempts"] = [_attempt_json(a) for a in row.attempts]
    return out


# ---------------------------------------------------------------------------
# statistics and instances


def stats_json(stats: Stats, uptime_seconds: float) -> dict[str, Any]:
    """The store's stats (all instances) -> ``GET /api/stats``.

    A message in flight (``active``) counts as queued, so that received =
    sent + failed + queued + deferred; ``in_flight`` says how many of the
    queued are being attempted right now.
    """
    sent, failed = stats.sent, stats.failed
    last = stats.last_error
    return {
        "uptime_seconds": int(uptime_seconds),
        "received": stats.received,
        "sent": sent,
        "failed": failed,
        "queued": stats.queued + stats.active,
        "deferred": stats.deferred,
        "in_flight": stats.active,
        "error_rate": round(failed / (sent + failed), 4) if sent + failed else 0,
        "last_error": (
            {"message": last.message, "at": rfc3339(last.at),
             "delivery_id": last.delivery_id} if last else None
        ),
        "oldest_pending_at": rfc3339(stats.oldest_pending_at),
    }


def instance_json(row: InstanceRow, this: bool) -> dict[str, Any]:
    """An instance from the store -> one of ``/api/status``'s ``instances``;
    ``this`` says it is the process answering."""
    return {
        "id": row.id,
        "hostname": row.hostname,
        "pid": row.pid,
        "started_at": rfc3339(row.started_at),
        "heartbeat_at": rfc3339(row.heartbeat_at),
        "state": row.state,
        "version": row.version,
        "uptime_seconds": row.uptime_seconds,
        "heartbeat_age_seconds": row.heartbeat_age_seconds,
        "this": this,
    }


# ---------------------------------------------------------------------------
# errors


def safe_reason(e: BaseException | str, secrets: Iterable[str | None] = ()) -> str:
    """An exception (or a text) as one line for an answer or a log line, with every
    value of ``secrets`` replaced, in each of its forms (base64, URL-encoded...): a
    library's message, or a provider's answer, may quote what it was given."""
    text = (e if isinstance(e, str) else str(e)) or type(e).__name__
    if isinstance(e, ImportError):
        text = f"not available in this installation ({e.name or text})"
    text = scrub(text, secrets)
    lines = text.splitlines()
    return lines[0] if lines else ""


# ---------------------------------------------------------------------------
# configuration documents


def json_document(value: Any) -> Any:
    """A TOML document (dates and times inside) -> something ``json.dumps`` takes."""
    if isinstance(value, dict):
        return {k: json_document(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_document(v) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return value


# ---------------------------------------------------------------------------
# request bodies


def test_mail_request(body: object) -> tuple[str, str]:
    """``{"to": "a@b.c", "subject"?: str}`` -> (to, subject)."""
    if not isinstance(body, dict):
        raise ValidationError("the body must be a JSON object", {"": "expected an object"})
    fields = {}
    for name in body:
        if name not in ("to", "subject"):
            fields[name] = "unknown field"
    to: Any = body.get("to")  # JSON: checked below
    if to is None or to == "":
        fields["to"] = "required: the address to send the test message to"
    elif not isinstance(to, str):
        fields["to"] = "must be a string"
    elif (any(c in to for c in "\r\n\0<>, ") or any(ord(c) > 127 for c in to)
          or len(to) > 254 or not policy.is_mailbox(to)):
        fields["to"] = "is not an e-mail address"
    subject: Any = body.get("subject")
    if subject is None or subject == "":
        subject = DEFAULT_SUBJECT
    elif not isinstance(subject, str):
        fields["subject"] = "must be a string"
    elif any(c in subject for c in "\r\n\0"):
        fields["subject"] = "must be one line"
    elif len(subject) > MAX_SUBJECT:
        fields["subject"] = f"at most {MAX_SUBJECT} characters"
    if fields:
        raise ValidationError("invalid test mail request", fields)
    return to, subject


def _user_password(value: Any) -> Any:
    """The password part of an ``[smtp.auth] users`` entry (plain, secret or table)."""
    if isinstance(value, dict) and ("password" in value or "allowed" in value):
        return value.get("password")
    return value


def carry_user_passwords(new: Any, current: dict[str, Any]) -> Any:
    """``new`` with ``{"set": true}`` user passwords taken from ``current`` even when the
    entry changed form (a plain password became a table with ``allowed``, or back),
    which ``config.unredact`` alone cannot follow.  Pure: returns a new document."""
    users = (((new.get("smtp") or {}).get("auth") or {}).get("users")
             if isinstance(new, dict) else None)
    cur_users = ((current.get("smtp") or {}).get("auth") or {}).get("users") or {}
    if not isinstance(users, dict) or not isinstance(cur_users, dict):
        return new
    keep = {"set": True}
    out_users = {}
    for name, value in users.items():
        old = _user_password(cur_users.get(name))
        if old is not None and value == keep:
            value = old
        elif (old is not None and isinstance(value, dict) and value.get("password") == keep
              and ("allowed" in value or len(value) == 1)):
            value = dict(value, password=old)
        out_users[name] = value
    out = dict(new)
    out["smtp"] = dict(new["smtp"])
    out["smtp"]["auth"] = dict(new["smtp"]["auth"], users=out_users)
    return out
