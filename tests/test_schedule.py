"""The retry schedule and per-recipient bookkeeping after an attempt."""

from hypothesis import given
from hypothesis import strategies as st

from smtprelay.model import Claim, Outcome, Result, Status
from smtprelay.schedule import decide, retry_wait

RETRY = (60.0, 300.0, 900.0, 3600.0, 14400.0)
DAY = 86400.0


def claim(attempts=0, recipients=("a@x.org", "b@x.org"), age_from=0.0, mode="queue"):
    return Claim(id="M", sender="s@x.org", mailbox="s@x.org", recipients=recipients,
                 age_from=age_from, size=10, attempts=attempts, mode=mode)


def test_waits_follow_the_list_and_the_last_repeats():
    assert [retry_wait(RETRY, n) for n in range(1, 9)] == [
        60, 300, 900, 3600, 14400, 14400, 14400, 14400]


def test_sent():
    t = decide(claim(), Outcome.sent("202 Accepted", provider_id="g1"), 10, RETRY, 5 * DAY)
    assert t.status is Status.SENT and t.next_attempt_at is None
    assert t.provider_id == "g1" and t.attempt.outcome == "sent"


def test_permanent_fails_at_once():
    t = decide(claim(), Outcome.permanent("550 5.1.1 no such user"), 10, RETRY, 5 * DAY)
    assert t.status is Status.FAILED and t.error == "550 5.1.1 no such user"


def test_temporary_defers_by_schedule_or_retry_after_whichever_later():
    t = decide(claim(attempts=0), Outcome.temporary("503"), 100, RETRY, 5 * DAY)
    assert (t.status, t.next_attempt_at) == (Status.DEFERRED, 160)
    t = decide(claim(attempts=2), Outcome.temporary("503"), 100, RETRY, 5 * DAY)
    assert t.next_attempt_at == 1000
    t = decide(claim(), Outcome.temporary("429", not_before=5000), 100, RETRY, 5 * DAY)
    assert t.next_attempt_at == 5000
    t = decide(claim(), Outcome.temporary("429", not_before=110), 100, RETRY, 5 * DAY)
    assert t.next_attempt_at == 160


def test_max_age_gives_one_last_attempt_then_fails():
    t = decide(claim(attempts=30), Outcome.temporary("503"), 5 * DAY - 10, RETRY, 5 * DAY)
    assert t.status is Status.DEFERRED and t.next_attempt_at == 5 * DAY
    t = decide(claim(attempts=31), Outcome.temporary("503 again"), 5 * DAY, RETRY, 5 * DAY)
    assert t.status is Status.FAILED and t.attempt.outcome == "expired"
    assert "503 again" in t.error and "delivery.max_age" in t.error


def test_per_recipient_results():
    outcome = Outcome(Result.SENT, "250 ok", {
        "a@x.org": (Result.SENT, "250 ok"),
        "b@x.org": (Result.TEMPORARY, "451 4.2.0 try later"),
    })
    t = decide(claim(), outcome, 10, RETRY, 5 * DAY)
    assert t.status is Status.DEFERRED and t.attempt.outcome == "partial"
    assert "1 of 2 recipients accepted" in t.attempt.detail
    assert t.recipient_results["a@x.org"][0] is Result.SENT
    outcome = Outcome(Result.SENT, "250 ok", {
        "a@x.org": (Result.SENT, "250 ok"),
        "b@x.org": (Result.PERMANENT, "550 5.1.1 unknown"),
    })
    t = decide(claim(), outcome, 10, RETRY, 5 * DAY)
    assert t.status is Status.FAILED and "delivered to 1 of 2" in t.error


def test_direct_mode_never_retries():
    t = decide(claim(mode="direct"), Outcome.temporary("503"), 10, RETRY, 5 * DAY)
    assert t.status is Status.FAILED and "direct mode" in t.error
    assert t.recipient_results["a@x.org"][0] is Result.TEMPORARY


@given(st.integers(0, 50), st.floats(0, 10 * DAY), st.sampled_from(list(Result)),
       st.one_of(st.none(), st.floats(0, 20 * DAY)))
def test_a_transition_is_always_consistent(attempts, now, result, not_before):
    c = claim(attempts=attempts)
    t = decide(c, Outcome(result, "x", not_before=not_before), now, RETRY, 5 * DAY)
    if t.status is Status.DEFERRED:
        assert now < t.next_attempt_at <= 5 * DAY or t.next_attempt_at == 5 * DAY
        assert t.next_attempt_at >= min(now + 60, 5 * DAY)
    else:
        assert t.next_attempt_at is None
    assert set(t.recipient_results) == set(c.recipients)
    assert (t.status is Status.SENT) == (result is Result.SENT)


def test_an_ambiguous_outcome_is_logged_as_such():
    """A lost answer after the message went out: retried, and the log says it may have
    been delivered (what explains a duplicate)."""
    lost = Outcome.temporary("no answer within 2s", ambiguous=True)
    t = decide(claim(), lost, 10, RETRY, 5 * DAY)
    assert t.status is Status.DEFERRED and t.attempt.outcome == "ambiguous"
    t = decide(claim(attempts=3), lost, 5 * DAY, RETRY, 5 * DAY)
    assert t.status is Status.FAILED and t.attempt.outcome == "expired"
    assert t.error.endswith("(ambiguous: that last attempt may have delivered it)")
    t = decide(claim(), Outcome.temporary("503"), 10, RETRY, 5 * DAY)
    assert t.attempt.outcome == "temporary"
