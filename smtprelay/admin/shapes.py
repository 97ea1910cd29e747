"""What goes over the wire: pure conversions between the relay's values and JSON.

Times: the store keeps epoch seconds, the API speaks RFC 3339 in UTC with a
``Z`` (``2026-11-23T22:40:00Z``), whole seconds.  Query strings and request
bodies are validated here, and every problem names its field, so that the
API answers ``400 {"error", "fields"}`` without touching the store.
No I/O, no clock: the caller passes ``now`` where one is needed.
"""

import datetime
import re

from smtprelay import policy
from smtprelay.scrub import scrub
from smtprelay.store._sql import DeliveryQuery, decode_cursor

STATUSES = ("queued", "deferred", "sent", "failed")
MAX_LIMIT = 500
DEFAULT_LIMIT = 50
MAX_TEXT = 320  # longest filter text (an address is at most 254 octets)
MAX_SUBJECT = 200
DEFAULT_SUBJECT = "smtprelay test message"


class ValidationError(Exception):
    """A request the API refuses with 400; ``fields`` maps a name to its problem."""

    def __init__(self, message, fields=None):
        super().__init__(message)
        self.message = message
        self.fields = dict(fields or {})


# ---------------------------------------------------------------------------
# times


def rfc3339(seconds):
    """Epoch seconds -> ``"2026-11-23T22:40:00Z"`` (None stays None)."""
    if seconds is None:
        return None
    moment = datetime.datetime.fromtimestamp(int(seconds), tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)


def parse_rfc3339(text):
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


def date_text(value):
    """A date (or None) as ``"2027-06-30"``."""
    return None if value is None else value.isoformat()


def days_left(expires, now):
    """Whole days from ``now`` (epoch seconds, UTC) until the date ``expires``."""
    if expires is None:
        return None
    if isinstance(expires, datetime.datetime):
        expires = expires.astimezone(datetime.timezone.utc).date()
    today = datetime.datetime.fromtimestamp(now, tz=datetime.timezone.utc).date()
    return (expires - today).days


# ---------------------------------------------------------------------------
# the delivery log


def _single(args, name):
    values = args.get(name)
    if values is None:
        return None
    if len(values) != 1:
        raise ValidationError("invalid query", {name: "given more than once"})
    return values[0]


def delivery_query(args):
    """Query parameters (``{name: [value, ...]}``, text) -> DeliveryQuery.

    Raises ValidationError naming every bad parameter.
    """
    fields = {}
    known = {"status", "sender", "recipient", "q", "since", "until", "limit", "cursor"}
    for name in args:
        if name not in known:
            fields[name] = "unknown parameter; known: " + ", ".join(sorted(known))
    values = {}
    for name in known:
        try:
            values[name] = _single(args, name)
        except ValidationError as e:
            fields.update(e.fields)
            values[name] = None
    status = values["status"]
    if status is not None and status not in STATUSES:
        fields["status"] = "must be one of " + ", ".join(STATUSES)
    for name in ("sender", "recipient", "q"):
        v = values[name]
        if v is not None and len(v) > MAX_TEXT:
            fields[name] = f"at most {MAX_TEXT} characters"
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
    limit = DEFAULT_LIMIT
    if values["limit"] is not None:
        v = values["limit"]
        if not v.isdigit() or not 1 <= int(v) <= MAX_LIMIT:
            fields["limit"] = f"must be a whole number from 1 to {MAX_LIMIT}"
        else:
            limit = int(v)
    cursor = values["cursor"] or None
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except ValueError as e:
            fields["cursor"] = str(e)
    if fields:
        raise ValidationError("invalid query", fields)
    return DeliveryQuery(
        status=status,
        sender=values["sender"] or None,
        recipient=values["recipient"] or None,
        q=values["q"] or None,
        since=times.get("since"),
        until=times.get("until"),
        limit=limit,
        cursor=cursor,
    )


_TIME_KEYS = ("received_at", "finished_at", "next_attempt_at")
_ID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")


def is_delivery_id(text):
    """A ULID as the store makes them (anything else cannot name a delivery)."""
    return bool(_ID.match(text))


def delivery_json(item):
    """A delivery dict from the store -> the API's delivery (times as RFC 3339)."""
    out = dict(item)
    for key in _TIME_KEYS:
        out[key] = rfc3339(out.get(key))
    if "attempts" in out:
        out["attempts"] = [dict(a, at=rfc3339(a["at"])) for a in out["attempts"]]
    return out


# ---------------------------------------------------------------------------
# statistics


def stats_json(stats, uptime_seconds):
    """The store's stats (all instances) -> ``GET /api/stats``.

    A message in flight (``active``) counts as queued, so that received =
    sent + failed + queued + deferred; ``in_flight`` says how many of the
    queued are being attempted right now.
    """
    sent, failed = stats["sent"], stats["failed"]
    last = stats.get("last_error")
    return {
        "uptime_seconds": int(uptime_seconds),
        "received": stats["received"],
        "sent": sent,
        "failed": failed,
        "queued": stats["queued"] + stats.get("active", 0),
        "deferred": stats["deferred"],
        "in_flight": stats.get("active", 0),
        "error_rate": round(failed / (sent + failed), 4) if sent + failed else 0,
        "last_error": (
            {"message": last["message"], "at": rfc3339(last["at"]),
             "delivery_id": last["delivery_id"]} if last else None
        ),
        "oldest_pending_at": rfc3339(stats.get("oldest_pending_at")),
    }


# ---------------------------------------------------------------------------
# errors


def safe_reason(e, secrets=()):
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


def json_document(value):
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


def test_mail_request(body):
    """``{"to": "a@b.c", "subject"?: str}`` -> (to, subject)."""
    if not isinstance(body, dict):
        raise ValidationError("the body must be a JSON object", {"": "expected an object"})
    fields = {}
    for name in body:
        if name not in ("to", "subject"):
            fields[name] = "unknown field"
    to = body.get("to")
    if to is None or to == "":
        fields["to"] = "required: the address to send the test message to"
    elif not isinstance(to, str):
        fields["to"] = "must be a string"
    elif (any(c in to for c in "\r\n\0<>, ") or any(ord(c) > 127 for c in to)
          or len(to) > 254 or not policy.is_mailbox(to)):
        fields["to"] = "is not an e-mail address"
    subject = body.get("subject")
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


def _user_password(value):
    """The password part of an ``[smtp.auth] users`` entry (plain, secret or table)."""
    if isinstance(value, dict) and ("password" in value or "allowed" in value):
        return value.get("password")
    return value


def carry_user_passwords(new, current):
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
