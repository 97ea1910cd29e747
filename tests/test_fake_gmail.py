"""Tests of the Gmail/Google fake (tests/fakes/gmail.py): that real clients get Google's answers.

Owns the evidence that the fake is faithful: real google-auth credentials (service
account with and without delegation, user OAuth) refreshing against it through
``requests`` in a thread, as the provider will; the send call through treq over HTTPS
with the test CA; every error body the provider must classify; fault scripts, the rate
limit mode, refused connections; the control API over HTTP; the fake as a process; and
the pure message rules (tests/fakes/gmail_message.py), with hypothesis.

The tests are trial TestCases (pytest runs them): the reactor runs between steps, the
blocking google-auth calls run in the reactor's thread pool, nothing sleeps.
"""

import atexit
import base64
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import requests
import treq
from google.auth import crypt, jwt
from google.auth.exceptions import RefreshError
from google.auth.transport.requests import Request as GoogleRequest
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, error, protocol, reactor, ssl, task, threads
from twisted.trial import unittest
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from tests.fakes import gmail_message
from tests.fakes.gmail import (
    AUTH_INVALID,
    AUTH_MISSING,
    GMAIL_SEND,
    INSUFFICIENT_SCOPES,
    MAX_MESSAGE_BYTES,
    UNAUTHORIZED_CLIENT,
    FakeGoogle,
)
from tests.fakes.google_accounts import OAuthUser, ServiceAccountKey, new_private_key
from tests.fakes.tlsca import TestCA

REPO = Path(__file__).resolve().parent.parent
ALICE = "alice@example.com"
BOB = "bob@example.com"
CAROL = "carol@example.org"
ALIAS = "sales@example.com"
UNVERIFIED = "ceo@example.com"
READONLY = "https://www.googleapis.com/auth/gmail.readonly"

_shared = {}


def shared_ca():
    """One test CA for the module (trustme is quick, but not free)."""
    if "ca" not in _shared:
        directory = tempfile.mkdtemp(prefix="fake-gmail-ca-")
        atexit.register(shutil.rmtree, directory, True)
        _shared["ca"] = TestCA(directory)
    return _shared["ca"]


def rsa_key(n):
    """The n-th RSA key of this module: generated once, reused by every test."""
    keys = _shared.setdefault("keys", [])
    while len(keys) <= n:
        keys.append(new_private_key())
    return keys[n]


def message(frm=ALICE, to=BOB, extra=(), body="Hello.\r\n"):
    lines = [
        f"From: {frm}",
        f"To: {to}",
        "Subject: test",
        "Message-ID: <1@app.example>",
        "Date: Mon, 24 Nov 2025 10:00:00 +0000",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8")


class FakeGoogleCase(unittest.TestCase):
    """A FakeGoogle on loopback HTTPS, a treq client and a requests session trusting the CA."""

    clock = None

    def setUp(self):
        for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            saved = os.environ.pop(var, None)
            if saved is not None:
                self.addCleanup(os.environ.__setitem__, var, saved)
        self.ca = shared_ca()
        self.fake = FakeGoogle(reactor, clock=self.clock)
        self.server = self.fake.listen(self.ca)
        self.addCleanup(self.fake.stop)
        self.fake.add_mailbox(ALICE, send_as=[ALIAS, {"address": UNVERIFIED, "verified": False}])
        self.fake.add_mailbox(BOB)

        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        trust = ssl.Certificate.loadPEM(self.ca.ca_path.read_bytes())
        agent = Agent(
            reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust), pool=pool
        )
        self.http = treq.client.HTTPClient(agent)

        self.session = requests.Session()
        self.session.verify = str(self.ca.ca_path)
        self.addCleanup(self.session.close)

    # --- helpers ---------------------------------------------------------------

    def refresh(self, creds):
        """creds.refresh() in a thread, as the provider must (google-auth blocks)."""
        return threads.deferToThread(creds.refresh, GoogleRequest(self.session))

    def service_account(self, key=0, delegations=None):
        sa = ServiceAccountKey.generate(private_key=rsa_key(key))
        sa.register(self.fake, delegations)
        return sa

    def sa_credentials(self, sa, subject=None, scopes=(GMAIL_SEND,)):
        info = sa.info(self.server.token_uri)
        creds = service_account.Credentials.from_service_account_info(info, scopes=list(scopes))
        return creds.with_subject(subject) if subject else creds

    @defer.inlineCallbacks
    def user_token(self, mailbox=ALICE, scopes=(GMAIL_SEND,)):
        """An access token through the real refresh grant, without google-auth."""
        user = OAuthUser.generate(mailbox, scopes).register(self.fake)
        response = yield self.http.post(
            self.server.token_uri,
            data={
                "grant_type": "refresh_token",
                "client_id": user.client_id,
                "client_secret": user.client_secret,
                "refresh_token": user.refresh_token,
            },
        )
        body = yield response.json()
        self.assertEqual(response.code, 200, body)
        # what Google answers a refresh grant
        self.assertEqual(set(body), {"access_token", "expires_in", "scope", "token_type"})
        self.assertEqual(body["scope"], " ".join(sorted(scopes)))
        return body["access_token"]

    @defer.inlineCallbacks
    def send(self, token, raw, user="me", content_type="message/rfc822", upload_type="media"):
        """messages.send by media upload; returns (code, headers, json body)."""
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        url = f"{self.server.api_endpoint}/upload/gmail/v1/users/{user}/messages/send"
        params = {"uploadType": upload_type} if upload_type else {}
        response = yield self.http.post(url, data=raw, headers=headers, params=params)
        body = yield response.json()
        return response.code, response.headers, body

    @defer.inlineCallbacks
    def control(self, method, name, payload=None, params=None):
        url = f"{self.server.url}/_fake/{name}"
        kwargs = {} if payload is None else {"json": payload}
        response = yield self.http.request(method, url, params=params, **kwargs)
        body = yield response.json()
        return response.code, body

    def assertGoogleError(self, body, code, reason, message=None, status=None, domain="global"):
        err = body["error"]
        self.assertEqual(set(err) - {"details"}, {"code", "message", "errors", "status"})
        self.assertEqual(err["code"], code)
        self.assertEqual(err["errors"][0]["reason"], reason)
        self.assertEqual(err["errors"][0]["domain"], domain)
        if message is not None:
            self.assertEqual(err["errors"][0]["message"], message)
        if status is not None:
            self.assertEqual(err["status"], status)


class ServiceAccountTests(FakeGoogleCase):
    @defer.inlineCallbacks
    def test_refresh_with_delegation(self):
        sa = self.service_account(delegations={ALICE: [GMAIL_SEND]})
        creds = self.sa_credentials(sa, ALICE)
        yield self.refresh(creds)
        self.assertTrue(creds.token.startswith("ya29."))
        self.assertTrue(creds.valid)
        self.assertEqual(self.fake.token_counts[ALICE], 1)
        logged = self.fake.token_requests[-1]
        # google-auth keeps Google's URL as aud although token_uri is the fake
        self.assertEqual(logged.claims["aud"], "https://oauth2.googleapis.com/token")
        self.assertEqual((logged.claims["iss"], logged.claims["sub"]), (sa.client_email, ALICE))
        self.assertEqual(logged.claims["exp"] - logged.claims["iat"], 3600)

        code, _, body = yield self.send(creds.token, message())
        self.assertEqual(code, 200, body)
        self.assertEqual(self.fake.messages[0].client, sa.client_email)

    @defer.inlineCallbacks
    def test_domain_delegation_and_counts_per_subject(self):
        sa = self.service_account(delegations={"@example.com": [GMAIL_SEND, READONLY]})
        for subject in (ALICE, BOB, ALICE):
            yield self.refresh(self.sa_credentials(sa, subject))
        self.assertEqual(self.fake.token_counts, {ALICE: 2, BOB: 1})

    @defer.inlineCallbacks
    def test_delegation_refused(self):
        sa = self.service_account(delegations={ALICE: [GMAIL_SEND]})
        failure = yield self.assertFailure(
            self.refresh(self.sa_credentials(sa, BOB)), RefreshError
        )
        self.assertEqual(
            failure.args[1],
            {"error": "unauthorized_client", "error_description": UNAUTHORIZED_CLIENT},
        )
        self.assertFalse(failure.retryable)
        self.assertEqual(self.fake.token_requests[-1].status, 401)

    @defer.inlineCallbacks
    def test_scope_not_delegated(self):
        sa = self.service_account(delegations={ALICE: [READONLY]})
        failure = yield self.assertFailure(
            self.refresh(self.sa_credentials(sa, ALICE)), RefreshError
        )
        self.assertEqual(failure.args[1]["error"], "unauthorized_client")

    @defer.inlineCallbacks
    def test_unknown_subject(self):
        sa = self.service_account(delegations={"*": [GMAIL_SEND]})
        creds = self.sa_credentials(sa, "nobody@example.com")
        failure = yield self.assertFailure(self.refresh(creds), RefreshError)
        self.assertEqual(
            failure.args[1],
            {"error": "invalid_grant", "error_description": "Invalid email or User ID"},
        )

    @defer.inlineCallbacks
    def test_bad_signature(self):
        sa = self.service_account(delegations={ALICE: [GMAIL_SEND]})
        other = ServiceAccountKey.generate(private_key=rsa_key(1))
        forged = dataclasses.replace(sa, private_key_pem=other.private_key_pem)
        failure = yield self.assertFailure(
            self.refresh(self.sa_credentials(forged, ALICE)), RefreshError
        )
        self.assertEqual(
            failure.args[1],
            {"error": "invalid_grant", "error_description": "Invalid JWT Signature."},
        )
        self.assertEqual(self.fake.token_requests[-1].status, 400)

    @defer.inlineCallbacks
    def test_unknown_account(self):
        stranger = ServiceAccountKey.generate(name="stranger", private_key=rsa_key(1))
        failure = yield self.assertFailure(
            self.refresh(self.sa_credentials(stranger, ALICE)), RefreshError
        )
        self.assertEqual(failure.args[1]["error_description"], "Invalid grant: account not found")

    @defer.inlineCallbacks
    def test_jwt_claims_checked(self):
        sa = self.service_account(delegations={ALICE: [GMAIL_SEND]})
        signer = crypt.RSASigner.from_service_account_info(sa.info())
        now = int(time.time())
        good = {
            "iss": sa.client_email,
            "sub": ALICE,
            "scope": GMAIL_SEND,
            "aud": "https://oauth2.googleapis.com/token",
            "iat": now,
            "exp": now + 3600,
        }
        cases = [
            (
                {"aud": self.server.token_uri},
                "invalid_grant",
                "Invalid JWT: Failed audience check.",
            ),
            (
                {"exp": now + 7200},
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token",
            ),
            (
                {"iat": now - 7200, "exp": now - 3600},
                "invalid_grant",
                "Invalid JWT: Token must be",
            ),
            ({"scope": ""}, "invalid_scope", "Invalid OAuth scope or ID token audience provided."),
            ({}, None, None),
        ]
        for change, err, description in cases:
            assertion = jwt.encode(signer, {**good, **change}).decode("ascii")
            response = yield self.http.post(
                self.server.token_uri,
                data={
                    "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                    "assertion": assertion,
                },
            )
            body = yield response.json()
            if err is None:
                self.assertEqual(response.code, 200)
                # what Google answers a JWT bearer grant: no scope, no refresh token
                self.assertEqual(set(body), {"access_token", "expires_in", "token_type"})
                self.assertEqual((body["expires_in"], body["token_type"]), (3599, "Bearer"))
            else:
                self.assertEqual((response.code, body["error"]), (400, err), change)
                self.assertTrue(body["error_description"].startswith(description), body)

    @defer.inlineCallbacks
    def test_service_account_without_subject_cannot_send(self):
        sa = self.service_account()
        creds = self.sa_credentials(sa)
        yield self.refresh(creds)
        self.assertEqual(self.fake.token_counts[sa.client_email], 1)
        code, _, body = yield self.send(creds.token, message())
        self.assertEqual(code, 400)
        self.assertGoogleError(
            body, 400, "failedPrecondition", "Precondition check failed.", "FAILED_PRECONDITION"
        )

    def test_key_file_as_google_issues_it(self):
        sa = ServiceAccountKey.generate(private_key=rsa_key(0))
        path = sa.write(Path(tempfile.mkdtemp()) / "sa.json", self.server.token_uri)
        self.addCleanup(shutil.rmtree, path.parent)
        info = json.loads(path.read_text())
        self.assertEqual(oct(path.stat().st_mode & 0o777), "0o600")
        self.assertEqual(
            set(info),
            {
                "type",
                "project_id",
                "private_key_id",
                "private_key",
                "client_email",
                "client_id",
                "auth_uri",
                "token_uri",
                "auth_provider_x509_cert_url",
                "client_x509_cert_url",
                "universe_domain",
            },
        )
        self.assertEqual(info["type"], "service_account")
        self.assertEqual(info["token_uri"], self.server.token_uri)
        self.assertRegex(info["private_key_id"], r"^[0-9a-f]{40}$")
        self.assertRegex(info["client_id"], r"^[0-9]{21}$")
        self.assertTrue(info["private_key"].startswith("-----BEGIN PRIVATE KEY-----\n"))
        self.assertTrue(info["client_email"].endswith(".iam.gserviceaccount.com"))
        creds = service_account.Credentials.from_service_account_file(str(path))
        self.assertEqual(creds.signer_email, sa.client_email)


class UserOAuthTests(FakeGoogleCase):
    def credentials(self, user, secret=None, scopes=None):
        return user_credentials.Credentials(
            None,
            refresh_token=user.refresh_token,
            client_id=user.client_id,
            client_secret=secret or user.client_secret,
            token_uri=self.server.token_uri,
            scopes=scopes,
        )

    @defer.inlineCallbacks
    def test_refresh_valid(self):
        user = OAuthUser.generate(ALICE).register(self.fake)
        creds = self.credentials(user, scopes=[GMAIL_SEND])
        yield self.refresh(creds)
        self.assertTrue(creds.valid)
        self.assertEqual(creds.granted_scopes, [GMAIL_SEND])
        self.assertEqual(self.fake.token_counts[ALICE], 1)
        code, _, body = yield self.send(creds.token, message(), user=ALICE)
        self.assertEqual(code, 200, body)

    @defer.inlineCallbacks
    def test_refresh_revoked(self):
        user = OAuthUser.generate(ALICE).register(self.fake, revoked=True)
        failure = yield self.assertFailure(self.refresh(self.credentials(user)), RefreshError)
        self.assertEqual(
            failure.args[1],
            {"error": "invalid_grant", "error_description": "Token has been expired or revoked."},
        )
        self.assertEqual(self.fake.token_requests[-1].status, 400)

    @defer.inlineCallbacks
    def test_revoking_later_kills_access_tokens(self):
        user = OAuthUser.generate(ALICE).register(self.fake)
        creds = self.credentials(user)
        yield self.refresh(creds)
        self.fake.revoke_refresh_token(user.refresh_token)
        _code, _, body = yield self.send(creds.token, message())
        self.assertGoogleError(body, 401, "authError")
        yield self.assertFailure(self.refresh(creds), RefreshError)

    @defer.inlineCallbacks
    def test_wrong_client(self):
        user = OAuthUser.generate(ALICE).register(self.fake)
        failure = yield self.assertFailure(
            self.refresh(self.credentials(user, "GOCSPX-wrong")), RefreshError
        )
        self.assertEqual(
            failure.args[1], {"error": "invalid_client", "error_description": "Unauthorized"}
        )
        self.assertEqual(self.fake.token_requests[-1].status, 401)
        unknown = dataclasses.replace(user, client_id="1-x.apps.googleusercontent.com")
        failure = yield self.assertFailure(self.refresh(self.credentials(unknown)), RefreshError)
        self.assertEqual(failure.args[1]["error_description"], "The OAuth client was not found.")


class SendTests(FakeGoogleCase):
    @defer.inlineCallbacks
    def test_attachments_recorded_byte_exact(self):
        msg = EmailMessage(policy=SMTP)
        msg["From"] = f"Alice Ä <{ALICE}>"
        msg["To"] = f"Bob <{BOB}>, {CAROL}"
        msg["Subject"] = "Rechnung für Oktober ✓"
        msg["Message-ID"] = "<invoice-42@app.example>"
        msg["Date"] = "Mon, 24 Nov 2025 10:00:00 +0100"
        msg["X-App-Trace"] = "abc123"
        msg.set_content("Hallo,\nanbei die Rechnung.\n")
        msg.add_alternative("<p>Hallo, <img src='cid:logo'></p>", subtype="html")
        msg.get_payload()[1].add_related(os.urandom(3000), "image", "png", cid="<logo>")
        msg.add_attachment(os.urandom(200_000), "application", "pdf", filename="rechnung.pdf")
        raw = msg.as_bytes()

        token = yield self.user_token()
        code, headers, body = yield self.send(token, raw)
        self.assertEqual(code, 200, body)
        self.assertEqual(set(body), {"id", "threadId", "labelIds"})
        self.assertRegex(body["id"], r"^[0-9a-f]{16}$")
        self.assertEqual((body["threadId"], body["labelIds"]), (body["id"], ["SENT"]))
        self.assertEqual(
            headers.getRawHeaders("content-type"), ["application/json; charset=UTF-8"]
        )
        sent = self.fake.messages[0]
        self.assertEqual(sent.raw, raw)
        self.assertEqual(sent.delivered, raw)  # From is the mailbox, no Bcc: nothing changes
        self.assertEqual((sent.mailbox, sent.via, sent.id), (ALICE, "media", body["id"]))
        self.assertEqual(sent.recipients, (BOB, CAROL))
        self.assertIn(("X-App-Trace", "abc123"), sent.headers)

        code, _, second = yield self.send(token, raw)
        self.assertNotEqual(second["id"], body["id"])

    @defer.inlineCallbacks
    def test_bcc_removed_and_counted(self):
        bcc_line = b"Bcc: Carol <carol@example.org>,\r\n dave@example.net\r\n"
        raw = message(extra=["Cc: bob@example.com"]).replace(
            b"Subject:", bcc_line + b"Subject:", 1
        )
        token = yield self.user_token()
        code, _, body = yield self.send(token, raw)
        self.assertEqual(code, 200, body)
        sent = self.fake.messages[0]
        self.assertEqual(sent.recipients, (BOB, CAROL, "dave@example.net"))
        self.assertEqual(sent.bcc, (CAROL, "dave@example.net"))
        self.assertEqual(sent.delivered, raw.replace(bcc_line, b""))
        self.assertEqual(sent.raw, raw)

    @defer.inlineCallbacks
    def test_from_rewritten_unless_verified_alias(self):
        token = yield self.user_token()
        cases = [
            (f'"Sales" <{ALIAS}>', False),
            (f'"The CEO" <{UNVERIFIED}>', True),  # an alias, but not verified
            ("Mallory <mallory@elsewhere.example>", True),
            (ALICE.upper(), False),
        ]
        for frm, rewritten in cases:
            raw = message(frm=frm)
            code, _, body = yield self.send(token, raw)
            self.assertEqual(code, 200, body)  # the call succeeds either way
            sent = self.fake.messages[-1]
            self.assertEqual(sent.from_original, frm)
            self.assertEqual(sent.from_rewritten, rewritten, frm)
            if rewritten:
                self.assertTrue(sent.from_delivered.endswith(f"<{ALICE}>"), sent.from_delivered)
                self.assertIn(f"From: {sent.from_delivered}\r\n".encode(), sent.delivered)
                self.assertEqual(
                    sent.delivered.replace(
                        f"From: {sent.from_delivered}".encode(), f"From: {frm}".encode()
                    ),
                    raw,
                )
            else:
                self.assertEqual(sent.delivered, raw)

    @defer.inlineCallbacks
    def test_missing_headers_added(self):
        token = yield self.user_token()
        raw = b"To: bob@example.com\r\nSubject: bare\r\n\r\nbody\r\n"
        code, _, body = yield self.send(token, raw)
        self.assertEqual(code, 200, body)
        sent = self.fake.messages[0]
        self.assertEqual(sent.added_headers, ("From", "Message-ID", "Date"))
        self.assertTrue(sent.delivered.endswith(raw))
        self.assertRegex(sent.message_id, r"^<CA.+@mail\.gmail\.com>$")

    @defer.inlineCallbacks
    def test_recipient_required(self):
        token = yield self.user_token()
        raw = b"From: alice@example.com\r\nTo: undisclosed-recipients:;\r\nSubject: x\r\n\r\nx\r\n"
        code, _, body = yield self.send(token, raw)
        self.assertEqual(code, 400)
        self.assertGoogleError(
            body, 400, "invalidArgument", "Recipient address required", "INVALID_ARGUMENT"
        )
        self.assertEqual(body["error"]["message"], "Recipient address required")
        code, _, body = yield self.send(token, message(to="human@f"))
        self.assertGoogleError(body, 400, "invalidArgument", "Invalid To header")
        self.assertEqual(self.fake.messages, [])

    @defer.inlineCallbacks
    def test_size_limit(self):
        token = yield self.user_token()
        head = message(body="")
        line = b"x" * 998 + b"\r\n"
        filler = line * ((MAX_MESSAGE_BYTES - len(head)) // len(line))
        raw = head + filler + b"y" * (MAX_MESSAGE_BYTES - len(head) - len(filler))
        self.assertEqual(len(raw), 36_700_160)
        code, _, body = yield self.send(token, raw)
        self.assertEqual(code, 200, body)
        self.assertEqual(self.fake.messages[0].raw, raw)
        code, _, body = yield self.send(token, raw + b"z")
        self.assertEqual(code, 413)
        self.assertGoogleError(body, 413, "uploadTooLarge", "Media is too large. Limit: 35MB")
        self.assertEqual(len(self.fake.messages), 1)

    @defer.inlineCallbacks
    def test_401_bodies(self):
        code, headers, body = yield self.send(None, message())
        self.assertEqual(code, 401)
        self.assertGoogleError(body, 401, "required", "Login Required.", "UNAUTHENTICATED")
        self.assertEqual(body["error"]["message"], AUTH_MISSING)
        self.assertEqual(
            headers.getRawHeaders("www-authenticate"),
            ['Bearer realm="https://accounts.google.com/"'],
        )

        code, headers, body = yield self.send("ya29.unknown", message())
        self.assertGoogleError(body, 401, "authError", "Invalid Credentials", "UNAUTHENTICATED")
        self.assertEqual(body["error"]["message"], AUTH_INVALID)
        self.assertEqual(body["error"]["errors"][0]["location"], "Authorization")
        self.assertIn('error="invalid_token"', headers.getRawHeaders("www-authenticate")[0])

        token = yield self.user_token()
        self.assertEqual(self.fake.expire_access_tokens(ALICE), {"expired": 1})
        code, _, body = yield self.send(token, message())
        self.assertGoogleError(body, 401, "authError", "Invalid Credentials")

        self.fake.configure(token_lifetime=0)
        token = yield self.user_token()
        code, _, body = yield self.send(token, message())
        self.assertEqual(code, 401)

    @defer.inlineCallbacks
    def test_403_bodies(self):
        token = yield self.user_token(scopes=[READONLY])
        code, _, body = yield self.send(token, message())
        self.assertGoogleError(
            body, 403, "insufficientPermissions", "Insufficient Permission", "PERMISSION_DENIED"
        )
        self.assertEqual(body["error"]["message"], INSUFFICIENT_SCOPES)

        token = yield self.user_token()
        code, _, body = yield self.send(token, message(), user=BOB)
        self.assertGoogleError(
            body, 403, "forbidden", f"Delegation denied for {ALICE}", "PERMISSION_DENIED"
        )
        code, _, body = yield self.send(token, message(), user=ALICE.upper())
        self.assertEqual(code, 200, body)

    @defer.inlineCallbacks
    def test_profile_needs_more_than_gmail_send(self):
        url = f"{self.server.api_endpoint}/gmail/v1/users/me/profile"
        token = yield self.user_token()
        response = yield self.http.get(url, headers={"Authorization": f"Bearer {token}"})
        body = yield response.json()
        self.assertGoogleError(body, 403, "insufficientPermissions")
        token = yield self.user_token(scopes=[READONLY])
        response = yield self.http.get(url, headers={"Authorization": f"Bearer {token}"})
        body = yield response.json()
        self.assertEqual((response.code, body["emailAddress"]), (200, ALICE))

    @defer.inlineCallbacks
    def test_bodies_not_kept(self):
        self.fake.configure(keep_bodies=False)
        token = yield self.user_token()
        raw = message(extra=["Bcc: carol@example.org"])
        code, _, _ = yield self.send(token, raw)
        self.assertEqual(code, 200)
        sent = self.fake.messages[0]
        self.assertEqual((sent.raw, sent.delivered, sent.raw_size), (None, None, len(raw)))
        self.assertEqual(sent.raw_sha256, hashlib.sha256(raw).hexdigest())
        self.assertEqual(sent.delivered_size, len(raw) - len(b"Bcc: carol@example.org\r\n"))

    @defer.inlineCallbacks
    def test_upload_shape_checked(self):
        token = yield self.user_token()
        _code, _, body = yield self.send(token, message(), upload_type=None)
        self.assertGoogleError(body, 400, "badRequest")
        _code, _, body = yield self.send(token, message(), content_type="text/plain")
        self.assertGoogleError(
            body,
            400,
            "badContent",
            "Media type 'text/plain' is not supported. Valid media types: [message/*]",
        )
        self.assertEqual(self.fake.messages, [])

    @defer.inlineCallbacks
    def test_json_and_multipart_forms(self):
        token = yield self.user_token()
        raw = message(extra=["Bcc: carol@example.org"])
        url = f"{self.server.api_endpoint}/gmail/v1/users/me/messages/send"
        encoded = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        response = yield self.http.post(
            url, json={"raw": encoded}, headers={"Authorization": f"Bearer {token}"}
        )
        body = yield response.json()
        self.assertEqual(response.code, 200, body)
        self.assertEqual((self.fake.messages[0].via, self.fake.messages[0].raw), ("json", raw))

        reply = (
            message(extra=["In-Reply-To: <1@app.example>"])
            .replace(b"Message-ID: <1@app.example>", b"Message-ID: <2@app.example>")
            .replace(b"Subject: test", b"Subject: Re: test")
        )
        multipart = (
            b"--XyZ\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
            + json.dumps({"threadId": body["threadId"]}).encode()
            + b"\r\n--XyZ\r\nContent-Type: message/rfc822\r\n\r\n"
            + reply
            + b"\r\n--XyZ--\r\n"
        )
        code, _, second = yield self.send(
            token,
            multipart,
            content_type="multipart/related; boundary=XyZ",
            upload_type="multipart",
        )
        self.assertEqual(code, 200, second)
        self.assertEqual(second["threadId"], body["threadId"])
        self.assertEqual(self.fake.messages[1].raw, reply)

        response = yield self.http.post(url, json={}, headers={"Authorization": f"Bearer {token}"})
        body = yield response.json()
        self.assertGoogleError(body, 400, "badRequest")


class FaultTests(FakeGoogleCase):
    @defer.inlineCallbacks
    def test_scripted_replies_then_success(self):
        token = yield self.user_token()
        self.fake.add_fault("send", status=503, count=2, retry_after=7)
        for _ in range(2):
            code, headers, body = yield self.send(token, message())
            self.assertEqual(code, 503)
            self.assertEqual(headers.getRawHeaders("retry-after"), ["7"])
            self.assertGoogleError(body, 503, "backendError", status="UNAVAILABLE")
        code, _, body = yield self.send(token, message())
        self.assertEqual(code, 200)
        self.assertEqual(len(self.fake.messages), 1)

        self.fake.add_fault("send", status=429, retry_after_date=120, mailbox=BOB)
        code, _, _ = yield self.send(token, message())  # alice: not concerned
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_token_route_fault(self):
        user = OAuthUser.generate(ALICE).register(self.fake)
        self.fake.add_fault("token", status=429, retry_after_date=30, after=1)
        form = {
            "grant_type": "refresh_token",
            "client_id": user.client_id,
            "client_secret": user.client_secret,
            "refresh_token": user.refresh_token,
        }
        first = yield self.http.post(self.server.token_uri, data=form)
        self.assertEqual(first.code, 200)
        yield first.content()
        second = yield self.http.post(self.server.token_uri, data=form)
        self.assertEqual(second.code, 429)
        self.assertRegex(
            second.headers.getRawHeaders("retry-after")[0],
            r"^[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT$",
        )
        body = yield second.json()
        self.assertEqual(set(body), {"error", "error_description"})

    @defer.inlineCallbacks
    def test_hang_then_drop(self):
        token = yield self.user_token()
        self.fake.add_fault("send", kind="hang", process=True)
        pending = self.send(token, message())
        yield self.fake.next_request("send")
        self.assertEqual(len(self.fake.hung), 1)
        self.assertEqual(len(self.fake.messages), 1)  # sent: the outcome is ambiguous
        self.assertEqual(self.fake.drop_hung(), {"dropped": 1})
        yield self.assertFailure(pending, Exception)

    @defer.inlineCallbacks
    def test_drop_without_processing(self):
        token = yield self.user_token()
        self.fake.add_fault("send", kind="drop")
        yield self.assertFailure(self.send(token, message()), Exception)
        self.assertEqual(self.fake.messages, [])
        code, _, _ = yield self.send(token, message())
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_refuse_connections(self):
        yield self.fake.refuse_connections()
        failure = yield self.assertFailure(
            self.http.get(self.server.url + "/_fake/state"), error.ConnectionRefusedError
        )
        self.assertIsNotNone(failure)
        yield self.fake.accept_connections()
        code, _state = yield self.control("GET", "state")
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_latency(self):
        self.fake.configure(latency={"send": 0.01})
        token = yield self.user_token()
        code, _, _ = yield self.send(token, message())
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_storm_is_seeded(self):
        token = yield self.user_token()
        self.fake.add_fault("send", status=500, count=None, probability=0.5)
        codes = []
        for _ in range(8):
            code, _, _body = yield self.send(token, message())
            codes.append(code)
        self.assertEqual(set(codes), {200, 500})
        self.assertEqual(len(self.fake.messages), codes.count(200))


class RateLimitTests(FakeGoogleCase):
    def setUp(self):
        self.clock = task.Clock()
        super().setUp()

    @defer.inlineCallbacks
    def test_429_per_mailbox_window(self):
        token = yield self.user_token()
        self.fake.set_rate_limit(max_sends=2, window=60, mailbox=ALICE, retry_after_header=True)
        for _ in range(2):
            code, _, _ = yield self.send(token, message())
            self.assertEqual(code, 200)
        self.clock.advance(10)
        code, headers, body = yield self.send(token, message())
        self.assertEqual(code, 429)
        self.assertGoogleError(
            body,
            429,
            "rateLimitExceeded",
            "User-rate limit exceeded.  Retry after 1970-01-01T00:01:00.000Z",
            "RESOURCE_EXHAUSTED",
            domain="usageLimits",
        )
        self.assertEqual(headers.getRawHeaders("retry-after"), ["50"])
        self.clock.advance(50)
        code, _, _ = yield self.send(token, message())
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_403_user_rate_limit(self):
        token = yield self.user_token()
        self.fake.set_rate_limit(max_sends=0, window=1, status=403)
        _code, headers, body = yield self.send(token, message())
        self.assertGoogleError(
            body, 403, "userRateLimitExceeded", status="PERMISSION_DENIED", domain="usageLimits"
        )
        self.assertIsNone(headers.getRawHeaders("retry-after"))


class ControlApiTests(FakeGoogleCase):
    @defer.inlineCallbacks
    def test_round_trip(self):
        sa = ServiceAccountKey.generate(private_key=rsa_key(0))
        user = OAuthUser.generate(CAROL)
        calls = [
            (
                "mailboxes",
                {"address": CAROL, "send_as": [{"address": "info@example.org", "verified": True}]},
            ),
            ("service-accounts", sa.registration({"@example.org": [GMAIL_SEND]})),
            (
                "delegations",
                {"client_email": sa.client_email, "subject": ALICE, "scopes": [GMAIL_SEND]},
            ),
            ("oauth-clients", user.client_registration()),
            ("refresh-tokens", user.token_registration()),
            ("config", {"token_lifetime": 600, "latency": {"token": 0}}),
            ("faults", {"route": "send", "status": 500, "count": 3}),
            ("rate-limits", {"mailbox": CAROL, "max_sends": 5, "window": 60}),
        ]
        for name, payload in calls:
            code, body = yield self.control("POST", name, payload)
            self.assertEqual(code, 200, (name, body))

        code, state = yield self.control("GET", "state")
        self.assertEqual(state["config"]["token_lifetime"], 600)
        self.assertIn(
            {"address": CAROL, "send_as": {"info@example.org": True}, "gmail_enabled": True},
            state["mailboxes"],
        )
        [account] = state["service_accounts"]
        self.assertEqual(
            account["delegations"], {"@example.org": [GMAIL_SEND], ALICE: [GMAIL_SEND]}
        )
        self.assertEqual(state["faults"][0]["count"], 3)

        creds = service_account.Credentials.from_service_account_info(
            sa.info(self.server.token_uri), scopes=[GMAIL_SEND]
        ).with_subject(CAROL)
        yield self.refresh(creds)
        self.assertTrue(creds.valid)
        code, body = yield self.control("POST", "faults/clear")
        code, _, sent = yield self.send(creds.token, message(frm="info@example.org", to=BOB))
        self.assertEqual(code, 200, sent)

        code, body = yield self.control("GET", "messages", params={"mailbox": CAROL})
        [record] = body["messages"]
        self.assertEqual(
            (record["id"], record["mailbox"], record["from_rewritten"]), (sent["id"], CAROL, False)
        )
        self.assertEqual(base64.b64decode(record["raw"]), message(frm="info@example.org", to=BOB))
        code, body = yield self.control("GET", "messages", params={"bodies": "0"})
        self.assertIsNone(body["messages"][0]["raw"])

        code, body = yield self.control("GET", "token-requests")
        self.assertEqual(body["counts"], {CAROL: 1})
        self.assertEqual(body["requests"][0]["claims"]["sub"], CAROL)

        code, body = yield self.control(
            "POST", "refresh-tokens/revoke", {"refresh_token": user.refresh_token}
        )
        self.assertEqual(body["revoked"], True)
        code, body = yield self.control("POST", "access-tokens/expire", {})
        self.assertEqual(body, {"expired": 1})

        code, body = yield self.control("POST", "mailboxes", {"nope": 1})
        self.assertEqual(code, 400)
        code, body = yield self.control("GET", "nothing")
        self.assertEqual(code, 404)

        code, body = yield self.control("POST", "reset")
        code, state = yield self.control("GET", "state")
        self.assertEqual(
            (state["mailboxes"], state["messages"], state["service_accounts"]), ([], 0, [])
        )


class _FirstLine(protocol.ProcessProtocol):
    def __init__(self):
        self.line = defer.Deferred()
        self.ended = defer.Deferred()
        self._out = b""

    def outReceived(self, data):
        self._out += data
        if b"\n" in self._out and not self.line.called:
            self.line.callback(self._out.split(b"\n", 1)[0])

    def processEnded(self, reason):
        if not self.line.called:
            self.line.errback(reason)
        self.ended.callback(None)


class ProcessTests(FakeGoogleCase):
    @defer.inlineCallbacks
    def test_runs_as_a_process(self):
        proto = _FirstLine()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        transport = reactor.spawnProcess(
            proto,
            sys.executable,
            [
                sys.executable,
                "-m",
                "tests.fakes.gmail",
                "--port",
                "0",
                "--ca-dir",
                str(self.ca.directory),
                "--latency",
                "send=0",
            ],
            env=env,
            path=str(REPO),
        )
        try:
            line = yield proto.line
            port = json.loads(line)["port"]
            self.assertEqual(json.loads(line), {"port": port})
            url = f"https://127.0.0.1:{port}/_fake/mailboxes"
            response = yield self.http.post(url, json={"address": ALICE})
            self.assertEqual(response.code, 200)
            yield response.content()
            response = yield self.http.get(f"https://127.0.0.1:{port}/_fake/state")
            state = yield response.json()
            self.assertEqual(state["mailboxes"][0]["address"], ALICE)
        finally:
            transport.signalProcess("TERM")
            yield proto.ended


class MessageRuleTests(unittest.TestCase):
    """The pure rules of tests/fakes/gmail_message.py."""

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300))
    def test_split_keeps_every_byte(self, raw):
        fields, rest = gmail_message.split_message(raw)
        self.assertEqual(b"".join(f.raw for f in fields) + rest, raw)

    _name = st.sampled_from(
        ["Subject", "X-Trace", "Received", "Reply-To", "Bcc", "Cc", "Comments"]
    )
    _value = st.text(
        st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters=":"), max_size=30
    )

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.tuples(_name, _value, st.booleans()), max_size=8),
        st.binary(max_size=200),
        st.sampled_from([b"\r\n", b"\n"]),
    )
    def test_only_bcc_lines_go(self, headers, body, eol):
        lines = [
            f"From: {ALICE}".encode() + eol,
            f"To: {BOB}".encode() + eol,
            b"Message-ID: <x@y>" + eol,
            b"Date: Mon, 24 Nov 2025 10:00:00 +0000" + eol,
        ]
        for name, value, folded in headers:
            if name in ("Bcc", "Cc"):
                value = CAROL
            text = f"{name}: {value}".encode()
            if folded:
                text += eol + b"\t" + b"folded"
            lines.append(text + eol)
        raw = b"".join(lines) + eol + body
        delivery = gmail_message.prepare_delivery(
            raw, ALICE, new_message_id=lambda: "<n@x>", date="now"
        )
        expected = b"".join(line for line in lines if not line.startswith(b"Bcc:")) + eol + body
        self.assertEqual(delivery.delivered, expected)
        self.assertFalse(delivery.from_rewritten)
        self.assertEqual(delivery.recipients.all[0], BOB)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.sampled_from(
                [
                    b"From: ",
                    b"To: ",
                    b"Cc: ",
                    b"Bcc: ",
                    b"Subject: ",
                    b"\r\n",
                    b"\n",
                    b" ",
                    b"\t",
                    b"a@b.example",
                    b"<x@y.example>",
                    b'"N, M"',
                    b",",
                    b":;",
                    b"\xc3\xa4",
                    b"\xff",
                    b"=?utf-8?q?x?=",
                    b"@",
                    b"Message-ID: <m@x>",
                ]
            ),
            max_size=40,
        ).map(b"".join)
    )
    def test_any_bytes_give_a_delivery_or_a_400(self, raw):
        try:
            delivery = gmail_message.prepare_delivery(
                raw, ALICE, new_message_id=lambda: "<n@x>", date="now"
            )
        except gmail_message.MessageRejected as e:
            self.assertTrue(
                e.message == "Recipient address required"
                or re.fullmatch(r"Invalid (To|Cc|Bcc) header", e.message)
            )
        else:
            self.assertTrue(delivery.recipients.all)
            fields, _ = gmail_message.split_message(delivery.delivered)
            self.assertFalse([f for f in fields if f.is_("Bcc")])

    def test_recipients(self):
        fields, _ = gmail_message.split_message(
            b'To: "Doe, J" <j@x.example>, k@y.example\r\nCc: J@X.EXAMPLE\r\n'
            b"Bcc: undisclosed:;\r\n\r\n"
        )
        rcpts = gmail_message.recipients(fields)
        self.assertEqual(rcpts.all, ("j@x.example", "k@y.example"))
        for bad in (b"To: human@f\r\n\r\n", b"Cc: garbage\r\n\r\n"):
            with self.assertRaises(gmail_message.MessageRejected) as caught:
                gmail_message.recipients(gmail_message.split_message(bad)[0])
            self.assertTrue(re.match(r"Invalid (To|Cc) header", caught.exception.message))
