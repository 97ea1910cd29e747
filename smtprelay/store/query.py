"""How the delivery log is asked for: the query value and its page cursor.

Public so that the admin API can build and validate a query without reaching
into the store's SQL.  A cursor is the id of the last delivery of a page,
URL-safe base64 without padding; only ids (ULIDs) decode.
"""

from __future__ import annotations

import base64

import attr

MAX_CURSOR_ID = 64  # longer than any id the store makes


@attr.frozen
class DeliveryQuery:
    """Filters of ``IStore.deliveries`` (all optional, combined with AND)."""

    status: str | None = None  # "queued" (active included), "deferred", "sent", "failed"
    sender: str | None = None  # part of the sender or original sender, any case
    recipient: str | None = None  # part of a recipient's address, any case
    q: str | None = None  # part of the subject or the Message-ID, any case
    since: float | None = None  # received at or after
    until: float | None = None  # received before
    limit: int = 50
    cursor: str | None = None  # from the previous page


def encode_cursor(message_id: str) -> str:
    """The cursor that continues after ``message_id``."""
    return base64.urlsafe_b64encode(message_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """-> the message id in ``cursor``; ValueError when it is not one of ours."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except Exception:
        raise ValueError("not a cursor from this API") from None
    if not text.isalnum() or len(text) > MAX_CURSOR_ID:
        raise ValueError("not a cursor from this API")
    return text
