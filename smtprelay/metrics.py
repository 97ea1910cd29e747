"""Prometheus metrics of one relay process (prometheus-client, own registry).

Counters and histograms are fed by the SMTP side and the queue runner as
things happen; gauges that need the store (queue depth) or the provider
(credential days left) are refreshed by the service before each scrape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from smtprelay.model import Claim, Envelope, Outcome, Transition
    from smtprelay.store import Stats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
PROVIDER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, provider_type: str, clock: IReactorTime) -> None:
        self.provider_type = provider_type
        self.clock = clock
        self.started = clock.seconds()
        r = self.registry = CollectorRegistry()
        self.received_messages = Counter(
            "smtprelay_received_messages", "Messages accepted over SMTP", ["provider"], registry=r)
        self.received_bytes = Counter(
            "smtprelay_received_bytes", "Bytes of accepted messages", ["provider"], registry=r)
        self.sent_messages = Counter(
            "smtprelay_sent_messages", "Messages delivered", ["provider"], registry=r)
        self.sent_bytes = Counter(
            "smtprelay_sent_bytes", "Bytes of delivered messages", ["provider"], registry=r)
        self.failed_messages = Counter(
            "smtprelay_failed_messages", "Messages failed permanently", ["provider"], registry=r)
        self.failed_bytes = Counter(
            "smtprelay_failed_bytes", "Bytes of messages failed permanently", ["provider"],
            registry=r)
        self.attempts = Counter(
            "smtprelay_delivery_attempts", "Delivery attempts by outcome",
            ["provider", "outcome"], registry=r)
        self.accept_seconds = Histogram(
            "smtprelay_smtp_accept_latency_seconds",
            "From the final dot to the SMTP reply", buckets=LATENCY_BUCKETS, registry=r)
        self.provider_seconds = Histogram(
            "smtprelay_provider_call_latency_seconds", "Duration of provider calls",
            ["provider"], buckets=PROVIDER_BUCKETS, registry=r)
        self.queue_depth = Gauge(
            "smtprelay_queue_depth", "Messages waiting for delivery (all instances)",
            ["status"], registry=r)
        self.credential_days = Gauge(
            "smtprelay_credential_expiry_days",
            "Days until the provider credential expires (absent when it does not)",
            ["provider"], registry=r)
        self.uptime = Gauge("smtprelay_uptime_seconds", "Seconds since this process started",
                            registry=r)
        self.sessions = Gauge("smtprelay_smtp_sessions", "Open SMTP sessions", registry=r)

    # --- fed as things happen ---------------------------------------------------

    def received(self, envelope: Envelope) -> None:
        self.received_messages.labels(self.provider_type).inc()
        self.received_bytes.labels(self.provider_type).inc(envelope.size)

    def accept_latency(self, seconds: float) -> None:
        self.accept_seconds.observe(seconds)

    def outcome(self, claim: Claim, outcome: Outcome, transition: Transition) -> None:
        from smtprelay.model import Status

        p = self.provider_type
        self.attempts.labels(p, transition.attempt.outcome).inc()
        self.provider_seconds.labels(p).observe(transition.attempt.duration_ms / 1000.0)
        if transition.status is Status.SENT:
            self.sent_messages.labels(p).inc()
            self.sent_bytes.labels(p).inc(claim.size)
        elif transition.status is Status.FAILED:
            self.failed_messages.labels(p).inc()
            self.failed_bytes.labels(p).inc(claim.size)

    # --- refreshed before a scrape -------------------------------------------------

    def refresh(self, stats: Stats | None = None, credential_days: int | None = None,
                sessions: int | None = None) -> None:
        self.uptime.set(self.clock.seconds() - self.started)
        if stats is not None:
            for status, depth in (("queued", stats.queued), ("deferred", stats.deferred),
                                  ("active", stats.active)):
                self.queue_depth.labels(status).set(depth)
        # absent, not 0, when nothing expires (0 would read "expires today")
        self.credential_days.clear()
        if credential_days is not None:
            self.credential_days.labels(self.provider_type).set(credential_days)
        if sessions is not None:
            self.sessions.set(sessions)

    def render(self) -> bytes:
        return generate_latest(self.registry)
