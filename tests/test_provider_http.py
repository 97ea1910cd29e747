"""The providers' HTTP plumbing: Retry-After, error bodies, TLS trust, size caps."""

import json

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.http_headers import Headers

from smtprelay.providers._http import json_error, make_client, read_body, retry_after
from tests.fakes.tlsca import TestCA

NOW = 1_800_000_000.0


def test_retry_after_seconds_and_dates():
    assert retry_after(Headers({"Retry-After": ["120"]}), NOW) == NOW + 120
    date = "Fri, 15 Jan 2027 08:00:30 GMT"
    import email.utils

    expected = email.utils.parsedate_to_datetime(date).timestamp()
    assert retry_after(Headers({"Retry-After": [date]}), expected - 30) == expected
    # a date in the past means now; absurd values are capped at a day
    assert retry_after(Headers({"Retry-After": [date]}), expected + 100) == expected + 100
    assert retry_after(Headers({"Retry-After": ["999999999"]}), NOW) == NOW + 86400
    assert retry_after(Headers({"Retry-After": ["soon"]}), NOW) is None
    assert retry_after(Headers({}), NOW) is None


def test_json_error_shapes():
    graph = json.dumps({"error": {"code": "ErrorSendAsDenied", "message": "no",
                                  "innerError": {"request-id": "r"}}}).encode()
    assert json_error(graph)[:2] == ("ErrorSendAsDenied", "no")
    oauth = json.dumps({"error": "invalid_grant", "error_description": "revoked"}).encode()
    assert json_error(oauth)[:2] == ("invalid_grant", "revoked")
    assert json_error(b"<html>502</html>") == (None, None, None)
    assert json_error(b"[1]") == (None, None, None)


class Big(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"x" * 500_000


class ClientTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        import tempfile

        self.ca = TestCA(tempfile.mkdtemp())
        self.port = reactor.listenSSL(0, server.Site(Big()), self.ca.server_context_factory(),
                                      interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        yield None

    @defer.inlineCallbacks
    def test_trusts_the_ca_file_and_caps_bodies(self):
        client, pool = make_client(reactor, ca_file=str(self.ca.ca_path))
        self.addCleanup(pool.closeCachedConnections)
        url = f"https://localhost:{self.port.getHost().port}/"
        response = yield client.get(url)
        body = yield read_body(response, limit=1000)
        self.assertEqual(body, b"x" * 1000)

    @defer.inlineCallbacks
    def test_refuses_an_unknown_ca(self):
        client, pool = make_client(reactor)
        self.addCleanup(pool.closeCachedConnections)
        url = f"https://localhost:{self.port.getHost().port}/"
        with self.assertRaises(Exception) as info:
            yield client.get(url)
        from twisted.python.failure import Failure

        from smtprelay.providers._http import describe_failure

        self.assertIn("TLS error", describe_failure(Failure(info.exception)))

    @defer.inlineCallbacks
    def test_a_connection_closed_during_the_handshake_sent_nothing(self):
        """Twisted's TLS layer holds the request until its handshake is done and the
        HTTP client counts it as written: without the handshake watch, a server that
        closes during the handshake looked like one that took the request and never
        answered (an ambiguous outcome, logged as "may have been delivered")."""
        from twisted.internet import protocol
        from twisted.python.failure import Failure

        from smtprelay.providers._http import describe_failure, handshake_failed

        class CloseOnHello(protocol.Protocol):
            def dataReceived(self, data):
                self.transport.loseConnection()

        factory = protocol.Factory.forProtocol(CloseOnHello)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client, pool = make_client(reactor, ca_file=str(self.ca.ca_path))
        self.addCleanup(pool.closeCachedConnections)
        url = f"https://localhost:{port.getHost().port}/send"
        results = yield defer.DeferredList(
            [client.post(url, data=b"x" * 3000, unbuffered=True) for _ in range(8)],
            consumeErrors=True)
        for ok, failure in results:
            self.assertFalse(ok)
            self.assertTrue(handshake_failed(failure), failure)
            self.assertEqual(describe_failure(failure),
                             "TLS error: the connection was closed during the TLS handshake")
        # a connection that completed its handshake and then died is not one of them
        lost = Failure(Exception("x"))
        self.assertFalse(handshake_failed(lost))
