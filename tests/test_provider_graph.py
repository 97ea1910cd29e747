"""The Microsoft 365 provider against the Graph fake in-process (trial, real sockets).

Each test runs a :class:`tests.fakes.graph.FakeGraph` on loopback HTTPS with a
test CA and a :class:`GraphProvider` pointed at it, and looks at what the fake
recorded: the call used, the recipients Graph computed, the bytes, drafts
left behind, requests in flight.
"""

import datetime
import io
import os
import shutil
import tempfile

from twisted.internet import defer, task
from twisted.trial import unittest

from smtprelay.model import Result
from smtprelay.providers.base import OutgoingMessage
from smtprelay.providers.m365 import GraphProvider
from tests.fakes.graph import FakeGraph
from tests.fakes.tlsca import TestCA
from tests.graph_support import (
    ALL_PERMISSIONS,
    CLIENT,
    MAILBOX,
    MIB,
    SECRET,
    TENANT,
    build_message,
    provider_config,
    self_signed_certificate,
    sized_message,
)


class GraphProviderTestBase(unittest.TestCase):
    permissions = ALL_PERMISSIONS
    save_to_sent_items = True
    latency = 0.0

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.directory = tempfile.mkdtemp(prefix="m365-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.ca = TestCA(os.path.join(self.directory, "ca"))
        self.fake = FakeGraph(reactor, latency=self.latency)
        self.fake.listen(self.ca)
        self.addCleanup(self.fake.stop)
        self.fake.add_tenant(TENANT, domains=["contoso.onmicrosoft.com"])
        self.app = self.fake.add_app(CLIENT, tenant=TENANT, secrets=[SECRET],
                                     permissions=list(self.permissions))
        self.fake.add_mailbox(MAILBOX, tenant=TENANT, max_send_size=150 * MIB)
        self.provider = None

    def make_provider(self, **kw):
        kw.setdefault("save_to_sent_items", self.save_to_sent_items)
        config = provider_config(self.fake.url, self.ca.ca_path, **kw)
        self.provider = GraphProvider(config, self.reactor)
        self.addCleanup(self.provider.stop)
        return self.provider

    def send(self, raw, recipients=("ann@example.com",), mailbox=MAILBOX, provider=None):
        provider = provider or self.provider or self.make_provider()
        message = OutgoingMessage(id="m1", sender=mailbox, mailbox=mailbox,
                                  recipients=tuple(recipients), size=len(raw),
                                  body=io.BytesIO(raw))
        return provider.send(message)


def upload_requests(fake):
    return [r for r in fake.request_log if r["route"] == "upload"]


class SendMailTests(GraphProviderTestBase):
    @defer.inlineCallbacks
    def test_a_small_message_goes_as_mime_sendmail_byte_exact(self):
        raw = build_message(to=("ann@example.com",))
        outcome = yield self.send(raw)
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        self.assertIn("sendMail", outcome.detail)
        [record] = self.fake.messages
        self.assertEqual(record.method, "mime")
        self.assertEqual(record.mime, raw)
        self.assertEqual(record.delivered_mime, raw)
        self.assertEqual(record.recipients, ["ann@example.com"])
        self.assertTrue(record.saved_to_sent_items)
        self.assertTrue(outcome.provider_id)
        self.assertEqual(self.fake.stats()["token_requests"], 1)

    @defer.inlineCallbacks
    def test_the_token_is_reused(self):
        for _ in range(3):
            outcome = yield self.send(build_message())
            self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        self.assertEqual(self.fake.stats()["token_requests"], 1)

    @defer.inlineCallbacks
    def test_envelope_only_recipients_are_added_as_invisible_bcc(self):
        raw = build_message(to=("ann@example.com",), cc=("Carl@Example.com",))
        outcome = yield self.send(raw, ("ann@example.com", "carl@example.com",
                                        "hidden@example.com", "other@example.org"))
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        [record] = self.fake.messages
        self.assertEqual(record.method, "mime")
        self.assertEqual(sorted(record.recipients),
                         ["Carl@Example.com", "ann@example.com", "hidden@example.com",
                          "other@example.org"])
        self.assertEqual(record.bcc, ["hidden@example.com", "other@example.org"])
        # what the recipients get: the original bytes, the added Bcc removed by Graph
        self.assertEqual(record.delivered_mime, raw)
        self.assertNotIn(b"hidden@", record.delivered_mime)
        self.assertIn("2 envelope-only recipient(s) as Bcc", outcome.detail)

    @defer.inlineCallbacks
    def test_a_bcc_only_message_reaches_its_envelope(self):
        raw = build_message(to=(), extra_headers=[("To", "undisclosed-recipients:;")])
        outcome = yield self.send(raw, ("secret1@example.com", "secret2@example.com"))
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        [record] = self.fake.messages
        self.assertEqual(record.method, "mime")
        self.assertEqual(record.to, [])
        self.assertEqual(record.bcc, ["secret1@example.com", "secret2@example.com"])
        self.assertEqual(record.delivered_mime, raw)

    @defer.inlineCallbacks
    def test_header_only_recipients_receive_nothing(self):
        raw = build_message(to=("ann@example.com", "boss@example.com"),
                            cc=("list@example.com",))
        outcome = yield self.send(raw, ("ann@example.com", "hidden@example.com"))
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        [record] = self.fake.messages
        self.assertEqual(record.method, "draft")
        self.assertEqual(record.to, ["ann@example.com"])
        self.assertEqual(record.cc, [])
        self.assertEqual(record.bcc, ["hidden@example.com"])
        self.assertEqual(record.mime, raw)  # the draft was made from the message as it came
        self.assertIn("not delivered to header-only boss@example.com, list@example.com",
                      outcome.detail)
        self.assertEqual(self.fake.drafts_left(), [])

    @defer.inlineCallbacks
    def test_just_under_the_sendmail_limit_is_one_sendmail(self):
        raw = sized_message(3 * MIB)  # base64: exactly 4 MB
        outcome = yield self.send(raw)
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        [record] = self.fake.messages
        self.assertEqual((record.method, len(record.mime)), ("mime", 3 * MIB))
        self.assertEqual(record.mime, raw)

    @defer.inlineCallbacks
    def test_the_added_bcc_counts_toward_the_limit(self):
        raw = sized_message(3 * MIB - 10)
        outcome = yield self.send(raw, ("ann@example.com", "hidden@example.com"))
        # with "Bcc: hidden@example.com" it would not fit: a draft whose recipients are
        # set explicitly, rather than a 413
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        self.assertNotIn("sendMail", self.fake.stats()["requests"])
        [record] = self.fake.messages
        self.assertEqual((record.method, record.mime), ("draft", raw))
        self.assertEqual((record.to, record.bcc), (["ann@example.com"], ["hidden@example.com"]))

    @defer.inlineCallbacks
    def test_a_single_part_message_over_the_limit_is_permanent(self):
        raw = sized_message(3 * MIB + 1)
        outcome = yield self.send(raw)
        self.assertEqual(outcome.result, Result.PERMANENT, outcome.detail)
        self.assertIn("single MIME part", outcome.detail)
        self.assertNotIn("sendMail", self.fake.stats()["requests"])
        self.assertNotIn("createMessage", self.fake.stats()["requests"])

    @defer.inlineCallbacks
    def test_just_over_the_sendmail_limit_moves_an_attachment_out(self):
        attachment = os.urandom(2 * MIB)
        raw = sized_message(3 * MIB + 1,
                            attachments=[("report.pdf", attachment, "application/pdf")])
        self.assertEqual(len(raw), 3 * MIB + 1)
        outcome = yield self.send(raw)
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        [record] = self.fake.messages
        self.assertEqual(record.method, "draft")
        [added] = [a for a in record.attachments if a.source == "attachments"]
        self.assertEqual((added.name, added.content_type, added.content),
                         ("report.pdf", "application/pdf", attachment))
        self.assertEqual(self.fake.drafts_left(), [])

    @defer.inlineCallbacks
    def test_a_413_from_sendmail_switches_to_a_draft(self):
        self.fake.add_fault("sendMail", status=413)
        raw = build_message(attachments=[("a.pdf", os.urandom(5000), "application/pdf")])
        outcome = yield self.send(raw)
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        [record] = self.fake.messages
        self.assertEqual(record.method, "draft")
        self.assertEqual([a.name for a in record.attachments if a.source == "attachments"],
                         ["a.pdf"])

    @defer.inlineCallbacks
    def test_a_413_for_a_message_without_attachments_is_permanent(self):
        self.fake.add_fault("sendMail", status=413)
        outcome = yield self.send(build_message())
        self.assertEqual(outcome.result, Result.PERMANENT, outcome.detail)
        self.assertIn("413", outcome.detail)


class DraftTests(GraphProviderTestBase):
    @defer.inlineCallbacks
    def test_a_20_mb_attachment_goes_through_an_upload_session(self):
        content = os.urandom(20 * MIB + 12345)
        raw = build_message(attachments=[("big.bin", content, "application/octet-stream")])
        outcome = yield self.send(raw)
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        self.assertIn("1 attachment(s) uploaded", outcome.detail)
        [record] = self.fake.messages
        self.assertEqual(record.method, "draft")
        [big] = [a for a in record.attachments if a.source == "upload"]
        self.assertEqual((big.name, big.content_type, big.is_inline),
                         ("big.bin", "application/octet-stream", False))
        self.assertEqual(big.content, content)
        self.assertEqual(self.fake.drafts_left(), [])
        uploads = upload_requests(self.fake)
        self.assertEqual(len(uploads), 6)
        self.assertTrue(all(not r["authorization"] for r in uploads))
        self.assertTrue(all(r["length"] % (320 * 1024) == 0 for r in uploads[:-1]))
        self.assertTrue(all(r["length"] <= 4 * MIB for r in uploads))
        # the draft was the message less the attachment: its body and headers as they came
        self.assertIn(b"Hello.", record.mime)
        self.assertLess(len(record.mime), 3 * MIB)

    @defer.inlineCallbacks
    def test_inline_images_and_small_attachments_keep_what_graph_allows(self):
        image = os.urandom(3 * MIB + 5)  # inline, large: an upload session with its contentId
        small = os.urandom(200_000)
        medium = os.urandom(2 * MIB)
        raw = build_message(html='<p>logo <img src="cid:logo@app"></p>',
                            inline=[("logo@app", image)],
                            attachments=[("small.txt", small, "text/plain"),
                                         ("medium.pdf", medium, "application/pdf")])
        outcome = yield self.send(raw)
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        [record] = self.fake.messages
        by_name = {a.name: a for a in record.attachments}
        logo = [a for a in record.attachments if a.content_id == "logo@app"]
        self.assertEqual(len(logo), 1)
        self.assertEqual((logo[0].source, logo[0].is_inline, logo[0].content_type,
                          logo[0].content), ("upload", True, "image/png", image))
        # what still fits stays in the MIME, byte for byte
        self.assertEqual(by_name["small.txt"].source, "mime")
        self.assertEqual(by_name["small.txt"].content, small)
        self.assertEqual(by_name["medium.pdf"].content, medium)

    @defer.inlineCallbacks
    def test_save_to_sent_items_false_sends_a_draft_deleted_after_submit(self):
        provider = self.make_provider(save_to_sent_items=False)
        raw = build_message()
        outcome = yield self.send(raw, ("ann@example.com", "hidden@example.com"),
                                  provider=provider)
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        self.assertIn("not kept in Sent Items", outcome.detail)
        [record] = self.fake.messages
        self.assertEqual((record.method, record.saved_to_sent_items), ("draft", False))
        self.assertEqual(record.mime, raw)
        self.assertEqual((record.to, record.bcc), (["ann@example.com"], ["hidden@example.com"]))
        # one PATCH sets both the property and the recipients
        self.assertEqual(self.fake.stats()["requests"].get("updateMessage"), 1)

    @defer.inlineCallbacks
    def test_a_failure_part_way_deletes_the_draft(self):
        self.fake.add_fault("upload", status=400, code="ErrorInvalidRequest", message="bad")
        raw = build_message(attachments=[("big.bin", os.urandom(4 * MIB), "application/zip")])
        outcome = yield self.send(raw)
        self.assertEqual(outcome.result, Result.PERMANENT, outcome.detail)
        self.assertIn("uploading an attachment: Graph 400 ErrorInvalidRequest: bad",
                      outcome.detail)
        self.assertEqual(self.fake.drafts_left(), [])
        self.assertEqual(len(self.fake.deletions), 1)
        self.assertEqual(self.fake.messages, [])

    @defer.inlineCallbacks
    def test_throttling_inside_a_draft_is_waited_out_in_place(self):
        self.fake.add_fault("upload", status=503, retry_after=1)
        self.fake.add_fault("send", status=429, retry_after=1)
        raw = build_message(attachments=[("big.bin", os.urandom(4 * MIB), "application/zip")])
        start = self.reactor.seconds()
        outcome = yield self.send(raw)
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        self.assertGreaterEqual(self.reactor.seconds() - start, 2.0)
        self.assertEqual(len(self.fake.messages), 1)
        self.assertEqual(self.fake.drafts_left(), [])
        self.assertEqual(self.fake.deletions, [])

    @defer.inlineCallbacks
    def test_an_attachment_too_large_for_one_request_and_too_small_for_a_session(self):
        # 3 MiB less a few bytes: its base64 JSON is over 4 MB, and sessions start at 3 MiB
        raw = build_message(attachments=[("gap.bin", os.urandom(3 * MIB - 20),
                                          "application/octet-stream")])
        outcome = yield self.send(raw)
        self.assertEqual(outcome.result, Result.PERMANENT, outcome.detail)
        self.assertIn("too large for one Graph request", outcome.detail)
        self.assertEqual(self.fake.stats()["requests"], {})

    @defer.inlineCallbacks
    def test_without_mail_readwrite_large_messages_fail_permanently(self):
        self.fake.update_app(CLIENT, permissions=["Mail.Send"])
        raw = build_message(attachments=[("big.bin", os.urandom(4 * MIB), "application/zip")])
        outcome = yield self.send(raw)
        self.assertEqual(outcome.result, Result.PERMANENT, outcome.detail)
        self.assertIn("ErrorAccessDenied", outcome.detail)
        self.assertIn("Mail.ReadWrite", outcome.detail)

    @defer.inlineCallbacks
    def test_without_mail_readwrite_save_false_falls_back_to_sendmail(self):
        self.fake.update_app(CLIENT, permissions=["Mail.Send"])
        provider = self.make_provider(save_to_sent_items=False)
        for _ in range(2):
            outcome = yield self.send(build_message(), provider=provider)
            self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        self.assertEqual([m.method for m in self.fake.messages], ["mime", "mime"])
        # the second message did not try a draft again
        self.assertEqual(self.fake.stats()["requests"].get("createMessage"), 1)
        self.assertTrue(any("save_to_sent_items = false is not honoured" in w
                            for w in provider.warnings()))

    @defer.inlineCallbacks
    def test_a_draft_that_cannot_be_deleted_is_remembered_and_deleted_later(self):
        self.patch(self.provider_class(), "_sleep", lambda self_, seconds: defer.succeed(None))
        self.fake.add_fault("send", status=400, code="ErrorInvalidRecipients", message="no")
        self.fake.add_fault("deleteMessage", status=500, times=3)
        raw = build_message(attachments=[("big.bin", os.urandom(4 * MIB), "application/zip")])
        provider = self.make_provider()
        outcome = yield self.send(raw, provider=provider)
        self.assertEqual(outcome.result, Result.PERMANENT, outcome.detail)
        self.assertEqual(len(self.fake.drafts_left()), 1)
        self.assertTrue(any("could not be deleted" in w for w in provider.warnings()))
        # the next delivery for the mailbox deletes it
        outcome = yield self.send(raw, provider=provider)
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        for _ in range(100):
            if not self.fake.drafts_left():
                break
            yield task.deferLater(self.reactor, 0.05, lambda: None)
        self.assertEqual(self.fake.drafts_left(), [])
        self.assertEqual(provider.warnings(), [])

    @staticmethod
    def provider_class():
        return GraphProvider

    @defer.inlineCallbacks
    def test_cancelling_a_delivery_deletes_its_draft(self):
        self.fake.add_fault("upload", action="hang")
        raw = build_message(attachments=[("big.bin", os.urandom(4 * MIB), "application/zip")])
        d = self.send(raw)
        while not self.fake.stats()["statuses"].get("upload"):
            yield task.deferLater(self.reactor, 0.05, lambda: None)
        d.cancel()
        yield self.assertFailure(d, defer.CancelledError)
        for _ in range(100):
            if self.fake.deletions:
                break
            yield task.deferLater(self.reactor, 0.05, lambda: None)
        self.assertEqual(self.fake.drafts_left(), [])
        self.assertEqual(self.fake.messages, [])


class ErrorTests(GraphProviderTestBase):
    @defer.inlineCallbacks
    def test_send_as_denied_is_permanent(self):
        outcome = yield self.send(build_message(sender="boss@contoso.com"))
        self.assertEqual(outcome.result, Result.PERMANENT, outcome.detail)
        self.assertIn("sendMail: Graph 403 ErrorSendAsDenied", outcome.detail)
        self.assertIn("request-id", outcome.detail)

    @defer.inlineCallbacks
    def test_an_unknown_or_disabled_mailbox_is_permanent(self):
        outcome = yield self.send(build_message(sender="nobody@contoso.com"),
                                  mailbox="nobody@contoso.com")
        self.assertEqual(outcome.result, Result.PERMANENT, outcome.detail)
        self.assertIn("404 ErrorInvalidUser", outcome.detail)
        self.fake.add_mailbox("gone@contoso.com", tenant=TENANT, mail_enabled=False)
        outcome = yield self.send(build_message(sender="gone@contoso.com"),
                                  mailbox="gone@contoso.com")
        self.assertEqual(outcome.result, Result.PERMANENT, outcome.detail)
        self.assertIn("MailboxNotEnabledForRESTAPI", outcome.detail)

    @defer.inlineCallbacks
    def test_access_denied_is_permanent_and_says_what_to_grant(self):
        self.fake.update_app(CLIENT, mailboxes=["other@contoso.com"])
        outcome = yield self.send(build_message())
        self.assertEqual(outcome.result, Result.PERMANENT, outcome.detail)
        self.assertIn("application access policy", outcome.detail)

    @defer.inlineCallbacks
    def test_throttling_blocks_the_whole_mailbox(self):
        self.fake.add_fault("sendMail", status=429, retry_after=30)
        before = self.reactor.seconds()
        outcome = yield self.send(build_message())
        self.assertEqual(outcome.result, Result.TEMPORARY, outcome.detail)
        self.assertTrue(outcome.mailbox_wide)
        self.assertLess(abs(outcome.not_before - (before + 30)), 2)
        self.assertIn("429 ApplicationThrottled", outcome.detail)
        # the next message for that mailbox waits without asking Graph
        second = yield self.send(build_message())
        self.assertEqual(second.result, Result.TEMPORARY)
        self.assertTrue(second.mailbox_wide)
        self.assertEqual(self.fake.stats()["requests"]["sendMail"], 1)

    @defer.inlineCallbacks
    def test_a_retry_after_date_is_honoured(self):
        self.fake.add_fault("sendMail", status=503, retry_after_date=120)
        outcome = yield self.send(build_message())
        self.assertEqual(outcome.result, Result.TEMPORARY, outcome.detail)
        self.assertTrue(outcome.mailbox_wide)
        self.assertGreater(outcome.not_before, self.reactor.seconds() + 100)

    @defer.inlineCallbacks
    def test_server_errors_are_temporary(self):
        for status in (500, 502, 503, 504):
            self.fake.add_fault("sendMail", status=status)
            outcome = yield self.send(build_message())
            self.assertEqual(outcome.result, Result.TEMPORARY, outcome.detail)
            self.assertIn(f"Graph {status}", outcome.detail)
            # a gateway timeout: the backend may have sent it all the same
            self.assertEqual(outcome.ambiguous, status == 504)
        outcome = yield self.send(build_message())
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)

    @defer.inlineCallbacks
    def test_a_lost_answer_after_sending_is_ambiguous(self):
        self.fake.add_fault("sendMail", action="accept_then_drop")
        outcome = yield self.send(build_message())
        self.assertEqual(outcome.result, Result.TEMPORARY, outcome.detail)
        self.assertTrue(outcome.ambiguous)
        self.assertEqual(len(self.fake.messages), 1)

    @defer.inlineCallbacks
    def test_a_timeout_after_sending_is_ambiguous(self):
        provider = self.make_provider(timeout=1.0)
        yield provider._tokens.token()
        self.fake.add_fault("sendMail", action="hang")
        outcome = yield self.send(build_message(), provider=provider)
        self.assertEqual(outcome.result, Result.TEMPORARY, outcome.detail)
        self.assertTrue(outcome.ambiguous)
        self.assertIn("no answer from Graph within 1s", outcome.detail)

    @defer.inlineCallbacks
    def test_refused_connections_are_temporary_and_not_ambiguous(self):
        provider = self.make_provider()
        yield provider._tokens.token()
        yield provider.stop()  # no pooled connection left
        provider = self.make_provider()
        provider._tokens._token = ("x", self.reactor.seconds() + 600)
        self.fake.refuse_connections(1)
        outcome = yield self.send(build_message(), provider=provider)
        self.assertEqual(outcome.result, Result.TEMPORARY, outcome.detail)
        self.assertFalse(outcome.ambiguous)

    @defer.inlineCallbacks
    def test_an_expired_token_is_renewed_once(self):
        provider = self.make_provider()
        outcome = yield self.send(build_message(), provider=provider)
        self.assertEqual(outcome.result, Result.SENT)
        self.fake.expire_tokens()
        outcome = yield self.send(build_message(), provider=provider)
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        self.assertEqual(self.fake.stats()["token_requests"], 2)
        self.assertEqual(self.fake.stats()["statuses"]["sendMail"], {202: 2, 401: 1})

    @defer.inlineCallbacks
    def test_a_token_refused_twice_is_temporary(self):
        self.fake.add_fault("sendMail", status=401, times=2)
        outcome = yield self.send(build_message())
        self.assertEqual(outcome.result, Result.TEMPORARY, outcome.detail)
        self.assertIn("401", outcome.detail)
        self.assertEqual(self.fake.stats()["token_requests"], 2)


class CredentialTests(GraphProviderTestBase):
    def capture_log(self):
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    @defer.inlineCallbacks
    def test_a_wrong_secret_defers_and_says_why_until_it_is_fixed(self):
        events = self.capture_log()
        provider = self.make_provider(secret="wrong-secret-value")
        outcome = yield self.send(build_message(), provider=provider)
        self.assertEqual(outcome.result, Result.TEMPORARY, outcome.detail)
        self.assertIn("AADSTS7000215", outcome.detail)
        self.assertIn("AADSTS7000215", provider.credential_status().problem)
        self.assertTrue(any("client secret was rejected" in w for w in provider.warnings()))
        check = yield provider.check()
        self.assertFalse(check.ok)
        self.assertIn("AADSTS7000215", check.steps[0].detail)
        self.fake.add_secret(CLIENT, "wrong-secret-value")  # the admin fixes it
        outcome = yield self.send(build_message(), provider=provider)
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        self.assertIsNone(provider.credential_status().problem)
        self.assertEqual(provider.warnings(), [])
        text = repr(events) + repr(check.to_json()) + outcome.detail
        self.assertNotIn("wrong-secret-value", text)

    @defer.inlineCallbacks
    def test_msal_runs_off_the_reactor_and_ignores_requests_ca_bundle(self):
        import threading

        import certifi

        for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            old = os.environ.get(name)
            os.environ[name] = certifi.where()  # a bundle without the test CA
            self.addCleanup(lambda n=name, o=old: os.environ.pop(n) if o is None
                            else os.environ.__setitem__(n, o))
        provider = self.make_provider()
        threads_seen = []
        build, acquire = provider._tokens._build, provider._tokens._acquire

        def watched_build():
            threads_seen.append(threading.current_thread() is threading.main_thread())
            return build()

        def watched_acquire(drop):
            threads_seen.append(threading.current_thread() is threading.main_thread())
            return acquire(drop)

        provider._tokens._build, provider._tokens._acquire = watched_build, watched_acquire
        outcome = yield self.send(build_message(), provider=provider)
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        self.assertEqual(threads_seen, [False, False])

    @defer.inlineCallbacks
    def test_an_expired_secret_defers_with_aadsts7000222(self):
        self.fake.add_secret(CLIENT, "old-secret-value", end="2020-01-01T00:00:00Z")
        provider = self.make_provider(secret="old-secret-value")
        outcome = yield self.send(build_message(), provider=provider)
        self.assertEqual(outcome.result, Result.TEMPORARY, outcome.detail)
        self.assertIn("AADSTS7000222", outcome.detail)
        self.assertIn("has expired", provider.credential_status().problem)

    @defer.inlineCallbacks
    def test_an_unreachable_or_throttled_token_endpoint_is_temporary(self):
        self.fake.add_fault("token", status=503)
        outcome = yield self.send(build_message())
        self.assertEqual(outcome.result, Result.TEMPORARY, outcome.detail)
        self.assertIn("cannot get a token", outcome.detail)
        self.assertIsNone(self.provider.credential_status().problem)

    @defer.inlineCallbacks
    def test_certificate_credentials_sign_a_verified_assertion(self):
        cert, key, pem = self_signed_certificate(self.directory, days=20)
        self.fake.add_certificate(CLIENT, pem)
        provider = self.make_provider(certificate=str(cert), key=str(key))
        outcome = yield self.send(build_message(), provider=provider)
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        [request] = self.fake.token_requests
        self.assertEqual((request["method"], request["assertion"]["alg"],
                          request["assertion"]["thumbprint"]),
                         ("client_assertion", "PS256", "x5t#S256"))
        status = provider.credential_status()
        now = datetime.datetime.now(datetime.UTC)
        self.assertEqual((status.source, status.expires),
                         ("certificate", (now + datetime.timedelta(days=20)).date()))
        self.assertEqual(provider.warnings(),
                         [f"the certificate expires in 20 days ({status.expires})"])

    @defer.inlineCallbacks
    def test_an_unregistered_certificate_defers(self):
        cert, key, _ = self_signed_certificate(self.directory)
        provider = self.make_provider(certificate=str(cert), key=str(key))
        outcome = yield self.send(build_message(), provider=provider)
        self.assertEqual(outcome.result, Result.TEMPORARY, outcome.detail)
        self.assertIn("AADSTS700027", outcome.detail)

    def test_configured_expiry_warnings(self):
        today = datetime.datetime.now(datetime.UTC).date()
        soon = today + datetime.timedelta(days=12)
        provider = self.make_provider(expires=soon, warning_days=30)
        self.assertEqual(provider.warnings(),
                         [f"the client secret expires in 12 days ({soon.isoformat()})"])
        status = provider.credential_status()
        self.assertEqual((status.expires, status.source, status.problem),
                         (soon, "configured", None))
        later = today + datetime.timedelta(days=31)
        self.assertEqual(self.make_provider(expires=later, warning_days=30).warnings(), [])

    @defer.inlineCallbacks
    def test_after_expiry_every_failure_says_so(self):
        past = datetime.date(2020, 1, 31)
        provider = self.make_provider(expires=past)
        self.assertIn("the client secret expired on 2020-01-31", provider.warnings()[0])
        self.fake.add_fault("sendMail", status=503)
        outcome = yield self.send(build_message(), provider=provider)
        self.assertIn("the client secret expired on 2020-01-31", outcome.detail)
        self.assertEqual(provider.credential_status().problem,
                         "the client secret expired on 2020-01-31")

    @defer.inlineCallbacks
    def test_the_expiry_is_read_from_graph_where_permitted(self):
        now = datetime.datetime.now(datetime.UTC)
        ours = (now + datetime.timedelta(days=10)).replace(microsecond=0)
        theirs = (now + datetime.timedelta(days=300)).replace(microsecond=0)
        self.fake.update_app(CLIENT, permissions=list(ALL_PERMISSIONS) + ["Application.Read.All"],
                             password_credentials=[
                                 {"endDateTime": ours.isoformat().replace("+00:00", "Z"),
                                  "hint": SECRET[:3], "keyId": "1"},
                                 {"endDateTime": theirs.isoformat().replace("+00:00", "Z"),
                                  "hint": "zzz", "keyId": "2"}])
        provider = self.make_provider(expires=datetime.date(2099, 1, 1))
        yield provider._daily()
        status = provider.credential_status()
        self.assertEqual((status.expires, status.source), (ours.date(), "graph"))
        self.assertEqual(provider.warnings(),
                         [f"the client secret expires in 10 days ({ours.date().isoformat()})"])

    @defer.inlineCallbacks
    def test_without_application_read_all_the_configured_date_stays(self):
        when = datetime.date(2099, 1, 1)
        provider = self.make_provider(expires=when)
        yield provider._daily()
        self.assertEqual(self.fake.stats()["statuses"]["getApplication"], {403: 1})
        status = provider.credential_status()
        self.assertEqual((status.expires, status.source), (when, "configured"))

    @defer.inlineCallbacks
    def test_start_logs_the_warnings_and_repeats_daily(self):
        events = self.capture_log()
        config = provider_config(self.fake.url, self.ca.ca_path,
                                 expires=datetime.date.today() + datetime.timedelta(days=5))
        provider = GraphProvider(config, self.reactor)
        self.addCleanup(provider.stop)
        provider.start()
        for _ in range(100):
            if any("expires in" in str(e.get("warning", "")) for e in events):
                break
            yield task.deferLater(self.reactor, 0.05, lambda: None)
        self.assertTrue(any("the client secret expires in" in str(e.get("warning", ""))
                            for e in events))
        self.assertTrue(provider._loop.running)
        self.assertEqual(provider._loop.interval, 86400)


class CheckTests(GraphProviderTestBase):
    @defer.inlineCallbacks
    def test_check_without_user_read_all(self):
        provider = self.make_provider()
        result = yield provider.check()
        self.assertTrue(result.ok, result.to_json())
        steps = {s.name: s for s in result.steps}
        self.assertEqual(list(steps), ["token", "sender mailbox", "secret expiry"])
        self.assertIn("not permitted to read users (User.Read.All); sending may still work",
                      steps["sender mailbox"].detail)
        self.assertIn("unknown", steps["secret expiry"].detail)

    @defer.inlineCallbacks
    def test_check_with_every_permission(self):
        self.fake.update_app(CLIENT, permissions=list(ALL_PERMISSIONS) + [
            "User.Read.All", "Application.Read.All"])
        provider = self.make_provider()
        result = yield provider.check()
        self.assertTrue(result.ok, result.to_json())
        steps = {s.name: s for s in result.steps}
        self.assertIn("found", steps["sender mailbox"].detail)
        self.assertIn("from Graph", steps["secret expiry"].detail)

    @defer.inlineCallbacks
    def test_check_of_an_unknown_sender(self):
        self.fake.update_app(CLIENT, permissions=["Mail.Send", "User.Read.All"])
        provider = self.make_provider(sender="nobody@contoso.com")
        result = yield provider.check()
        self.assertFalse(result.ok)
        steps = {s.name: s for s in result.steps}
        self.assertFalse(steps["sender mailbox"].ok)
        self.assertIn("404", steps["sender mailbox"].detail)


class ConcurrencyTests(GraphProviderTestBase):
    latency = 0.2

    @defer.inlineCallbacks
    def sends(self, provider, n, raw):
        outcomes = yield defer.gatherResults([self.send(raw, provider=provider)
                                              for _ in range(n)])
        return outcomes

    @defer.inlineCallbacks
    def test_never_more_than_four_requests_in_flight_per_mailbox(self):
        provider = self.make_provider(concurrency=10)
        outcomes = yield self.sends(provider, 12, build_message())
        self.assertEqual({o.result for o in outcomes}, {Result.SENT})
        stats = self.fake.stats()
        self.assertEqual(stats["max_concurrency"], {MAILBOX: 4})
        self.assertEqual(stats["throttled"], {})

    @defer.inlineCallbacks
    def test_the_configured_concurrency_is_kept(self):
        provider = self.make_provider(concurrency=2)
        raw = build_message(attachments=[("big.bin", os.urandom(4 * MIB), "application/zip")])
        outcomes = yield self.sends(provider, 4, raw)
        self.assertEqual({o.result for o in outcomes}, {Result.SENT})
        self.assertEqual(self.fake.stats()["max_concurrency"], {MAILBOX: 2})
