"""Every warning an administrator should see, decided in one place.

:func:`collect` is pure: it takes a :class:`Snapshot` (what the provider, the
queue runner, the store's statistics and the AUTH lockout tracker say at one
moment) and returns :class:`Warning` values.  The same list feeds
``/api/status``, the web page's banners and the log (``monitor.py`` logs a
warning when its ``code`` appears).  Thresholds are module constants.
"""

from __future__ import annotations

import datetime

import attr

from smtprelay.admin.shapes import days_left, rfc3339

OLD_MESSAGE_SECONDS = 3600.0  # a message waiting longer than this is worth a warning
GROWTH_WINDOW = 600.0  # compare the queue with how it was at least this long ago
GROWTH_MIN = 50  # ... and warn when it grew by this many messages ...
LOCKOUT_WINDOW = 3600.0  # AUTH lockouts counted over the last hour


@attr.frozen
class Warning:
    """One warning: ``code`` is stable (for logging once), ``message`` is for people."""

    code: str
    message: str

    def __str__(self) -> str:
        return self.message


@attr.frozen
class Snapshot:
    now: float
    provider_type: str = ""
    credential_expires: datetime.date | None = None  # a datetime is a date too
    credential_problem: str | None = None
    secret_warning_days: int = 30
    provider_warnings: tuple[str, ...] = ()  # from provider.warnings()
    provider_failing: tuple[float, str] | None = None  # (since, detail) from the queue runner
    pending: int = 0  # queued + deferred + in flight, all instances
    oldest_pending_at: float | None = None
    pending_history: tuple[tuple[float, int], ...] = ()  # ((time, pending), ...) oldest first
    lockouts: tuple[tuple[float, str], ...] = ()  # ((time, address), ...) of AUTH lockouts


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def credential(s: Snapshot) -> list[Warning]:
    out = []
    if s.credential_problem:
        out.append(Warning("credential-rejected",
                           f"The {s.provider_type} credential is not accepted: "
                           f"{s.credential_problem}"))
    left = days_left(s.credential_expires, s.now)
    if left is not None:
        expires = s.credential_expires
        if isinstance(expires, datetime.datetime):
            expires = expires.date()
        if left < 0:
            out.append(Warning("credential-expired",
                               f"The {s.provider_type} credential expired on {expires} "
                               f"({_plural(-left, 'day')} ago): deliveries fail until it "
                               "is renewed"))
        elif left <= s.secret_warning_days:
            when = "today" if left == 0 else f"in {_plural(left, 'day')}"
            out.append(Warning("credential-expiring",
                               f"The {s.provider_type} credential expires on {expires} "
                               f"({when}): renew it before then"))
    return out


def provider(s: Snapshot) -> list[Warning]:
    # the same text twice is one warning
    out = [Warning(f"provider:{text}", text) for text in dict.fromkeys(s.provider_warnings)
           if text]
    if s.provider_failing is not None:
        since, detail = s.provider_failing
        out.append(Warning("provider-failing",
                           f"Deliveries through {s.provider_type} are failing since "
                           f"{rfc3339(since)}: {detail}"))
    return out


def queue(s: Snapshot) -> list[Warning]:
    out = []
    if s.oldest_pending_at is not None and s.now - s.oldest_pending_at > OLD_MESSAGE_SECONDS:
        hours = (s.now - s.oldest_pending_at) / 3600.0
        out.append(Warning("queue-old",
                           f"{_plural(s.pending, 'message')} waiting for delivery; the oldest "
                           f"since {rfc3339(s.oldest_pending_at)} ({hours:.1f} hours)"))
    then = None
    for at, pending in s.pending_history:
        if s.now - at >= GROWTH_WINDOW:
            then = (at, pending)
    if then is not None:
        at, before = then
        if s.pending - before >= max(GROWTH_MIN, before):
            minutes = int((s.now - at) // 60)
            out.append(Warning("queue-growing",
                               f"The queue is growing: {_plural(s.pending, 'message')} "
                               f"waiting, up from {before} {minutes} minutes ago"))
    return out


def lockouts(s: Snapshot) -> list[Warning]:
    recent = [(t, a) for t, a in s.lockouts if s.now - t <= LOCKOUT_WINDOW]
    if not recent:
        return []
    addresses = sorted({a for _, a in recent})
    shown = ", ".join(addresses[:5]) + (" and others" if len(addresses) > 5 else "")
    return [Warning("auth-lockouts",
                    f"{_plural(len(recent), 'SMTP AUTH lockout')} in the last hour "
                    f"(too many failed logins from {shown})")]


def collect(snapshot: Snapshot) -> list[Warning]:
    """-> [Warning] for ``snapshot``, most urgent first."""
    return credential(snapshot) + provider(snapshot) + queue(snapshot) + lockouts(snapshot)
