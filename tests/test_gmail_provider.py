"""The gmail provider (smtprelay/providers/gmail/) against the fake Google, over HTTPS.

Owns the provider's behaviour with real sockets and real google-auth: FakeGoogle
runs in-process on loopback with the test CA, the provider is built from a real
configuration document, google-auth refreshes on the token threads, the upload
goes through treq.  Nothing sleeps on purpose; the only waits are the provider's
own (1 s) timeouts where a timeout is the point.

The pure rules are tested here too (tests of :mod:`smtprelay.providers.gmail.classify`),
without sockets.
"""

import atexit
import datetime
import io
import json
import os
import shutil
import tempfile
import threading
import time

from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from smtprelay.config import parse
from smtprelay.model import Result
from smtprelay.providers import gmail
from smtprelay.providers.base import IProvider, OutgoingMessage
from smtprelay.providers.gmail import classify as rules
from smtprelay.providers.gmail import credentials as gmail_credentials
from smtprelay.providers.gmail import requests as gmail_requests
from smtprelay.scrub import scrub_tokens
from tests.fakes.gmail import GMAIL_SEND, FakeGoogle
from tests.fakes.google_accounts import OAuthUser, ServiceAccountKey, new_private_key
from tests.fakes.tlsca import TestCA

ALICE = "alice@example.com"
BOB = "bob@example.com"
CAROL = "carol@example.org"
DAVE = "dave@example.net"
ALIAS = "sales@example.com"
READONLY = "https://www.googleapis.com/auth/gmail.readonly"

_shared = {}


def _tempdir(prefix):
    directory = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, directory, True)
    return directory


def shared_ca(name="ca"):
    if name not in _shared:
        _shared[name] = TestCA(_tempdir(f"gmail-provider-{name}-"))
    return _shared[name]


def rsa_key():
    if "key" not in _shared:
        _shared["key"] = new_private_key()
    return _shared["key"]


def raw_message(frm=ALICE, to=BOB, extra=(), body="Hello.\r\n"):
    lines = ["Received: from app ([10.0.0.1])\r\n\tby relay.test (smtprelay) with ESMTP id X;"
             "\r\n\tMon, 24 Nov 2025 10:00:00 +0000",
             f"From: {frm}", f"To: {to}", "Subject: test",
             "Message-ID: <1@app.example>", "Date: Mon, 24 Nov 2025 10:00:00 +0000", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8")


class GmailCase(unittest.TestCase):
    timeout = 60

    def setUp(self):
        for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            saved = os.environ.pop(var, None)
            if saved is not None:
                self.addCleanup(os.environ.__setitem__, var, saved)
        self.ca = shared_ca()
        self.fake = FakeGoogle(reactor)
        self.server = self.fake.listen(self.ca)
        self.addCleanup(self.fake.stop)
        self.fake.add_mailbox(ALICE, send_as=[ALIAS])
        self.fake.add_mailbox(BOB)
        self.dir = tempfile.mkdtemp(prefix="gmail-provider-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.sa = ServiceAccountKey.generate(private_key=rsa_key())
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    # -- helpers -------------------------------------------------------------------------

    def key_file(self, token_uri=None):
        return str(self.sa.write(os.path.join(self.dir, "sa.json"),
                                 token_uri or self.server.token_uri))

    def provider(self, provider=None, default=ALICE, monitoring=None, start=False):
        settings = {"type": "gmail", "service_account_file": None,
                    "api_endpoint": self.server.url, "ca_file": str(self.ca.ca_path),
                    "timeout": "5s"}
        settings.update(provider or {})
        if settings.get("client_id"):
            settings.pop("service_account_file")
        elif settings["service_account_file"] is None:
            settings["service_account_file"] = self.key_file()
        settings = {k: v for k, v in settings.items() if v is not None}
        document = {"sender": {"default": default, "allowed": ["*"]}, "provider": settings,
                    "database": {"url": f"sqlite:///{self.dir}/relay.db"},
                    "admin": {"listen": ""}, "monitoring": monitoring or {}}
        config = parse(document, base_dir=self.dir)
        p = gmail.GmailProvider(config, reactor)
        self.assertTrue(IProvider.providedBy(p))
        self.addCleanup(p.stop)
        if start:
            p.start()
        return p

    def delegate(self, delegations=None):
        self.sa.register(self.fake, delegations if delegations is not None
                         else {"@example.com": [GMAIL_SEND]})

    def oauth_user(self, mailbox=ALICE, scopes=(GMAIL_SEND,)):
        user = OAuthUser.generate(mailbox, scopes).register(self.fake)
        self.user = user
        return {"client_id": user.client_id, "client_secret": user.client_secret,
                "refresh_token": user.refresh_token, "token_uri": self.server.token_uri}

    def outgoing(self, raw=None, recipients=(BOB,), mailbox=ALICE, sender=None):
        raw = raw_message() if raw is None else raw
        return OutgoingMessage(id="M1", sender=sender if sender is not None else mailbox,
                               mailbox=mailbox, recipients=tuple(recipients), size=len(raw),
                               body=io.BytesIO(raw))

    def assertNear(self, value, expected, delta):
        self.assertTrue(abs(value - expected) <= delta, f"{value} is not {expected} +- {delta}")

    def log_text(self):
        return "\n".join(formatEvent(e) or "" for e in self.events)

    def warnings_logged(self):
        return [formatEvent(e) for e in self.events
                if e.get("log_level") is not None and e["log_level"].name in ("warn", "error")]

    def assertNoSecrets(self, *texts):
        secrets = list(self.fake.access_tokens)
        if getattr(self, "user", None):
            secrets += [self.user.client_secret, self.user.refresh_token]
        secrets.append(self.sa.private_key_pem.splitlines()[1])
        blob = "\n".join([self.log_text(), *texts])
        for secret in secrets:
            self.assertNotIn(secret, blob)


class ServiceAccountSendTests(GmailCase):
    @defer.inlineCallbacks
    def test_sends_byte_exact_as_the_mailbox_and_records_the_id(self):
        self.delegate()
        p = self.provider()
        raw = raw_message(body="x" * 300_000 + "\r\n")
        outcome = yield p.send(self.outgoing(raw))
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        sent = self.fake.messages[0]
        self.assertEqual(sent.raw, raw)
        self.assertEqual((sent.mailbox, sent.user_id, sent.via), (ALICE, ALICE, "media"))
        self.assertEqual(sent.client, self.sa.client_email)
        self.assertEqual(outcome.provider_id, sent.id)
        self.assertEqual(outcome.detail, f"200 id={sent.id} threadId={sent.thread_id}")
        self.assertEqual(p.timeout, 5.0)
        self.assertEqual(p.warnings(), [])
        self.assertNoSecrets(outcome.detail)

    @defer.inlineCallbacks
    def test_one_credential_per_mailbox_and_tokens_reused(self):
        self.delegate()
        p = self.provider()
        for mailbox in (ALICE, BOB, ALICE, BOB, ALICE):
            outcome = yield p.send(self.outgoing(raw_message(frm=mailbox, to=CAROL),
                                                 [CAROL], mailbox=mailbox))
            self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        self.assertEqual(dict(self.fake.token_counts), {ALICE: 1, BOB: 1})
        self.assertEqual([m.mailbox for m in self.fake.messages], [ALICE, BOB, ALICE, BOB, ALICE])
        claims = [r.claims for r in self.fake.token_requests]
        self.assertEqual({c["scope"] for c in claims}, {GMAIL_SEND})
        self.assertEqual({c["sub"] for c in claims}, {ALICE, BOB})

    @defer.inlineCallbacks
    def test_concurrent_sends_share_one_refresh(self):
        self.delegate()
        p = self.provider()
        outcomes = yield defer.gatherResults([
            p.send(self.outgoing(recipients=[BOB])) for _ in range(6)])
        self.assertEqual({o.result for o in outcomes}, {Result.SENT})
        self.assertEqual(self.fake.token_counts[ALICE], 1)
        self.assertEqual(len(self.fake.messages), 6)

    @defer.inlineCallbacks
    def test_expired_token_is_refreshed_once_on_401(self):
        self.delegate()
        p = self.provider()
        yield p.send(self.outgoing())
        self.fake.expire_access_tokens(ALICE)
        outcome = yield p.send(self.outgoing())
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        self.assertEqual(self.fake.token_counts[ALICE], 2)
        self.assertEqual(len(self.fake.messages), 2)

    @defer.inlineCallbacks
    def test_401_twice_is_temporary(self):
        self.delegate()
        p = self.provider()
        self.fake.add_fault("send", status=401, reason="authError", count=2)
        outcome = yield p.send(self.outgoing())
        self.assertEqual(outcome.result, Result.TEMPORARY)
        self.assertTrue(outcome.detail.startswith("401 authError: Request had invalid "), outcome)
        self.assertIn("again with a fresh token", outcome.detail)
        self.assertEqual(self.fake.token_counts[ALICE], 2)
        self.assertEqual(self.fake.messages, [])

    @defer.inlineCallbacks
    def test_key_file_token_uri_is_used_unless_configured(self):
        self.delegate()
        # the configured token_uri points nowhere: the explicit setting wins
        p = self.provider({"token_uri": "https://127.0.0.1:1/token"})
        self.assertEqual(p.token_uri, "https://127.0.0.1:1/token")
        outcome = yield p.send(self.outgoing())
        self.assertEqual(outcome.result, Result.TEMPORARY)
        self.assertIn("the token endpoint https://127.0.0.1:1/token is unreachable: "
                      "connection failed", outcome.detail)
        self.assertEqual(p.warnings(), [])  # an outage, not a credential problem
        # not configured: the key file's token_uri (the fake) is used
        p = self.provider()
        self.assertEqual(p.token_uri, self.server.token_uri)
        outcome = yield p.send(self.outgoing())
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)

    @defer.inlineCallbacks
    def test_google_auth_runs_on_the_token_threads_only(self):
        self.delegate()
        p = self.provider()
        seen = []
        original = p._tokens._refresh_blocking

        def spy(google):
            seen.append(threading.current_thread().name)
            return original(google)

        p._tokens._refresh_blocking = spy
        outcome = yield p.send(self.outgoing())
        self.assertEqual(outcome.result, Result.SENT)
        self.assertEqual(len(seen), 1)
        self.assertNotEqual(seen[0], threading.current_thread().name)
        self.assertIn("smtprelay-gmail-tokens", seen[0])
        yield p.stop()
        self.assertFalse(p._tokens._threads._started)

    @defer.inlineCallbacks
    def test_unusable_ca_file_defers_and_warns(self):
        self.delegate()
        bad = os.path.join(self.dir, "bad-ca.pem")
        with open(bad, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----\n")
        p = self.provider({"ca_file": bad})
        outcome = yield p.send(self.outgoing())
        self.assertEqual(outcome.result, Result.TEMPORARY)
        self.assertTrue(outcome.detail.startswith(f"provider.ca_file {bad} cannot be used"),
                        outcome.detail)
        self.assertEqual(p.warnings(), [outcome.detail])

    @defer.inlineCallbacks
    def test_credential_cache_is_bounded(self):
        self.patch(gmail_credentials, "CACHE_SIZE", 2)
        self.delegate({"*": [GMAIL_SEND]})
        for n in range(4):
            self.fake.add_mailbox(f"u{n}@example.com")
        p = self.provider()
        for n in range(4):
            mailbox = f"u{n}@example.com"
            outcome = yield p.send(self.outgoing(raw_message(frm=mailbox), mailbox=mailbox))
            self.assertEqual(outcome.result, Result.SENT)
        self.assertEqual(list(p._tokens._cache), ["u2@example.com", "u3@example.com"])


class EnvelopeTests(GmailCase):
    @defer.inlineCallbacks
    def test_exactly_the_envelope_receives(self):
        self.delegate()
        p = self.provider()
        raw = raw_message(to=f"Bob <{BOB}>, Carol <{CAROL}>")
        outcome = yield p.send(self.outgoing(raw, [BOB, DAVE]))
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        sent = self.fake.messages[0]
        self.assertEqual(sent.recipients, (BOB, DAVE))
        self.assertEqual(sent.bcc, (DAVE,))
        self.assertNotIn(DAVE.encode(), sent.delivered)  # invisible to the others
        self.assertNotIn(CAROL.encode(), sent.delivered)
        self.assertEqual(sent.raw, raw.replace(f"To: Bob <{BOB}>, Carol <{CAROL}>".encode(),
                                               f"To: Bob <{BOB}>".encode())
                         .replace(b"\r\n\r\n", f"\r\nBcc: {DAVE}\r\n\r\n".encode(), 1))
        warned = self.warnings_logged()
        self.assertTrue(any("visible recipient headers changed" in w and CAROL in w
                            for w in warned), warned)

    @defer.inlineCallbacks
    def test_bcc_only_no_warning(self):
        self.delegate()
        p = self.provider()
        outcome = yield p.send(self.outgoing(raw_message(), [BOB, DAVE, CAROL]))
        self.assertEqual(outcome.result, Result.SENT)
        self.assertEqual(self.fake.messages[0].recipients, (BOB, DAVE, CAROL))
        self.assertFalse(any("recipient headers" in w for w in self.warnings_logged()))

    @defer.inlineCallbacks
    def test_from_rewrite_is_warned(self):
        self.delegate()
        p = self.provider()
        outcome = yield p.send(self.outgoing(raw_message(frm="Mallory <m@elsewhere.example>")))
        self.assertEqual(outcome.result, Result.SENT)
        self.assertTrue(self.fake.messages[0].from_rewritten)
        self.assertTrue(any("From m@elsewhere.example is not the mailbox alice@example.com"
                            in w for w in self.warnings_logged()), self.warnings_logged())
        self.events[:] = []
        yield p.send(self.outgoing(raw_message(frm=f"Sales <{ALIAS}>")))
        self.assertFalse(self.fake.messages[1].from_rewritten)  # a verified alias
        self.assertTrue(any("verified send-as alias" in w for w in self.warnings_logged()))
        self.events[:] = []
        yield p.send(self.outgoing(raw_message(frm=ALICE.upper())))
        self.assertEqual(self.warnings_logged(), [])

    @defer.inlineCallbacks
    def test_too_large_fails_without_a_call(self):
        self.delegate()
        p = self.provider()
        raw = raw_message(body="")
        raw += b"x" * (rules.MAX_MESSAGE_BYTES - len(raw) + 1)
        outcome = yield p.send(self.outgoing(raw))
        self.assertEqual(outcome.result, Result.PERMANENT)
        self.assertEqual(outcome.detail, "36,700,161 bytes is too large for the Gmail API "
                                         "(at most 36,700,160 bytes, 35 MiB)")
        self.assertEqual((self.fake.token_requests, self.fake.messages), ([], []))

    @defer.inlineCallbacks
    def test_the_limit_itself_is_sent(self):
        self.delegate()
        p = self.provider({"timeout": "60s"})
        raw = raw_message(body="")
        raw += os.urandom((rules.MAX_MESSAGE_BYTES - len(raw)) // 2).hex().encode()
        raw += b"y" * (rules.MAX_MESSAGE_BYTES - len(raw))
        self.assertEqual(len(raw), rules.MAX_MESSAGE_BYTES)
        outcome = yield p.send(self.outgoing(raw))
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        self.assertEqual(self.fake.messages[0].raw_size, rules.MAX_MESSAGE_BYTES)
        self.assertTrue(self.fake.messages[0].raw == raw)

    @defer.inlineCallbacks
    def test_header_block_without_end_is_permanent(self):
        self.delegate()
        p = self.provider()
        raw = b"To: bob@example.com\r\nX-Long: " + b"a" * (1 << 20) + b"\r\n" + b"x" * 10
        outcome = yield p.send(self.outgoing(raw))
        self.assertEqual(outcome.result, Result.PERMANENT)
        self.assertIn("header section is larger than 1 MiB", outcome.detail)
        # a message that is only headers is fine
        outcome = yield p.send(self.outgoing(b"To: bob@example.com\r\nSubject: x\r\n"))
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)


class CredentialTests(GmailCase):
    @defer.inlineCallbacks
    def test_delegation_refused_defers_and_warns_until_granted(self):
        self.delegate({ALICE: [GMAIL_SEND]})
        p = self.provider()
        outcome = yield p.send(self.outgoing(raw_message(frm=BOB), mailbox=BOB))
        self.assertEqual(outcome.result, Result.TEMPORARY)
        self.assertTrue(outcome.detail.startswith(
            "delegation not granted for bob@example.com: unauthorized_client: Client is "
            "unauthorized"), outcome.detail)
        self.assertEqual(len(p.warnings()), 1)
        self.assertTrue(p.warnings()[0].startswith("delegation not granted for bob@example.com"))
        self.assertTrue(p.credential_status().problem.startswith("delegation not granted"))
        self.assertTrue(any("gmail credential problem" in w for w in self.warnings_logged()))
        # ALICE is fine meanwhile
        outcome = yield p.send(self.outgoing())
        self.assertEqual(outcome.result, Result.SENT)
        self.fake.grant_delegation(self.sa.client_email, BOB, [GMAIL_SEND])
        outcome = yield p.send(self.outgoing(raw_message(frm=BOB), mailbox=BOB))
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        self.assertEqual(p.warnings(), [])
        self.assertIsNone(p.credential_status().problem)

    @defer.inlineCallbacks
    def test_unknown_mailbox_is_permanent(self):
        self.delegate({"*": [GMAIL_SEND]})
        p = self.provider()
        outcome = yield p.send(self.outgoing(mailbox="nobody@example.com"))
        self.assertEqual(outcome.result, Result.PERMANENT)
        self.assertIn("nobody@example.com is not a user of the Google Workspace domain",
                      outcome.detail)
        self.assertEqual(p.warnings(), [])

    @defer.inlineCallbacks
    def test_deleted_key_is_a_credential_problem(self):
        other = ServiceAccountKey.generate(private_key=rsa_key())
        self.sa = other  # registered with the fake under another key id
        self.sa.register(self.fake, {"*": [GMAIL_SEND]})
        self.fake.service_accounts[other.client_email.lower()].keys.clear()
        p = self.provider()
        outcome = yield p.send(self.outgoing())
        self.assertEqual(outcome.result, Result.TEMPORARY)
        self.assertIn("the service account key was rejected: invalid_grant: Invalid JWT "
                      "Signature.", outcome.detail)
        self.assertEqual(len(p.warnings()), 1)

    @defer.inlineCallbacks
    def test_broken_key_file_defers_every_message(self):
        path = os.path.join(self.dir, "broken.json")
        with open(path, "w") as f:
            json.dump({"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----"
                       "\nnot a key\n-----END PRIVATE KEY-----\n", "client_email": "x@y"}, f)
        p = self.provider({"service_account_file": path}, start=True)
        outcome = yield p.send(self.outgoing())
        self.assertEqual(outcome.result, Result.TEMPORARY)
        self.assertTrue(outcome.detail.startswith(
            f"the service account key file {path} cannot be used: "), outcome.detail)
        self.assertNotIn("not a key", outcome.detail)
        self.assertEqual(p.warnings(), [outcome.detail])
        self.assertEqual(p.credential_status().problem, outcome.detail)

    @defer.inlineCallbacks
    def test_token_endpoint_outage_is_temporary_without_warning(self):
        self.delegate()
        self.fake.add_fault("token", status=503, count=None)
        p = self.provider()
        started = time.monotonic()
        outcome = yield p.send(self.outgoing())
        self.assertEqual(outcome.result, Result.TEMPORARY)
        self.assertTrue(outcome.detail.startswith("the token endpoint is unavailable: "
                                                  "temporarily_unavailable"), outcome.detail)
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(self.fake.faults[0].fired, 3)  # google-auth's own retries
        self.assertEqual(p.warnings(), [])

    @defer.inlineCallbacks
    def test_hung_token_endpoint_is_bounded_by_the_timeout(self):
        self.delegate()
        self.fake.add_fault("token", kind="hang", count=None)
        p = self.provider({"timeout": "1s"})
        started = time.monotonic()
        outcome = yield p.send(self.outgoing())
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(outcome.result, Result.TEMPORARY)
        self.assertIn("is unreachable: timed out", outcome.detail)
        self.assertFalse(outcome.ambiguous)


class OAuthTests(GmailCase):
    @defer.inlineCallbacks
    def test_sends_as_me(self):
        p = self.provider(self.oauth_user())
        outcome = yield p.send(self.outgoing())
        self.assertEqual(outcome.result, Result.SENT, outcome.detail)
        sent = self.fake.messages[0]
        self.assertEqual((sent.user_id, sent.mailbox, sent.client),
                         ("me", ALICE, self.user.client_id))
        self.assertEqual(self.warnings_logged(), [])
        # another sending mailbox: still sent as the user, with a warning
        outcome = yield p.send(self.outgoing(raw_message(frm=BOB), mailbox=BOB))
        self.assertEqual(outcome.result, Result.SENT)
        self.assertEqual(self.fake.messages[1].mailbox, ALICE)
        warned = self.warnings_logged()
        self.assertTrue(any("sent as the OAuth user's mailbox (alice@example.com), not as "
                            "bob@example.com" in w for w in warned), warned)
        self.assertTrue(any("From bob@example.com is not the mailbox alice@example.com" in w
                            for w in warned), warned)
        self.assertEqual(self.fake.token_counts[ALICE], 1)
        self.assertNoSecrets(outcome.detail)

    @defer.inlineCallbacks
    def test_revoked_refresh_token_defers_and_warns(self):
        p = self.provider(self.oauth_user())
        yield p.send(self.outgoing())
        self.fake.revoke_refresh_token(self.user.refresh_token)
        outcome = yield p.send(self.outgoing())
        self.assertEqual(outcome.result, Result.TEMPORARY)
        self.assertEqual(outcome.detail, "refresh token revoked or expired: invalid_grant: "
                                         "Token has been expired or revoked.")
        self.assertEqual(p.warnings(), [outcome.detail])
        status = p.credential_status()
        self.assertEqual(status.problem, outcome.detail)
        # a dead refresh token is an expiry as well
        self.assertEqual((status.expires, status.source),
                         (datetime.date.today(), "token endpoint (invalid_grant)"))
        result = yield p.check()
        self.assertFalse(result.ok)
        self.assertEqual(result.steps[0].name, "token")
        self.assertIn("refresh token revoked", result.steps[0].detail)
        self.assertNoSecrets(outcome.detail, json.dumps(result.to_json()))

    @defer.inlineCallbacks
    def test_wrong_client_secret(self):
        settings = self.oauth_user()
        settings["client_secret"] = "GOCSPX-wrong-secret-value"
        p = self.provider(settings)
        outcome = yield p.send(self.outgoing())
        self.assertEqual(outcome.result, Result.TEMPORARY)
        self.assertEqual(outcome.detail, "the OAuth client was rejected (client_id or "
                                         "client_secret): invalid_client: Unauthorized")
        self.assertNotIn("GOCSPX-wrong", self.log_text())

    @defer.inlineCallbacks
    def test_refresh_token_expiry_is_reported(self):
        settings = self.oauth_user()
        self.fake.add_refresh_token(**self.user.token_registration(), expires_in=3 * 86400)
        p = self.provider(settings, monitoring={"secret_warning_days": 7})
        yield p.send(self.outgoing())
        status = p.credential_status()
        today = datetime.date.today()
        self.assertIn((status.expires - today).days, (2, 3))
        self.assertEqual(status.source, "token endpoint")
        self.assertTrue(any("refresh token expires on" in w for w in p.warnings()), p.warnings())

    @defer.inlineCallbacks
    def test_check_reports_the_granted_scopes(self):
        p = self.provider(self.oauth_user(scopes=(READONLY,)))
        result = yield p.check()
        names = [(s.name, s.ok) for s in result.steps]
        self.assertEqual(names, [("token", True), ("send permission", False), ("api", True)])
        self.assertIn("scopes: gmail.readonly", result.steps[0].detail)
        self.assertIn("no scope that allows sending", result.steps[1].detail)
        self.assertEqual(self.fake.messages, [])


class CheckTests(GmailCase):
    @defer.inlineCallbacks
    def test_check_service_account(self):
        self.delegate()
        p = self.provider()
        result = yield p.check()
        self.assertTrue(result.ok, result.to_json())
        token, permission, api = result.steps
        self.assertEqual((token.name, permission.name, api.name),
                         ("token", "send permission", "api"))
        self.assertIn(f"for {ALICE} from {self.server.token_uri}, valid for 59 min; "
                      "scopes: gmail.send", token.detail)
        self.assertEqual(permission.detail, "gmail.send allows users.messages.send")
        self.assertIn("accepts the token", api.detail)
        self.assertEqual(self.fake.messages, [])
        # a check always asks for a fresh token: a fixed delegation shows at once
        yield p.check()
        self.assertEqual(self.fake.token_counts[ALICE], 2)

    @defer.inlineCallbacks
    def test_check_without_delegation(self):
        self.delegate({})
        p = self.provider()
        result = yield p.check()
        self.assertFalse(result.ok)
        self.assertEqual([(s.name, s.ok) for s in result.steps],
                         [("token", False), ("send permission", False)])
        self.assertIn("delegation not granted for alice@example.com", result.steps[0].detail)

    @defer.inlineCallbacks
    def test_start_prefetches_the_default_senders_token(self):
        self.delegate({})
        waiter = self.fake.next_request("token")
        p = self.provider(start=True)
        yield waiter
        while not p.warnings():
            yield deferLater(0.01)
        self.assertIn("delegation not granted for alice@example.com", p.warnings()[0])


def deferLater(seconds):
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


class ErrorTests(GmailCase):
    def setUp(self):
        super().setUp()
        self.delegate()

    @defer.inlineCallbacks
    def send_with_fault(self, **fault):
        settings = fault.pop("_provider", None)
        self.fake.add_fault("send", **fault)
        p = self.provider(settings)
        outcome = yield p.send(self.outgoing())
        return p, outcome

    @defer.inlineCallbacks
    def test_429_with_retry_after_backs_off_the_mailbox(self):
        before = time.time()
        _, outcome = yield self.send_with_fault(status=429, reason="rateLimitExceeded",
                                                retry_after=120)
        self.assertEqual(outcome.result, Result.TEMPORARY)
        self.assertTrue(outcome.mailbox_wide)
        self.assertNear(outcome.not_before, before + 120, delta=5)
        self.assertTrue(outcome.detail.startswith("429 rateLimitExceeded: "), outcome.detail)
        self.assertIn("sending as alice@example.com paused until", outcome.detail)

    @defer.inlineCallbacks
    def test_rate_limit_without_retry_after_backs_off_exponentially(self):
        self.fake.add_fault("send", status=403, reason="userRateLimitExceeded", count=None)
        p = self.provider()
        now = time.time()
        first = yield p.send(self.outgoing())
        self.assertEqual(first.result, Result.TEMPORARY)
        self.assertTrue(first.mailbox_wide)
        self.assertNear(first.not_before, now + 60, delta=5)
        self.assertTrue(first.detail.startswith("403 userRateLimitExceeded: User Rate Limit "
                                                "Exceeded"), first.detail)
        # another call of the same mailbox within the pause does not double it
        second = yield p.send(self.outgoing())
        self.assertEqual(second.not_before, first.not_before)
        # once the pause is over, the next one is twice as long
        p._tokens._cache[ALICE].backoff_until = 0
        third = yield p.send(self.outgoing())
        self.assertNear(third.not_before, time.time() + 120, delta=5)
        # success resets it
        self.fake.clear_faults()
        yield p.send(self.outgoing())
        cred = p._tokens._cache[ALICE]
        self.assertEqual((cred.backoff_level, cred.backoff_until), (-1, 0.0))

    @defer.inlineCallbacks
    def test_gmail_rate_limit_message_names_the_time(self):
        self.fake.set_rate_limit(max_sends=1, window=30, mailbox=ALICE)
        p = self.provider()
        ok = yield p.send(self.outgoing())
        self.assertEqual(ok.result, Result.SENT)
        limited = yield p.send(self.outgoing())
        self.assertTrue(limited.mailbox_wide)
        self.assertNear(limited.not_before, time.time() + 30, delta=5)
        self.assertIn("429 rateLimitExceeded: User-rate limit exceeded.", limited.detail)

    @defer.inlineCallbacks
    def test_server_errors_are_temporary(self):
        for status in (500, 502, 503, 504):
            self.fake.clear_faults()
            _, outcome = yield self.send_with_fault(status=status)
            self.assertEqual(outcome.result, Result.TEMPORARY, status)
            self.assertFalse(outcome.mailbox_wide)
            self.assertTrue(outcome.detail.startswith(f"{status} backendError: "), outcome.detail)
        self.assertEqual(self.fake.messages, [])

    @defer.inlineCallbacks
    def test_503_with_retry_after_holds_the_mailbox(self):
        _, outcome = yield self.send_with_fault(status=503, retry_after=45)
        self.assertEqual(outcome.result, Result.TEMPORARY)
        self.assertTrue(outcome.mailbox_wide)
        self.assertNear(outcome.not_before, time.time() + 45, delta=5)

    @defer.inlineCallbacks
    def test_request_errors_are_permanent(self):
        cases = [
            (400, "invalidArgument", "Recipient address required"),
            (400, "failedPrecondition", "Mail service not enabled"),
            (403, "forbidden", "Delegation denied for alice@example.com"),
            (404, "notFound", None),
            (413, "uploadTooLarge", None),
        ]
        for status, reason, message in cases:
            self.fake.clear_faults()
            _, outcome = yield self.send_with_fault(status=status, reason=reason,
                                                    message=message)
            self.assertEqual(outcome.result, Result.PERMANENT, (status, reason))
            self.assertTrue(outcome.detail.startswith(f"{status} {reason}: "), outcome.detail)

    @defer.inlineCallbacks
    def test_insufficient_permissions_is_permanent_and_warned(self):
        p, outcome = yield self.send_with_fault(status=403, reason="insufficientPermissions")
        self.assertEqual(outcome.result, Result.PERMANENT)
        self.assertEqual(outcome.detail, "403 insufficientPermissions: Request had insufficient "
                                         "authentication scopes.")
        self.assertIn("no scope that allows sending", p.warnings()[0])
        # a token refresh does not clear it; a message that goes through does
        self.fake.expire_access_tokens()
        self.fake.add_fault("send", status=403, reason="insufficientPermissions")
        yield p.send(self.outgoing())
        self.assertEqual(len(p.warnings()), 1)
        outcome = yield p.send(self.outgoing())
        self.assertEqual(outcome.result, Result.SENT)
        self.assertEqual(p.warnings(), [])

    @defer.inlineCallbacks
    def test_not_json_error_page(self):
        _, outcome = yield self.send_with_fault(
            status=502, body="<html><body><h1>502 Bad Gateway</h1> Bearer ya29.leak</body>")
        self.assertEqual(outcome.result, Result.TEMPORARY)
        self.assertEqual(outcome.detail, "502 (not a Google error body): 502 Bad Gateway "
                                         "Bearer [redacted]")

    @defer.inlineCallbacks
    def test_hang_after_the_body_is_ambiguous(self):
        # the fake sends the message, then never answers: the answer is lost
        _, outcome = yield self.send_with_fault(kind="hang", process=True,
                                                _provider={"timeout": "1s"})
        self.assertEqual(outcome.result, Result.TEMPORARY)
        self.assertTrue(outcome.ambiguous)
        self.assertIn("no answer from the Gmail API within 1s after the whole message was "
                      "sent: it may have been delivered", outcome.detail)
        self.assertEqual(len(self.fake.messages), 1)

    @defer.inlineCallbacks
    def test_dropped_connection_after_the_body_is_ambiguous(self):
        _, outcome = yield self.send_with_fault(kind="drop", process=True)
        self.assertEqual(outcome.result, Result.TEMPORARY)
        self.assertTrue(outcome.ambiguous, outcome.detail)

    @defer.inlineCallbacks
    def test_connection_refused_is_temporary_not_ambiguous(self):
        p = self.provider()
        yield p.send(self.outgoing())  # a token first
        yield self.fake.refuse_connections()
        yield p._requests.pool.closeCachedConnections()
        outcome = yield p.send(self.outgoing())
        self.assertEqual(outcome.result, Result.TEMPORARY)
        self.assertFalse(outcome.ambiguous)
        self.assertIn("connection refused", outcome.detail)
        yield self.fake.accept_connections()

    @defer.inlineCallbacks
    def test_untrusted_certificate_is_temporary(self):
        other = FakeGoogle(reactor)
        server = other.listen(shared_ca("other-ca"))
        self.addCleanup(other.stop)
        p = self.provider({"api_endpoint": server.url})
        outcome = yield p.send(self.outgoing())
        self.assertEqual(outcome.result, Result.TEMPORARY)
        self.assertFalse(outcome.ambiguous)
        self.assertIn("TLS error", outcome.detail)
        self.assertEqual(other.messages, [])

    @defer.inlineCallbacks
    def test_untrusted_token_endpoint(self):
        p = self.provider({"ca_file": ""})
        outcome = yield p.send(self.outgoing())
        self.assertEqual(outcome.result, Result.TEMPORARY)
        self.assertIn("is unreachable: TLS error: certificate verify failed", outcome.detail)

    @defer.inlineCallbacks
    def test_cancelled_by_the_queue(self):
        self.fake.add_fault("send", kind="hang")
        p = self.provider()
        d = p.send(self.outgoing())
        yield self.fake.next_request("send")
        d.cancel()
        yield self.assertFailure(d, defer.CancelledError)

    @defer.inlineCallbacks
    def test_no_token_in_any_line(self):
        self.fake.add_fault("send", status=401, reason="authError", count=None)
        p = self.provider()
        outcome = yield p.send(self.outgoing())
        result = yield p.check()
        self.assertNoSecrets(outcome.detail, json.dumps(result.to_json()), *p.warnings())


# --- the pure rules ---------------------------------------------------------------------------


class RulesTests(unittest.SynchronousTestCase):
    def body(self, code, reason, message="m", top=None):
        return json.dumps({"error": {"code": code, "message": top or message,
                                     "errors": [{"reason": reason, "message": message,
                                                 "domain": "global"}]}}).encode()

    def test_classify_send(self):
        now = 1000.0
        c = rules.classify_send
        sent = c(200, b'{"id": "18c0", "threadId": "18c0", "labelIds": ["SENT"]}', now)
        self.assertEqual((sent.kind, sent.detail, sent.provider_id),
                         ("sent", "200 id=18c0 threadId=18c0", "18c0"))
        self.assertEqual(c(200, b"garbage", now).kind, "sent")
        self.assertEqual(c(429, self.body(429, "rateLimitExceeded"), now).kind, "rate_limit")
        for reason in rules.RATE_LIMIT_REASONS:
            self.assertEqual(c(403, self.body(403, reason), now).kind, "rate_limit")
        self.assertTrue(c(403, self.body(403, "dailyLimitExceeded"), now).daily)
        self.assertEqual(c(403, self.body(403, "insufficientPermissions", "Insufficient "
                                          "Permission", "Request had insufficient "
                                          "authentication scopes."), now).detail,
                         "403 insufficientPermissions: Request had insufficient "
                         "authentication scopes.")
        self.assertEqual(c(401, self.body(401, "authError"), now).kind, "unauthorized")
        for status in (408, 409, 500, 501, 502, 503, 504):
            self.assertEqual(c(status, self.body(status, "backendError"), now).kind,
                             "temporary")
        for status in (400, 403, 404, 405, 413):
            self.assertEqual(c(status, self.body(status, "x"), now).kind, "permanent")
        self.assertEqual(c(302, b"", now).kind, "temporary")
        multi = c(400, self.body(400, "invalidArgument", "line one\nline two"), now)
        self.assertEqual(multi.detail, "400 invalidArgument: line one line two")
        self.assertLessEqual(len(c(400, self.body(400, "x", "y" * 5000), now).detail), 300)

    def test_retry_after_in_message(self):
        now = 1_700_000_000.0
        text = "User-rate limit exceeded.  Retry after 2023-11-14T22:15:20.000Z"
        self.assertEqual(rules.retry_at_in_message(text, now), 1_700_000_120.0)
        self.assertEqual(rules.retry_at_in_message("Retry after 2000-01-01T00:00:00Z", now), now)
        self.assertEqual(rules.retry_at_in_message("Retry after 2099-01-01T00:00:00Z", now),
                         now + 86400)
        self.assertIsNone(rules.retry_at_in_message("no time here", now))
        self.assertIsNone(rules.retry_at_in_message(None, now))
        answer = rules.classify_send(429, self.body(429, "rateLimitExceeded", text), now)
        self.assertEqual(answer.retry_at, 1_700_000_120.0)

    def test_backoff(self):
        self.assertEqual([rules.backoff_delay(n) for n in range(8)],
                         [60, 120, 240, 480, 960, 1920, 3600, 3600])
        self.assertEqual(rules.backoff_delay(0, daily=True), 3600)
        self.assertEqual(rules.backoff_delay(10, daily=True), 4 * 3600)

    def test_token_errors(self):
        t = rules.classify_token_error
        self.assertEqual(t("unauthorized_client", "Client is unauthorized", False, ALICE,
                           True).kind, "credential")
        self.assertTrue(t("unauthorized_client", "x", False, ALICE, True).detail.startswith(
            "delegation not granted for alice@example.com: unauthorized_client: x"))
        self.assertEqual(t("invalid_grant", "Invalid email or User ID", False, ALICE,
                           True).kind, "permanent")
        self.assertEqual(t("invalid_grant", "Token has been expired or revoked.", False, ALICE,
                           False).detail,
                         "refresh token revoked or expired: invalid_grant: Token has been "
                         "expired or revoked.")
        self.assertIn("clock", t("invalid_grant", "Invalid JWT: ... check your iat and exp "
                                 "values", False, ALICE, True).detail)
        self.assertEqual(t("invalid_client", "Unauthorized", False, ALICE, False).kind,
                         "credential")
        self.assertEqual(t("internal_failure", "Backend Error", True, ALICE, True).kind,
                         "temporary")
        self.assertEqual(t(None, None, False, ALICE, True).kind, "temporary")
        self.assertEqual(t("admin_policy_enforced", "blocked", False, ALICE, True).kind,
                         "credential")

    def test_scrub(self):
        self.assertEqual(scrub_tokens("Authorization: Bearer ya29.a0AfB_x-y.z and 1//0abc-def"),
                         "Authorization: Bearer [redacted] and [redacted]")
        self.assertEqual(rules.one_line("ya29.c.b0Aaek-secret"), "[redacted]")

    def test_transport_errors(self):
        import requests
        from google.auth import exceptions

        d = rules.describe_transport_error
        refused = requests.exceptions.ConnectionError(
            "HTTPSConnectionPool(host='127.0.0.1', port=1): Max retries exceeded with url: "
            "/token (Caused by NewConnectionError('<urllib3.connection.HTTPSConnection object "
            "at 0x7f>: Failed to establish a new connection: [Errno 111] Connection refused'))")
        self.assertEqual(d(exceptions.TransportError(refused)),
                         "connection failed: Connection refused")
        tls = requests.exceptions.SSLError(
            "HTTPSConnectionPool(host='x', port=443): Max retries exceeded (Caused by "
            "SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate "
            "verify failed: unable to get local issuer certificate (_ssl.c:1006)')))")
        self.assertEqual(d(exceptions.TransportError(tls)),
                         "TLS error: certificate verify failed: unable to get local issuer "
                         "certificate")
        self.assertEqual(d(exceptions.TransportError(requests.exceptions.ReadTimeout("x"))),
                         "timed out")

    def test_read_head(self):
        head, offset, total = gmail_requests.read_head(io.BytesIO(b"A: b\r\n\r\nbody"))
        self.assertEqual((head, offset, total), (b"A: b\r\n\r\n", 8, 12))
        # the blank line across a read boundary
        data = b"X: " + b"a" * (gmail_requests.CHUNK - 5) + b"\r\n\r\nrest"
        head, offset, total = gmail_requests.read_head(io.BytesIO(data))
        self.assertEqual((len(head), total), (len(data) - 4, len(data)))
        self.assertEqual(gmail_requests.read_head(io.BytesIO(b"A: b\r\n")), (b"A: b\r\n", 6, 6))
