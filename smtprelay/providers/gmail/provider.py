"""The gmail provider: stored messages sent through the Gmail API (Google Workspace).

Owns what ``provider.type = "gmail"`` does with one message (``providers.md``,
section gmail): the header block reconciled with the envelope
(:mod:`smtprelay.recipients`), a token from
:class:`~smtprelay.providers.gmail.credentials.GmailTokens` (refreshed once more
on a 401), the upload by :class:`~smtprelay.providers.gmail.requests.GmailRequests`
(up to 35 MiB; Gmail's message id becomes the delivery's provider id), and the
answer, classified by :mod:`smtprelay.providers.gmail.classify`, turned into an
outcome: the per-mailbox back-off of rate limits included.  Also the connection
test, and the credential warnings of :meth:`GmailProvider.warnings` /
:meth:`GmailProvider.credential_status`.

No token, key or secret reaches a detail, a log line or an exception text.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, cast

import attr
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtprelay.message import summarize
from smtprelay.model import Outcome
from smtprelay.providers._http import describe_failure
from smtprelay.providers.base import (
    CheckResult,
    CredentialStatus,
    IProvider,
    OutgoingMessage,
    ProviderBase,
    Step,
)
from smtprelay.providers.gmail import classify as rules
from smtprelay.providers.gmail.credentials import Credential, GmailTokens, TokenProblem
from smtprelay.providers.gmail.requests import GmailRequests, read_head, without_token
from smtprelay.recipients import reconcile

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from smtprelay.config import Config
    from smtprelay.config import GmailProvider as GmailSettings

log = Logger()


@implementer(IProvider)
class GmailProvider(ProviderBase):
    type = "gmail"

    def __init__(self, config: Config, reactor: IReactorTime) -> None:
        p = cast("GmailSettings", config.provider)
        self._reactor = reactor
        self._default: str = config.sender.default
        self.timeout = float(p.timeout)
        self._warning_days: int = config.monitoring.secret_warning_days
        self._tokens = GmailTokens(config, reactor)
        self.service_account = self._tokens.service_account
        self.token_uri = self._tokens.token_uri
        self._requests = GmailRequests(
            reactor, p.api_endpoint, p.ca_file or "", self.timeout, self.service_account,
            max_per_host=max(8, config.delivery.concurrency * 2))
        self._api = self._requests.api
        self._background: defer.Deferred[Any] | None = None

    def _authenticated(self, mailbox: str) -> str:
        """The mailbox Gmail sends as (user OAuth: assumed to be sender.default)."""
        return mailbox if self.service_account else self._default

    # -- sending --------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def send(self, message: OutgoingMessage) -> Generator[defer.Deferred[Any], Any, Outcome]:
        mailbox = message.mailbox or self._default
        try:
            head, offset, total = read_head(message.body)
        except OSError as e:
            return Outcome.temporary(f"cannot read the stored message: {e.strerror or e}")
        if head is None:
            return Outcome.permanent(
                "the header section is larger than 1 MiB or has no end: cannot reconcile "
                "its recipients with the envelope for the Gmail API")
        reconciled = reconcile(head, message.recipients)
        size = len(reconciled.block) + total - offset
        if size > rules.MAX_MESSAGE_BYTES:
            return Outcome.permanent(
                f"{size:,} bytes is too large for the Gmail API (at most "
                f"{rules.MAX_MESSAGE_BYTES:,} bytes, 35 MiB)")
        self._note_changes(message, mailbox, reconciled)
        cred = self._tokens.credential(mailbox)
        try:
            token = yield self._tokens.token(cred)
        except TokenProblem as p:
            return self._token_outcome(p.failure)
        answer = yield self._post(message, cred, token, reconciled.block, offset, size)
        if answer.kind == "unauthorized":
            # the token was revoked or expired early: one fresh token, one more try
            try:
                token = yield self._tokens.token(cred, stale=token)
            except TokenProblem as p:
                return self._token_outcome(p.failure)
            answer = yield self._post(message, cred, token, reconciled.block, offset, size)
            if answer.kind == "unauthorized":
                answer = attr.evolve(answer, kind="temporary",
                                     detail=answer.detail + " (again with a fresh token)")
        return self._outcome(cred, answer)

    def _post(self, message: OutgoingMessage, cred: Credential, token: str, head: bytes,
              offset: int, size: int) -> defer.Deferred[rules.Answer]:
        return self._requests.upload(cred.mailbox, token, head, message.body,
                                     offset, size)

    def _note_changes(self, message: OutgoingMessage, mailbox: str, reconciled: Any) -> None:
        if reconciled.visible_changed:
            log.warn("{id}: the visible recipient headers changed so that Gmail delivers "
                     "only to the envelope recipients: {what}", id=message.id,
                     what=reconciled.describe())
        elif reconciled.changed:
            log.info("{id}: recipient headers reconciled with the envelope: {what}",
                     id=message.id, what=reconciled.describe())
        if not self.service_account and mailbox.lower() != self._default.lower():
            log.warn("{id}: sent as the OAuth user's mailbox ({default}), not as {mailbox}: "
                     "user OAuth sends from one mailbox only", id=message.id,
                     default=self._default, mailbox=mailbox)
        authenticated = self._authenticated(mailbox)
        senders = summarize(reconciled.block).from_addresses
        if senders and senders[0] != authenticated.lower():
            log.warn("{id}: From {sender} is not the mailbox {mailbox} the message is sent "
                     "as: Gmail keeps it only if it is a verified send-as alias of {mailbox}, "
                     "else it rewrites From to the mailbox's primary address",
                     id=message.id, sender=senders[0], mailbox=authenticated)

    def _token_outcome(self, failure: rules.TokenFailure) -> Outcome:
        if failure.kind == "permanent":
            return Outcome.permanent(failure.detail)
        return Outcome.temporary(failure.detail)

    def _outcome(self, cred: Credential, answer: rules.Answer) -> Outcome:
        if answer.kind == "sent":
            cred.backoff_level, cred.backoff_until = -1, 0.0
            self._tokens.clear_problem(cred.key + "#scope")
            return Outcome.sent(answer.detail, provider_id=answer.provider_id)
        if answer.kind == "ambiguous":
            return Outcome.temporary(answer.detail, ambiguous=True)
        if answer.kind == "rate_limit":
            return self._paused(cred, answer)
        if answer.kind == "permanent":
            if answer.reason == "insufficientPermissions":
                self._tokens.set_problem(cred.key + "#scope",
                                         f"the token for {cred.mailbox} has no scope that "
                                         f"allows sending: {answer.detail}")
            return Outcome.permanent(answer.detail)
        if answer.retry_at is not None and answer.retry_at > self._reactor.seconds():
            return Outcome.temporary(answer.detail, not_before=answer.retry_at,
                                     mailbox_wide=True)
        return Outcome.temporary(answer.detail)

    def _paused(self, cred: Credential, answer: rules.Answer) -> Outcome:
        """A rate limit: the mailbox waits until Google's time, else backs off."""
        now = self._reactor.seconds()
        until = answer.retry_at
        if until is None:
            if cred.backoff_until > now:
                until = cred.backoff_until  # another call of this mailbox got here first
            else:
                cred.backoff_level += 1
                until = now + rules.backoff_delay(cred.backoff_level, answer.daily)
        cred.backoff_until = max(until, cred.backoff_until)
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until))
        return Outcome.temporary(
            f"{answer.detail}; sending as {cred.mailbox} paused until {when}",
            not_before=until, mailbox_wide=True)

    # -- the connection test ------------------------------------------------------------------

    @defer.inlineCallbacks
    def check(self) -> Generator[defer.Deferred[Any], Any, CheckResult]:
        mailbox = self._default
        cred = self._tokens.credential(mailbox)
        try:
            token = yield self._tokens.token(cred, stale=cred.token)  # a fresh one: a real test
        except TokenProblem as p:
            return CheckResult((
                Step("token", False, f"for {mailbox} from {self.token_uri}: {p.failure.detail}"),
                Step("send permission", False, "unknown without a token"),
            ))
        steps = [self._token_step(mailbox, cred), self._permission_step(cred)]
        steps.append((yield self._check_api(cred, token)))
        return CheckResult(tuple(steps))

    def _token_step(self, mailbox: str, cred: Credential) -> Step:
        minutes = max(0, int((cred.expires_at - self._reactor.seconds()) / 60))
        scopes = ", ".join(rules.short_scope(s) for s in cred.scopes) or "none named"
        how = (" (requested; Google grants a service account all of them or none)"
               if self.service_account else "")
        return Step("token", True, f"for {mailbox} from {self.token_uri}, valid for "
                                   f"{minutes} min; scopes: {scopes}{how}")

    def _permission_step(self, cred: Credential) -> Step:
        if rules.can_send(cred.scopes):
            scope = next(s for s in cred.scopes if s in rules.SEND_SCOPES)
            return Step("send permission", True,
                        f"{rules.short_scope(scope)} allows users.messages.send")
        return Step("send permission", False,
                    f"no scope that allows sending (needs {rules.GMAIL_SEND})")

    @defer.inlineCallbacks
    def _check_api(self, cred: Credential,
                   token: str) -> Generator[defer.Deferred[Any], Any, Step]:
        """Reach the Gmail API without sending: getProfile answers 200, or 403 for a
        gmail.send-only token, which still proves the endpoint and the token good."""
        try:
            code, body = yield self._requests.profile(cred.mailbox, token)
        except Exception:
            return Step("api", False, f"{self._api}: {describe_failure(Failure())}")
        answer = rules.classify_send(code, body, self._reactor.seconds())
        detail = without_token(answer.detail, token)
        if code == 200:
            return Step("api", True, f"{self._api} answers for {cred.mailbox}")
        if code == 403 and answer.reason == "insufficientPermissions":
            return Step("api", True, f"{self._api} accepts the token (reading the profile "
                                     "needs more than gmail.send, as expected)")
        return Step("api", False, f"{self._api}: {detail}")

    # -- what an administrator should know ----------------------------------------------------

    def warnings(self) -> list[str]:
        out = self._tokens.problems()
        expires = self._tokens.refresh_token_expires
        if expires is not None:
            days = (expires - datetime.date.today()).days
            if days <= self._warning_days:
                out.append(f"the OAuth refresh token expires on {expires.isoformat()} "
                           f"({max(days, 0)} days)")
        return out

    def credential_status(self) -> CredentialStatus:
        problems = self._tokens.problems()
        problem = None
        if problems:
            problem = problems[-1] + (f" (and {len(problems) - 1} more)"
                                      if len(problems) > 1 else "")
        if self.service_account:
            return CredentialStatus(None, "service account key", problem)
        dead = self._tokens.refresh_token_dead
        if dead is not None:
            return CredentialStatus(dead, "token endpoint (invalid_grant)", problem)
        expires = self._tokens.refresh_token_expires
        return CredentialStatus(expires, "token endpoint" if expires else "", problem)

    # -- life -------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._tokens.setup_problem:
            log.error("gmail: {problem}", problem=self._tokens.setup_problem)
            return None
        if self._default:
            # learn early whether the default sender's credential works (logged, not fatal)
            d: defer.Deferred[Any] = self._tokens.token(self._tokens.credential(self._default))
            d.addErrback(lambda f: f.trap(TokenProblem, defer.CancelledError) and None)
            d.addErrback(lambda f: log.failure("gmail: token prefetch failed", f))
            self._background = d
        return None

    @defer.inlineCallbacks
    def stop(self) -> Generator[defer.Deferred[Any], Any, None]:
        if self._background is not None and not self._background.called:
            self._background.cancel()
        yield self._requests.stop()
        yield self._tokens.stop()
