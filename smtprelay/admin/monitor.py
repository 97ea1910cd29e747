"""Takes the snapshot the warnings are decided from, and logs warnings as they appear.

Every ``interval`` seconds (and whenever ``/api/status`` asks) the monitor
reads the store's statistics (all instances), the provider's credential
status and warnings, the queue runner's failure state and the AUTH lockouts,
keeps a short history of the queue depth (for "the queue is growing"), and
hands all of it to :func:`smtprelay.admin.warnings.collect`.  A warning is
logged once when it appears and once when it clears.  The clock is injected.
"""

from __future__ import annotations

import datetime
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from smtprelay.admin import warnings as warnings_
from smtprelay.scrub import scrub_configured
from smtprelay.store import Stats

if TYPE_CHECKING:
    from smtprelay.service import RelayService

log = Logger()

HISTORY_SECONDS = 3600.0


def credential_status(relay: RelayService) -> tuple[datetime.date | None, str | None]:
    """(expires, problem) of the running provider's credential.

    The provider knows best; a configured ``client_secret_expires`` stands in
    when the provider reports no date.
    """
    status = None
    try:
        status = relay.provider.credential_status()
    except Exception:
        log.failure("the provider's credential_status() failed")
    expires = getattr(status, "expires", None)
    problem = getattr(status, "problem", None)
    if expires is None:
        expires = getattr(relay.config.provider, "client_secret_expires", None)
    return expires, problem


class Monitor(service.Service):
    name = "monitor"

    def __init__(self, relay: RelayService, clock: IReactorTime, interval: float = 30.0) -> None:
        self.relay = relay
        self.clock = clock
        self.interval = interval
        self.history: list[tuple[float, int]] = []  # oldest first
        self.current: list[warnings_.Warning] = []  # the last found
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._periodic)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("monitor loop failed", f))

    def stopService(self) -> Deferred[None] | None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()

    def _periodic(self) -> Deferred[list[warnings_.Warning]]:
        d = self.check(record=True)
        d.addErrback(lambda f: log.warn("checking for warnings failed: {why}",
                                        why=f.getErrorMessage()))
        return d

    @defer.inlineCallbacks
    def snapshot(self, record: bool = False, stats: Stats | None = None
                 ) -> Generator[Deferred[Any], Any, warnings_.Snapshot]:
        relay = self.relay
        now = self.clock.seconds()
        if stats is None:
            stats = yield relay.store.stats(now)
        pending = stats.pending
        if record:
            self.history.append((now, pending))
            self.history = [(t, p) for t, p in self.history if now - t <= HISTORY_SECONDS]
        expires, problem = credential_status(relay)
        try:
            provider_warnings = tuple(relay.provider.warnings() or ())
        except Exception:
            log.failure("the provider's warnings() failed")
            provider_warnings = ()
        # a provider's words may quote what it was sent, credentials included
        problem = scrub_configured(problem) if problem else problem
        provider_warnings = tuple(scrub_configured(w) for w in provider_warnings)
        return warnings_.Snapshot(
            now=now,
            provider_type=relay.config.provider.type,
            credential_expires=expires,
            credential_problem=problem,
            secret_warning_days=relay.config.monitoring.secret_warning_days,
            provider_warnings=provider_warnings,
            provider_failing=relay.runner.provider_failing,
            pending=pending,
            oldest_pending_at=stats.oldest_pending_at,
            pending_history=tuple(self.history),
            lockouts=tuple(relay.lockout.recent_lockouts(warnings_.LOCKOUT_WINDOW)),
        )

    @defer.inlineCallbacks
    def check(self, record: bool = False, stats: Stats | None = None
              ) -> Generator[Deferred[Any], Any, list[warnings_.Warning]]:
        """-> [Warning] now; logs the ones that appeared or cleared since last time."""
        snap = yield self.snapshot(record=record, stats=stats)
        found = warnings_.collect(snap)
        before = {w.code for w in self.current}
        after = {w.code for w in found}
        for w in found:
            if w.code not in before:
                log.warn("warning: {message}", message=w.message)
        for w in self.current:
            if w.code not in after:
                log.info("warning cleared: {message}", message=w.message)
        self.current = found
        return found
