"""What happens after an attempt: retry schedule, expiry, per-recipient bookkeeping.

Pure: given the claim, the provider's outcome and the time, :func:`decide`
returns the :class:`~smtprelay.model.Transition` the store writes.  No I/O,
no clock of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from smtprelay.model import Attempt, Claim, Outcome, Result, Status, Transition
from smtprelay.units import format_duration


def retry_wait(retry: Sequence[float], attempts_made: int) -> float:
    """The wait after the ``attempts_made``-th failed attempt (1-based); the
    last entry of ``retry`` repeats."""
    return retry[min(max(attempts_made, 1), len(retry)) - 1]


def _summary(results: Mapping[str, tuple[Result, str]]) -> str:
    parts = []
    for address, (_result, detail) in results.items():
        parts.append(f"{address}: {detail}")
    return "; ".join(parts)


def decide(claim: Claim, outcome: Outcome, now: float, retry: Sequence[float], max_age: float,
           duration_ms: int = 0, instance: str = "") -> Transition:
    """-> Transition for ``claim`` after ``outcome`` at ``now``.

    ``retry`` is the tuple of waits (seconds), ``max_age`` the age at which a
    message that still fails temporarily fails for good.  Direct-mode
    messages are never retried here: their client was told 4xx and retries.
    """
    results = {a: outcome.result_for(a) for a in claim.recipients}
    sent = [a for a, (r, _) in results.items() if r is Result.SENT]
    temporary = {a: v for a, v in results.items() if v[0] is Result.TEMPORARY}
    permanent = {a: v for a, v in results.items() if v[0] is Result.PERMANENT}
    attempts_made = claim.attempts + 1

    if outcome.recipients and len(set(r for r, _ in results.values())) > 1:
        label = "partial"
        detail = f"{len(sent)} of {len(results)} recipients accepted; " + _summary(
            {**temporary, **permanent}
        )
    else:
        label = str(outcome.result)
        detail = outcome.detail
    if outcome.ambiguous and temporary:
        # the provider may have taken the message (its answer was lost): the log says so,
        # as it explains a message that arrives twice (at-least-once)
        label = "ambiguous"

    def attempt(label: str = label, detail: str = detail) -> Attempt:
        return Attempt(now, label, detail, duration_ms, instance)

    if not temporary and not permanent:
        return Transition(Status.SENT, None, attempt(), results,
                          provider_id=outcome.provider_id)
    if not temporary:
        error = detail if not sent else f"delivered to {len(sent)} of {len(results)}; {detail}"
        return Transition(Status.FAILED, None, attempt(), results, error=error,
                          provider_id=outcome.provider_id)

    if claim.mode == "direct":
        # the client was told 4xx and sends again; its recipients stay pending so
        # that an admin's retry can still deliver this copy
        return Transition(
            Status.FAILED, None, attempt(), results,
            error=f"temporary failure reported to the SMTP client (direct mode): {detail}",
        )

    deadline = claim.age_from + max_age
    if now >= deadline:
        expired = {a: (Result.PERMANENT, f"expired: {d}") for a, (_, d) in temporary.items()}
        error = (f"gave up after {attempts_made} attempts over "
                 f"{format_duration(max_age)} (delivery.max_age); last error: {detail}")
        if outcome.ambiguous:
            error += " (ambiguous: that last attempt may have delivered it)"
        return Transition(Status.FAILED, None, attempt("expired", error),
                          {**results, **expired}, error=error)

    next_at = now + retry_wait(retry, attempts_made)
    if outcome.not_before is not None:
        next_at = max(next_at, outcome.not_before)
    # one last attempt at the deadline rather than none
    next_at = min(next_at, deadline)
    return Transition(Status.DEFERRED, next_at, attempt(), results, error=detail,
                      provider_id=outcome.provider_id)
