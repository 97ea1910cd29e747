"""The Microsoft 365 provider against the Graph fake in-process (trial, real sockets).

Each test runs a :class:`tests.fakes.graph.FakeGraph` on loopback HTTPS with a
test CA and a :class:`GraphProvider` pointed at it, and looks at what the fake
recorded: the call used, the recipients Graph computed, the bytes, drafts
left behind, requests in flight.
"""

import base64
import datetime
import hashlib
import io
import os
import shutil
import tempfile

from twisted.internet import defer, task
from twisted.trial import unittest

from smtprelay.model import Result
from smtprelay.providers.base import OutgoingMessage
from smtprelay.providers.graph import GraphProvider
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
    padded_to,
    provider_config,
    self_signed_certificate,
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
        self.assertEqual(self.fake.stats()["token_requests"], 1)
