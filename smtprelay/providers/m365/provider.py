"""The Microsoft 365 provider: messages sent through Microsoft Graph as the sending mailbox.

One :class:`GraphProvider` per relay holds one msal application
(:mod:`~smtprelay.providers.m365.credentials`) and one
:class:`~smtprelay.providers.m365.requests.GraphClient` (the treq connection pool
and the per-mailbox request slots).  For each message it asks
:mod:`~smtprelay.providers.m365.mime` (on a thread: it reads the file) for a
plan, then runs it:

* **sendMail** (``POST /v1.0/users/{mailbox}/sendMail``, base64 MIME,
  ``text/plain``, 202) when the message fits in one 4 MB request, its headers
  name nobody outside the envelope, and Sent Items may keep a copy
  (``save_to_sent_items = true``).  Envelope-only recipients ride in an added
  Bcc header, which Graph removes: the recipients see the original bytes.
* **a draft** otherwise: ``POST /messages`` with the MIME less the attachments
  that do not fit, a ``PATCH`` setting the recipients to exactly the envelope
  when the headers say otherwise (and ``PidTagDeleteAfterSubmit`` for
  ``save_to_sent_items = false``), each attachment through an upload
  session (3 MB and up: 3.75 MB chunks, in order, no Authorization) or one
  ``POST .../attachments``, then ``POST .../send``.  Any failure on the way
  deletes the draft.  The requests of one delivery run one after the other,
  so a delivery is one request in flight; across deliveries a mailbox never
  has more than ``min(delivery.concurrency, 4)`` requests in flight.

Every answer is classified by :mod:`~smtprelay.providers.m365.classify`:
``Retry-After`` blocks the whole mailbox (here, and through the outcome in
the queue), a refused token is renewed once, a 413 moves to the draft form,
an answer lost after a send was written is ``ambiguous``.  Inside a draft,
a throttled or failing request is retried in place (after its Retry-After,
within a bounded wait) rather than starting the whole upload again.

The credential's expiry comes from ``client_secret_expires``, from Graph's
``passwordCredentials`` where the app may read them, or from the
certificate; warnings are logged at start-up and daily, and returned by
:meth:`~GraphProvider.warnings` for the status page.  No token or secret ever
reaches a detail or the log.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import quote

import attr
from twisted.internet import defer, task, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from smtprelay.model import Outcome, Result
from smtprelay.providers._tokens import TokenThreads
from smtprelay.providers.base import (
    CheckResult,
    CredentialStatus,
    IProvider,
    OutgoingMessage,
    ProviderBase,
    Step,
)
from smtprelay.providers.m365 import classify as errors
from smtprelay.providers.m365 import credentials, mime
from smtprelay.providers.m365.requests import Answer, GraphClient, Unanswered
from smtprelay.scrub import scrub

if TYPE_CHECKING:
    from smtprelay.config import Config, M365Provider

log = Logger()
_T = TypeVar("_T")
# what an inlineCallbacks generator is: it yields Deferreds, it returns a _T
Inline = Generator[Deferred[Any], Any, _T]

IN_PLACE_RETRIES = 3  # per request inside a draft
IN_PLACE_WAIT = 60.0  # seconds a draft delivery may wait in total for Graph to recover
DAY = 86400.0
# a gateway timeout on a send: the backend may have sent the message all the same
_MAYBE_SENT = frozenset({504})
# _create_draft: the app may not create drafts, and only Sent Items asked for one
_FALLBACK = "fallback"


class _Failed(Exception):
    """Unwinds a delivery with its outcome."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.detail)
        self.outcome = outcome


class _Delivery:
    """What one delivery carries between its requests."""

    def __init__(self, message: OutgoingMessage) -> None:
        self.message = message
        self.mailbox = message.mailbox
        self.waited = 0.0  # seconds spent waiting for Graph in place
        self.draft_id: str | None = None


@implementer(IProvider)
class GraphProvider(ProviderBase):
    type = "m365"

    # reactor: IReactorTime and IReactorThreads (no one interface says both)
    def __init__(self, config: Config, reactor: Any,
                 token_threads: TokenThreads | None = None) -> None:
        p = cast("M365Provider", config.provider)
        self.config = p
        self.timeout = float(p.timeout)  # the queue bounds a call by it
        self._reactor = reactor
        self._graph = p.graph_endpoint.rstrip("/")
        self._sender_default = config.sender.default
        self._save = bool(p.save_to_sent_items)
        self._warning_days = config.monitoring.secret_warning_days
        self._secrets = [s for s in config.secrets() if s]
        credentials.quiet_msal()
        self._threads = token_threads or TokenThreads(reactor, size=2, name="smtprelay-msal")
        self._tokens = credentials.GraphTokens(reactor, p, self._threads)
        self._client = GraphClient(reactor, self._tokens, p.ca_file, p.timeout,
                                   config.delivery.concurrency)
        # mailbox -> epoch seconds before which Graph asked us to wait
        self._blocked: dict[str, float] = {}
        # mailbox -> until when save_to_sent_items=false falls back
        self._no_drafts: dict[str, float] = {}
        self._orphans: list[tuple[str, str]] = []  # (mailbox, draft id) whose deletion failed
        self._loop: task.LoopingCall | None = None
        if p.client_secret is not None:
            self._expiry = credentials.Expiry(p.client_secret_expires,
                                              "configured" if p.client_secret_expires else "",
                                              "client secret")
        else:
            self._expiry = credentials.Expiry(self._certificate_expiry(p.certificate),
                                              "certificate", "certificate")

    @staticmethod
    def _certificate_expiry(path: str) -> datetime.date | None:
        from smtprelay.tls import certificate_not_after

        try:
            return certificate_not_after(path).date()
        except Exception:
            return None

    # -- life ------------------------------------------------------------------------

    def start(self) -> None:
        """Check the credential now (a token, the secret's expiry) and then daily."""
        self._loop = task.LoopingCall(self._daily)
        self._loop.clock = self._reactor
        self._loop.start(DAY, now=True).addErrback(
            lambda f: log.failure("m365: the daily credential check failed", f))
        return None

    @defer.inlineCallbacks
    def stop(self) -> Inline[None]:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        yield self._client.close()
        try:
            yield self._tokens.close()
        finally:
            yield self._threads.stop()

    @defer.inlineCallbacks
    def _daily(self) -> Inline[None]:
        try:
            yield self._tokens.token()
        except credentials.TokenFailed as e:
            log.warn("m365: {detail}", detail=self._scrub(e.verdict.detail))
        except Exception:
            log.failure("m365: getting a token failed")
        else:
            try:
                yield self._refresh_expiry()
            except Exception:  # the loop must live on to warn tomorrow
                log.failure("m365: reading the secret's expiry from Graph failed")
        for warning in self.warnings():
            log.warn("m365: {warning}", warning=warning)

    # -- what the admin sees -------------------------------------------------------------

    def _today(self) -> datetime.date:
        return datetime.datetime.fromtimestamp(self._reactor.seconds(),
                                               datetime.UTC).date()

    def credential_status(self) -> CredentialStatus:
        problem = self._tokens.problem or credentials.expired_note(self._expiry, self._today())
        return CredentialStatus(expires=self._expiry.date, source=self._expiry.source,
                                problem=problem)

    def warnings(self) -> list[str]:
        out = []
        if self._tokens.problem:
            out.append(f"{self._tokens.problem}: messages are deferred until it is fixed")
        out += credentials.expiry_warnings(self._expiry, self._today(), self._warning_days)
        now = self._reactor.seconds()
        for mailbox, until in sorted(self._no_drafts.items()):
            if until > now:
                out.append(f"save_to_sent_items = false is not honoured for {mailbox}: the app "
                           "may not create drafts (grant it Mail.ReadWrite); its messages are "
                           "sent with sendMail and kept in Sent Items")
        if self._orphans:
            out.append(f"{len(self._orphans)} draft(s) could not be deleted after a failed "
                       "delivery; they are retried, or may be deleted from the Drafts folder")
        return out

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    @defer.inlineCallbacks
    def _refresh_expiry(self) -> Inline[None]:
        """The secret's end date from Graph (Application.Read.All), if the app may read it."""
        p = self.config
        if p.client_secret is None:
            return
        url = (f"{self._graph}/v1.0/applications(appId='{quote(p.client_id, safe='')}')"
               "?$select=passwordCredentials")
        try:
            answer = yield self._client.request("GET", url, "getApplication")
        except (credentials.TokenFailed, Unanswered):
            return
        if answer.status == 200:
            now = datetime.datetime.fromtimestamp(self._reactor.seconds(),
                                                  datetime.UTC)
            found = credentials.pick_secret_expiry(answer.json().get("passwordCredentials"),
                                                   p.client_secret.reveal(), now)
            if found is not None:
                if p.client_secret_expires and found != p.client_secret_expires:
                    log.info("m365: Graph says the client secret ends {graph}; "
                             "provider.client_secret_expires says {configured}",
                             graph=found.isoformat(),
                             configured=p.client_secret_expires.isoformat())
                self._expiry = credentials.Expiry(found, "graph", "client secret")
        # 403 (no Application.Read.All) and anything else: keep the configured date

    # -- the connection test --------------------------------------------------------------

    @defer.inlineCallbacks
    def check(self) -> Inline[CheckResult]:
        steps = []
        try:
            yield self._tokens.token()
        except credentials.TokenFailed as e:
            steps.append(Step("token", False, self._scrub(e.verdict.detail)))
            steps.append(Step("sender mailbox", False, "not checked: no token"))
        else:
            steps.append(Step("token", True, f"acquired for app {self.config.client_id} from "
                                             f"{self._tokens.authority}"))
            steps.append((yield self._check_sender()))
            yield self._refresh_expiry()
        steps.append(self._expiry_step())
        return CheckResult(tuple(steps))

    @defer.inlineCallbacks
    def _check_sender(self) -> Inline[Step]:
        sender = self._sender_default
        url = f"{self._graph}/v1.0/users/{self._quote(sender)}?$select=mail,userPrincipalName"
        try:
            answer = yield self._client.request("GET", url, "getUser", mailbox=sender)
        except (credentials.TokenFailed, Unanswered) as e:
            detail = e.verdict.detail if isinstance(e, credentials.TokenFailed) else e.detail
            return Step("sender mailbox", False, self._scrub(detail))
        if answer.status == 200:
            found = answer.json()
            name = found.get("mail") or found.get("userPrincipalName") or sender
            return Step("sender mailbox", True, f"{sender}: found ({name})")
        if answer.status == 403:
            return Step("sender mailbox", True,
                        f"{sender}: not permitted to read users (User.Read.All); sending may "
                        "still work")
        verdict = answer.verdict("getUser")
        return Step("sender mailbox", False, f"{sender}: {verdict.detail}")

    def _expiry_step(self) -> Step:
        e = self._expiry
        if e.date is None:
            if self.config.client_secret is not None:
                return Step("secret expiry", True,
                            "unknown: set provider.client_secret_expires, or grant the app "
                            "Application.Read.All so that the relay reads it from Graph")
            return Step("secret expiry", True, "unknown: the certificate could not be read")
        days = (e.date - self._today()).days
        source = {"graph": "from Graph", "configured": "from provider.client_secret_expires",
                  "certificate": "from the certificate"}.get(e.source, e.source)
        if days < 0:
            return Step("secret expiry", False,
                        f"the {e.kind} expired on {e.date.isoformat()} ({source})")
        return Step("secret expiry", True,
                    f"the {e.kind} expires on {e.date.isoformat()}, in {days} days ({source})")

    # -- HTTP ------------------------------------------------------------------------------

    @staticmethod
    def _quote(mailbox: str) -> str:
        return quote(mailbox, safe="@")

    def _outcome(self, verdict: errors.Verdict, ambiguous: bool = False) -> Outcome:
        if verdict.action == errors.PERMANENT:
            return Outcome.permanent(verdict.detail)
        return Outcome.temporary(verdict.detail, not_before=verdict.not_before,
                                 mailbox_wide=verdict.mailbox_wide, ambiguous=ambiguous)

    def _block(self, mailbox: str, verdict: errors.Verdict) -> None:
        """Remember a mailbox-wide Retry-After: every request for it waits."""
        if verdict.mailbox_wide and verdict.not_before:
            key = mailbox.lower()
            self._blocked[key] = max(self._blocked.get(key, 0), verdict.not_before)

    def _blocked_until(self, mailbox: str) -> float | None:
        until = self._blocked.get(mailbox.lower())
        if until is not None and until <= self._reactor.seconds():
            del self._blocked[mailbox.lower()]
            return None
        return until

    def _sleep(self, seconds: float) -> Deferred[None]:
        return task.deferLater(self._reactor, max(seconds, 0), lambda: None)

    def _in_thread(self, fn: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), fn, *args)

    # -- sending ------------------------------------------------------------------------------

    def _users(self, mailbox: str) -> str:
        return f"{self._graph}/v1.0/users/{self._quote(mailbox)}"

    @defer.inlineCallbacks
    def send(self, message: OutgoingMessage) -> Inline[Outcome]:
        started = time.monotonic()
        try:
            outcome = yield self._send(message)
        except _Failed as e:
            outcome = e.outcome
        except credentials.TokenFailed as e:
            outcome = Outcome.temporary(e.verdict.detail)
        except Unanswered as e:
            outcome = Outcome.temporary(e.detail, ambiguous=e.maybe_sent)
        if outcome.mailbox_wide and outcome.not_before:
            key = message.mailbox.lower()
            self._blocked[key] = max(self._blocked.get(key, 0), outcome.not_before)
        log.debug("m365: {id} {result} in {ms} ms", id=message.id, result=outcome.result,
                  ms=int((time.monotonic() - started) * 1000))
        return self._finish(outcome)

    def _finish(self, outcome: Outcome) -> Outcome:
        detail = self._scrub(outcome.detail)
        if outcome.result is not Result.SENT:
            note = credentials.expired_note(self._expiry, self._today())
            if note and note not in detail:
                detail = f"{detail}; {note}"
        if detail != outcome.detail:
            outcome = attr.evolve(outcome, detail=detail)
        return outcome

    @defer.inlineCallbacks
    def _send(self, message: OutgoingMessage) -> Inline[Outcome]:
        mailbox = message.mailbox
        blocked = self._blocked_until(mailbox)
        if blocked is not None:
            return Outcome.temporary(f"Graph asked to wait before sending as {mailbox}",
                                     not_before=blocked, mailbox_wide=True)
        save = self._save
        until = self._no_drafts.get(mailbox.lower())
        if not save and until is not None and until > self._reactor.seconds():
            save = True  # Mail.ReadWrite is missing: see warnings()
        try:
            plan, payload = yield self._prepare(message, save)
        except mime.Unsendable as e:
            return Outcome.permanent(e.detail)
        moved_all = False
        if plan.form == "mime":
            outcome = yield self._send_mime(message, plan, payload)
            if outcome is not None:
                return outcome
            # 413: Graph's limit is lower than computed; every attachment goes on its own
            try:
                plan, payload = yield self._prepare(message, save, move_all=True)
            except mime.Unsendable as e:
                return Outcome.permanent(f"Graph answered 413 to sendMail, and {e.detail}")
            moved_all = True
        outcome = yield self._send_draft(message, plan, payload, save, moved_all)
        return outcome

    def _prepare(self, message: OutgoingMessage, save: bool,
                 move_all: bool = False) -> Deferred[tuple[mime.Plan, bytes]]:
        return self._in_thread(mime.prepare, message.body, message.recipients, save,
                               mime.REQUEST_LIMIT, move_all)

    @staticmethod
    def _rid(answer: Answer) -> str:
        return f"; request-id {answer.request_id}" if answer.request_id else ""

    def _bcc_note(self, plan: mime.Plan) -> str:
        r = plan.recipients
        notes = []
        if r.add_bcc:
            notes.append(f"{len(r.add_bcc)} envelope-only recipient(s) as Bcc")
        if r.explicit:
            notes.append(f"recipients set explicitly; not delivered to header-only "
                         f"{', '.join(r.dropped[:5])}" + (" ..." if len(r.dropped) > 5 else ""))
        return "; " + "; ".join(notes) if notes else ""

    @defer.inlineCallbacks
    def _send_mime(self, message: OutgoingMessage, plan: mime.Plan,
                   payload: bytes) -> Inline[Outcome | None]:
        """sendMail with the base64 MIME -> Outcome, or None after a 413."""
        mailbox = message.mailbox
        answer = yield self._client.request(
            "POST", f"{self._users(mailbox)}/sendMail", "sendMail", mailbox=mailbox,
            data=payload, headers={"Content-Type": "text/plain"}, commit=True)
        del payload
        if answer.status == 202 or 200 <= answer.status < 300:
            return Outcome.sent(
                f"sent as {mailbox} with sendMail ({plan.mime_size:,} bytes of MIME)"
                f"{self._bcc_note(plan)}{self._rid(answer)}", provider_id=answer.request_id)
        verdict = answer.verdict("sendMail")
        if verdict.action == errors.TOO_LARGE:
            log.info("m365: {id}: Graph answered 413 to sendMail ({size} bytes); sending it "
                     "through a draft", id=message.id, size=plan.mime_size)
            return None
        return self._outcome(verdict, ambiguous=answer.status in _MAYBE_SENT)

    # -- the draft form ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def _send_draft(self, message: OutgoingMessage, plan: mime.Plan, payload: bytes,
                    save: bool, moved_all: bool = False) -> Inline[Outcome]:
        ctx = _Delivery(message)
        created, plan = yield self._create_fitting(ctx, plan, payload, save, moved_all)
        del payload
        if isinstance(created, Outcome):
            return created
        if created == _FALLBACK:
            return (yield self._fallback_sendmail(message))
        ctx.draft_id = created
        if plan.recipients.explicit:
            log.info("m365: {id}: the headers name {dropped} outside the envelope: recipients "
                     "set explicitly on the draft, so the visible To/Cc change",
                     id=message.id, dropped=", ".join(plan.recipients.dropped[:10]))
        try:
            uploaded, answer = yield self._complete_draft(ctx, plan, save)
        except defer.CancelledError:
            self._delete_later(ctx)
            raise
        except BaseException:
            yield self._delete_draft(ctx)
            raise
        self._retry_orphans(ctx.mailbox)
        return Outcome.sent(self._draft_detail(ctx.mailbox, plan, save, uploaded, answer),
                            provider_id=answer.request_id)

    @defer.inlineCallbacks
    def _create_fitting(self, ctx: _Delivery, plan: mime.Plan, payload: bytes, save: bool,
                        moved_all: bool) -> Inline[tuple[str | Outcome, mime.Plan]]:
        """Create the draft; after a 413, once more with every attachment on its own.

        -> (the draft's id, an Outcome or :data:`_FALLBACK`; the plan it was made from).
        """
        created = yield self._create_draft(ctx, plan, payload)
        while created is None:
            if moved_all:
                return Outcome.permanent(
                    "creating the draft: Graph answered 413 with every attachment taken out "
                    f"({plan.mime_size:,} bytes of MIME left): too large for every method"), plan
            try:
                plan, payload = yield self._prepare(ctx.message, save, move_all=True)
            except mime.Unsendable as e:
                return Outcome.permanent(f"Graph answered 413 to the draft, and {e.detail}"), plan
            moved_all = True
            created = yield self._create_draft(ctx, plan, payload)
        return created, plan

    @defer.inlineCallbacks
    def _complete_draft(self, ctx: _Delivery, plan: mime.Plan,
                        save: bool) -> Inline[tuple[int, Answer]]:
        """Set what differs, add the attachments, send -> (attachments uploaded, the answer)."""
        patch = self._draft_patch(plan, save)
        if patch:
            yield self._draft_call(ctx, "PATCH", self._draft_url(ctx), "updateMessage",
                                   (200,), json_body=patch)
        uploaded = 0
        for attachment in plan.attachments:
            if attachment.upload:
                yield self._upload(ctx, plan, attachment)
                uploaded += 1
            else:
                yield self._add_attachment(ctx, plan, attachment)
        answer = yield self._draft_call(ctx, "POST", f"{self._draft_url(ctx)}/send", "send",
                                        (202, 200, 204), commit=True)
        return uploaded, answer

    @staticmethod
    def _draft_patch(plan: mime.Plan, save: bool) -> dict[str, Any]:
        """The draft's PATCH: its recipients when they are not the headers', and
        PidTagDeleteAfterSubmit when Sent Items may not keep it ({} when nothing)."""
        patch: dict[str, Any] = {}
        if plan.recipients.differ:
            patch.update(mime.recipients_patch(plan.recipients))
        if not save:
            patch["singleValueExtendedProperties"] = [mime.DELETE_AFTER_SUBMIT]
        return patch

    @defer.inlineCallbacks
    def _add_attachment(self, ctx: _Delivery, plan: mime.Plan,
                        attachment: mime.MovedAttachment) -> Inline[None]:
        """A small attachment in one ``POST .../attachments``."""
        body = yield self._in_thread(mime.attachment_body, ctx.message.body,
                                     plan.parts[attachment.part], attachment)
        yield self._draft_call(ctx, "POST", f"{self._draft_url(ctx)}/attachments",
                               "addAttachment", (201, 200), data=body,
                               headers={"Content-Type": "application/json"})
        del body

    def _draft_detail(self, mailbox: str, plan: mime.Plan, save: bool, uploaded: int,
                      answer: Answer) -> str:
        moved = len(plan.attachments)
        how = []
        if uploaded:
            how.append(f"{uploaded} attachment(s) uploaded")
        if moved - uploaded:
            how.append(f"{moved - uploaded} attachment(s) added")
        if not save:
            how.append("not kept in Sent Items")
        extra = f", {', '.join(how)}" if how else ""
        return (f"sent as {mailbox} through a draft ({plan.mime_size:,} bytes of MIME{extra})"
                f"{self._bcc_note(plan)}{self._rid(answer)}")

    def _draft_url(self, ctx: _Delivery) -> str:
        assert ctx.draft_id is not None, "no draft yet"
        return f"{self._users(ctx.mailbox)}/messages/{quote(ctx.draft_id, safe='')}"

    @defer.inlineCallbacks
    def _create_draft(self, ctx: _Delivery, plan: mime.Plan,
                      payload: bytes) -> Inline[str | Outcome | None]:
        """The draft's id; an Outcome when it failed; None after a 413; :data:`_FALLBACK`."""
        mailbox = ctx.mailbox
        answer = yield self._client.request("POST", f"{self._users(mailbox)}/messages",
                                             "createMessage", mailbox=mailbox, data=payload,
                                             headers={"Content-Type": "text/plain"})
        if answer.status in (200, 201):
            draft_id = answer.json().get("id")
            if not draft_id:
                return Outcome.temporary("creating the draft: Graph answered "
                                         f"{answer.status} without an id")
            return draft_id
        verdict = answer.verdict("createMessage")
        if verdict.action == errors.TOO_LARGE:
            return None
        if (answer.status == 403 and answer.code == "ErrorAccessDenied"
                and set(plan.reasons) == {"sent_items"}
                and "AccessPolicy" not in (answer.message or "")):
            # only save_to_sent_items = false asked for a draft: deliver rather than bounce
            key = mailbox.lower()
            if key not in self._no_drafts or self._no_drafts[key] <= self._reactor.seconds():
                log.warn("m365: the app may not create drafts in {mailbox} ({detail}); "
                         "save_to_sent_items = false cannot be honoured: sending with "
                         "sendMail (kept in Sent Items) for the next hour",
                         mailbox=mailbox, detail=verdict.detail)
            self._no_drafts[key] = self._reactor.seconds() + 3600
            return _FALLBACK
        return self._outcome(verdict)

    @defer.inlineCallbacks
    def _fallback_sendmail(self, message: OutgoingMessage) -> Inline[Outcome]:
        plan, payload = yield self._prepare(message, True)
        if plan.form != "mime":
            return Outcome.permanent("the app may not create drafts (grant it Mail.ReadWrite), "
                                     "and this message needs one")
        outcome = yield self._send_mime(message, plan, payload)
        if outcome is None:
            return Outcome.permanent("Graph answered 413 to sendMail and the app may not "
                                     "create drafts (grant it Mail.ReadWrite)")
        return outcome

    @defer.inlineCallbacks
    def _draft_call(self, ctx: _Delivery, method: str, url: str, operation: str,
                    expect: Sequence[int], data: bytes | None = None,
                    json_body: dict[str, Any] | None = None,
                    headers: dict[str, str] | None = None, auth: bool = True,
                    commit: bool = False) -> Inline[Answer]:
        """A request on the draft; throttling and 5xx are waited out in place (bounded)."""
        for attempt in range(IN_PLACE_RETRIES + 1):
            blocked = self._blocked_until(ctx.mailbox)
            if blocked is not None:
                yield self._wait(ctx, blocked - self._reactor.seconds(), operation)
            answer = yield self._client.request(method, url, operation, mailbox=ctx.mailbox,
                                                 data=data, json_body=json_body, headers=headers,
                                                 auth=auth, commit=commit)
            if answer.status in expect:
                return answer
            verdict = answer.verdict(operation)
            self._block(ctx.mailbox, verdict)
            maybe_sent = commit and answer.status in _MAYBE_SENT
            transient = answer.status == 429 or answer.status >= 500
            if (verdict.action != errors.TEMPORARY or not transient or maybe_sent
                    or attempt == IN_PLACE_RETRIES):
                raise _Failed(self._outcome(verdict, ambiguous=maybe_sent))
            wait = (verdict.not_before - self._reactor.seconds() if verdict.not_before
                    else 2.0 ** attempt)
            yield self._wait(ctx, wait, operation, verdict)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _wait(self, ctx: _Delivery, seconds: float, operation: str,
              verdict: errors.Verdict | None = None) -> Deferred[None]:
        seconds = max(seconds, 0.0)
        if ctx.waited + seconds > IN_PLACE_WAIT:
            until = self._reactor.seconds() + seconds
            detail = (verdict.detail if verdict else
                      f"{errors.operation_text(operation)}: Graph asked to wait {seconds:.0f}s")
            raise _Failed(Outcome.temporary(detail, not_before=until, mailbox_wide=True))
        ctx.waited += seconds
        return self._sleep(seconds)

    @defer.inlineCallbacks
    def _upload(self, ctx: _Delivery, plan: mime.Plan,
                attachment: mime.MovedAttachment) -> Inline[None]:
        answer = yield self._draft_call(
            ctx, "POST", f"{self._draft_url(ctx)}/attachments/createUploadSession",
            "createUploadSession", (200, 201), json_body={"AttachmentItem": attachment.item()})
        url = answer.json().get("uploadUrl")
        if not url:
            raise _Failed(Outcome.temporary("creating an upload session: no uploadUrl in "
                                            "Graph's answer"))
        part = plan.parts[attachment.part]
        chunks = mime.decoded_chunks(ctx.message.body, part, mime.UPLOAD_CHUNK)
        offset, total = 0, attachment.size
        try:
            while True:
                chunk = yield self._in_thread(next, chunks, None)
                if chunk is None:
                    break
                end = offset + len(chunk) - 1
                # the upload URL carries its own authorization: no Authorization header
                yield self._draft_call(
                    ctx, "PUT", url, "upload", (200, 201, 202, 204), data=chunk, auth=False,
                    headers={"Content-Type": "application/octet-stream",
                             "Content-Range": f"bytes {offset}-{end}/{total}"})
                offset += len(chunk)
                del chunk
        finally:
            chunks.close()
        if offset != total:
            raise _Failed(Outcome.temporary(
                f"uploading {attachment.name!r}: read {offset:,} bytes, expected {total:,}"))

    @defer.inlineCallbacks
    def _delete_draft(self, ctx: _Delivery) -> Inline[None]:
        """Delete the draft of a failed delivery (retried a little; remembered if it fails)."""
        if ctx.draft_id is None:
            return
        draft_id, ctx.draft_id = ctx.draft_id, None
        ok = yield self._delete(ctx.mailbox, draft_id)
        if not ok:
            self._orphans.append((ctx.mailbox, draft_id))

    def _delete_later(self, ctx: _Delivery) -> None:
        if ctx.draft_id is not None:
            draft_id, ctx.draft_id = ctx.draft_id, None
            self._orphans.append((ctx.mailbox, draft_id))
            self._reactor.callLater(0, self._retry_orphans, ctx.mailbox)

    @defer.inlineCallbacks
    def _delete(self, mailbox: str, draft_id: str) -> Inline[bool]:
        url = f"{self._users(mailbox)}/messages/{quote(draft_id, safe='')}"
        for attempt in range(3):
            try:
                answer = yield self._client.request("DELETE", url, "deleteMessage",
                                                    mailbox=mailbox)
            except (credentials.TokenFailed, Unanswered) as e:
                detail = e.verdict.detail if isinstance(e, credentials.TokenFailed) else e.detail
            else:
                if answer.status in (200, 204, 404):
                    return True
                verdict = answer.verdict("deleteMessage")
                detail = verdict.detail
                if verdict.action == errors.PERMANENT:
                    break
                if verdict.not_before and verdict.not_before - self._reactor.seconds() > 30:
                    break
                yield self._sleep((verdict.not_before or 0) - self._reactor.seconds()
                                  if verdict.not_before else 1.0 + attempt)
                continue
            yield self._sleep(1.0 + attempt)
        log.warn("m365: could not delete the draft of a failed delivery in {mailbox}: "
                 "{detail}; it stays in the Drafts folder for now",
                 mailbox=mailbox, detail=self._scrub(detail))
        return False

    def _retry_orphans(self, mailbox: str) -> None:
        """Try again to delete drafts left by failed deliveries of ``mailbox``."""
        mine = [o for o in self._orphans if o[0].lower() == mailbox.lower()]
        if not mine:
            return
        self._orphans = [o for o in self._orphans if o not in mine]

        @defer.inlineCallbacks
        def again() -> Inline[None]:
            for box, draft_id in mine:
                ok = yield self._delete(box, draft_id)
                if not ok:
                    self._orphans.append((box, draft_id))

        again().addErrback(lambda f: log.failure("m365: deleting old drafts failed", f))
