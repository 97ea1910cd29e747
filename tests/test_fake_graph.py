"""Tests of the Microsoft Graph / Entra ID fake (:mod:`tests.fakes.graph`).

They prove the fake behaves as ``providers.md`` says the real service does: the
real msal library gets tokens from it (client secret, and certificates in both
the SHA-1/RS256 and SHA-256/PS256 forms), credential errors come back as Entra
words them, sendMail computes recipients as Graph does, the 4 MB, concurrency
and upload-session rules bite, and the control API round-trips.  Most tests talk
to the fake as a separate process over HTTPS (``http.client`` and msal trusting
the test CA); the trial TestCase at the end drives it in-process with treq.
"""

import base64
import datetime
import hashlib
import http.client
import json
import os
import select
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from email.utils import parsedate_to_datetime
from pathlib import Path

import msal
import pytest
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from twisted.internet import defer, task
from twisted.internet.ssl import Certificate
from twisted.python import failure
from twisted.trial import unittest
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from tests.fakes.graph import FakeGraph
from tests.fakes.graph_mail import strip_bcc
from tests.fakes.tlsca import TestCA

REPO = Path(__file__).resolve().parent.parent
TENANT = "6a1b2c3d-0000-4000-8000-00000000c0de"
DOMAIN = "contoso.onmicrosoft.com"
CLIENT = "2f6f1a62-1111-4222-8333-444455556666"
SECRET = "Q~x8.secret-value-for-tests"
MAILBOX = "relay@contoso.com"
MIB = 1024 * 1024
CHUNK = 320 * 1024


# ---------------------------------------------------------------- the fake as a process


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = {k.lower(): v for k, v in headers}
        self.body = body

    def json(self):
        return json.loads(self.body)


class Server:
    """The fake running as ``python -m tests.fakes.graph``; plain HTTPS requests to it."""

    def __init__(self, port, ca_file):
        self.port = port
        self.url = f"https://127.0.0.1:{port}"
        self.ca_file = str(ca_file)
        self.context = ssl.create_default_context(cafile=self.ca_file)

    def request(self, method, path, body=None, headers=None, json_body=None, timeout=10):
        headers = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers.setdefault("Content-Type", "application/json")
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.context, timeout=timeout
        )
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return Response(response.status, response.getheaders(), response.read())
        finally:
            connection.close()

    def control(self, method, path, document=None):
        response = self.request(method, "/_fake/" + path, json_body=document)
        assert response.status == 200, response.body
        return response.json()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ca_dir = tmp_path_factory.mktemp("graph-ca")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.graph", "--port", "0", "--ca-dir", str(ca_dir)],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 30)
        assert ready, "the fake did not start"
        port = json.loads(process.stdout.readline())["port"]
        yield Server(port, ca_dir / "ca.pem")
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def graph(server, monkeypatch):
    # these variables override msal's verify= and would make it distrust the test CA
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    server.control("POST", "reset")
    return server


def setup(graph, permissions=("Mail.Send",), secrets=(SECRET,), certificates=(), **mailbox):
    graph.control(
        "POST",
        "setup",
        {
            "tenants": [{"tenant_id": TENANT, "domains": [DOMAIN]}],
            "apps": [
                {
                    "client_id": CLIENT,
                    "tenant": TENANT,
                    "secrets": list(secrets),
                    "certificates": list(certificates),
                    "permissions": list(permissions),
                }
            ],
            "mailboxes": [{"address": MAILBOX, "tenant": TENANT, **mailbox}],
        },
    )


def msal_app(graph, credential, tenant=DOMAIN, client_id=CLIENT):
    return msal.ConfidentialClientApplication(
        client_id,
        authority=f"{graph.url}/{tenant}",
        client_credential=credential,
        instance_discovery=False,
        verify=graph.ca_file,
    )


def token(graph, credential=SECRET):
    result = msal_app(graph, credential).acquire_token_for_client([f"{graph.url}/.default"])
    assert "access_token" in result, result
    return result["access_token"]


def bearer(access_token):
    return {"Authorization": f"Bearer {access_token}"}


def mime(*headers, body="Hello.\r\n"):
    lines = list(headers) or [f"From: {MAILBOX}", "To: ann@example.com"]
    return ("\r\n".join(lines + ["Subject: test", "Message-ID: <1@test>", "", body])).encode()


def send_mime(graph, access_token, raw, mailbox=MAILBOX):
    return graph.request(
        "POST",
        f"/v1.0/users/{mailbox}/sendMail",
        base64.b64encode(raw),
        {**bearer(access_token), "Content-Type": "text/plain"},
    )


def assert_graph_error(response, status, code, inner=True):
    assert response.status == status, (response.status, response.body)
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    if inner:
        assert set(error["innerError"]) == {"date", "request-id", "client-request-id"}
        assert error["innerError"]["request-id"] == response.headers["request-id"]
    else:
        assert "innerError" not in error
    return error


def self_signed_certificate(days=30):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smtprelay test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return key_pem, cert.public_bytes(serialization.Encoding.PEM).decode(), cert


@pytest.fixture(scope="module")
def certificate():
    return self_signed_certificate()


# ---------------------------------------------------------------- Entra: msal against the fake


def test_msal_gets_a_token_with_a_client_secret_and_graph_accepts_it(graph):
    setup(graph)
    app = msal_app(graph, SECRET)
    result = app.acquire_token_for_client([f"{graph.url}/.default"])
    assert result["token_type"] == "Bearer" and result["expires_in"] == 3599
    # msal keeps the token: a second call is served from its cache
    again = app.acquire_token_for_client([f"{graph.url}/.default"])
    assert again["access_token"] == result["access_token"]
    assert send_mime(graph, result["access_token"], mime()).status == 202

    requests = graph.control("GET", "tokens")["token_requests"]
    assert [(r["client_id"], r["method"], r["ok"], r["tenant"]) for r in requests] == [
        (CLIENT, "client_secret", True, TENANT)  # discovery pointed msal at the tenant id
    ]
    assert graph.control("GET", "stats")["token_requests"] == 1


def test_discovery_document_is_what_msal_needs(graph):
    setup(graph)
    document = graph.request("GET", f"/{DOMAIN}/v2.0/.well-known/openid-configuration").json()
    assert document["token_endpoint"] == f"{graph.url}/{TENANT}/oauth2/v2.0/token"
    assert document["authorization_endpoint"] == f"{graph.url}/{TENANT}/oauth2/v2.0/authorize"
    assert document["issuer"] == f"{graph.url}/{TENANT}/v2.0"
    assert "private_key_jwt" in document["token_endpoint_auth_methods_supported"]

    unknown = graph.request("GET", "/nowhere.example/v2.0/.well-known/openid-configuration")
    assert unknown.status == 400
    assert unknown.json()["error"] == "invalid_tenant" and unknown.json()["error_codes"] == [90002]
    with pytest.raises(ValueError, match="Unable to get authority configuration"):
        msal_app(graph, SECRET, tenant="nowhere.example")


@pytest.mark.parametrize("form", ["sha256-public-certificate", "sha1-thumbprint"])
def test_msal_gets_a_token_with_a_certificate(graph, certificate, form):
    key_pem, cert_pem, cert = certificate
    setup(graph, secrets=(), certificates=[cert_pem])
    if form == "sha256-public-certificate":
        # msal >= 1.35 signs PS256 with an x5t#S256 header when given the certificate
        credential = {"private_key": key_pem, "public_certificate": cert_pem}
    else:
        credential = {"private_key": key_pem, "thumbprint": cert.fingerprint(hashes.SHA1()).hex()}
    access_token = token(graph, credential)
    assert send_mime(graph, access_token, mime()).status == 202
    [request] = graph.control("GET", "tokens")["token_requests"]
    assert request["method"] == "client_assertion" and request["ok"]
    expected = ("PS256", "x5t#S256") if form.startswith("sha256") else ("RS256", "x5t")
    assert (request["assertion"]["alg"], request["assertion"]["thumbprint"]) == expected


def test_an_unregistered_certificate_is_refused(graph, certificate):
    key_pem, cert_pem, _ = certificate
    _, other_pem, _ = self_signed_certificate()
    setup(graph, secrets=(), certificates=[other_pem])
    result = msal_app(
        graph, {"private_key": key_pem, "public_certificate": cert_pem}
    ).acquire_token_for_client([f"{graph.url}/.default"])
    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [700027]
    assert "The key was not found" in result["error_description"]


def test_an_expired_certificate_is_refused(graph, certificate):
    key_pem, cert_pem, _ = certificate
    setup(graph, secrets=())
    graph.control("POST", f"apps/{CLIENT}/certificates", {"pem": cert_pem, "end": time.time() - 60})
    result = msal_app(
        graph, {"private_key": key_pem, "public_certificate": cert_pem}
    ).acquire_token_for_client([f"{graph.url}/.default"])
    assert result["error_codes"] == [700027] and "expired" in result["error_description"]


def token_request(graph, **form):
    body = "&".join(
        f"{k}={v}"
        for k, v in {
            "grant_type": "client_credentials",
            "client_id": CLIENT,
            "scope": f"{graph.url}/.default",
            **form,
        }.items()
    )
    return graph.request(
        "POST",
        f"/{TENANT}/oauth2/v2.0/token",
        body.encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
    )


def test_credential_errors_are_worded_as_entra_words_them(graph):
    setup(graph)
    graph.control(
        "POST", f"apps/{CLIENT}/secrets", {"value": "old-secret", "end": "2020-01-01T00:00:00Z"}
    )

    result = msal_app(graph, "wrong").acquire_token_for_client([f"{graph.url}/.default"])
    assert result["error"] == "invalid_client" and result["error_codes"] == [7000215]
    assert result["error_description"].startswith("AADSTS7000215: Invalid client secret provided.")
    assert {"timestamp", "trace_id", "correlation_id", "error_uri"} <= set(result)

    wrong = token_request(graph, client_secret="wrong")
    assert wrong.status == 401 and wrong.json()["error_codes"] == [7000215]
    expired = token_request(graph, client_secret="old-secret")
    assert expired.status == 401 and expired.json()["error_codes"] == [7000222]
    unknown = token_request(graph, client_secret=SECRET, client_id="0000-unknown")
    assert unknown.status == 400 and unknown.json()["error"] == "unauthorized_client"
    assert unknown.json()["error_codes"] == [700016]
    assert token_request(graph).json()["error_codes"] == [7000218]
    scope = token_request(graph, client_secret=SECRET, scope=f"{graph.url}/Mail.Send")
    assert scope.status == 400 and scope.json()["error"] == "invalid_scope"
    resource = token_request(graph, client_secret=SECRET, scope="https://graph.example/.default")
    assert resource.json()["error"] == "invalid_resource"
    assert token_request(graph, client_secret=SECRET).status == 200

    # a token asked for https://localhost:PORT is no good at https://127.0.0.1:PORT
    localhost = f"https://localhost:{graph.port}"
    elsewhere = token_request(graph, client_secret=SECRET, scope=f"{localhost}/.default").json()
    wrong_audience = send_mime(graph, elsewhere["access_token"], mime())
    assert (
        "Invalid audience"
        in assert_graph_error(wrong_audience, 401, "InvalidAuthenticationToken")["message"]
    )

    stats = graph.control("GET", "stats")
    assert stats["token_requests"] == 9 and stats["tokens_issued"] == 2


def test_graph_refuses_missing_unknown_and_expired_tokens(graph):
    setup(graph)
    missing = send_mime(graph, "", mime())
    assert (
        assert_graph_error(missing, 401, "InvalidAuthenticationToken")["message"]
        == "Access token is empty."
    )
    assert "www-authenticate" in missing.headers
    assert_graph_error(send_mime(graph, "not-a-token", mime()), 401, "InvalidAuthenticationToken")

    access_token = token(graph)
    graph.control("POST", "tokens/expire", {})
    expired = assert_graph_error(
        send_mime(graph, access_token, mime()), 401, "InvalidAuthenticationToken"
    )
    assert "expired" in expired["message"]
    assert graph.control("GET", "stats")["messages"] == 0


# ---------------------------------------------------------------- sendMail


def test_mime_sendmail_takes_recipients_from_the_headers_and_drops_bcc(graph):
    setup(graph)
    raw = mime(
        f"From: Relay <{MAILBOX}>",
        "To: Ann <ann@example.com>, bob@example.com",
        "Cc: carl@example.com",
        "Bcc: dora@example.com,\r\n eve@example.com",
    )
    response = send_mime(graph, token(graph), raw)
    assert response.status == 202 and response.body == b""

    [message] = graph.control("GET", "messages")["messages"]
    assert message["method"] == "mime" and message["mailbox"] == MAILBOX
    assert message["to"] == ["ann@example.com", "bob@example.com"]
    assert message["cc"] == ["carl@example.com"]
    assert message["bcc"] == ["dora@example.com", "eve@example.com"]
    assert len(message["recipients"]) == 5
    assert message["saved_to_sent_items"] is True
    assert base64.b64decode(message["mime_b64"]) == raw
    delivered = base64.b64decode(message["delivered_mime_b64"])
    assert b"Bcc" not in delivered and b"eve@" not in delivered
    assert delivered == raw.replace(b"Bcc: dora@example.com,\r\n eve@example.com\r\n", b"")


def test_mime_sendmail_errors(graph):
    setup(graph)
    access_token = token(graph)
    bad = graph.request(
        "POST",
        f"/v1.0/users/{MAILBOX}/sendMail",
        b"Zm9v!!",
        {**bearer(access_token), "Content-Type": "text/plain", "client-request-id": "abc"},
    )
    error = assert_graph_error(bad, 400, "ErrorMimeContentInvalidBase64String")
    assert error["innerError"]["client-request-id"] == "abc"
    # base64 wrapped at 76 columns, as the Graph docs show it, is fine
    wrapped = base64.encodebytes(mime())
    assert (
        graph.request(
            "POST",
            f"/v1.0/users/{MAILBOX}/sendMail",
            wrapped,
            {**bearer(access_token), "Content-Type": "text/plain"},
        ).status
        == 202
    )
    nobody = send_mime(graph, access_token, mime(f"From: {MAILBOX}"))
    assert "no recipients" in assert_graph_error(nobody, 400, "ErrorInvalidRecipients")["message"]


def test_a_request_over_4_mb_is_refused_with_413(graph):
    setup(graph)
    access_token = token(graph)
    head = mime(body="")
    raw = head + b"x" * (3 * MIB - len(head))  # base64: exactly 4 MB
    body = base64.b64encode(raw)
    assert len(body) == 4 * MIB
    headers = {**bearer(access_token), "Content-Type": "text/plain"}
    path = f"/v1.0/users/{MAILBOX}/sendMail"
    assert graph.request("POST", path, body, headers).status == 202
    assert_graph_error(
        graph.request("POST", path, body + b"\n", headers), 413, "RequestEntityTooLarge"
    )


def test_json_sendmail(graph):
    setup(graph)
    access_token = token(graph)
    path = f"/v1.0/users/{MAILBOX}/sendMail"
    message = {
        "subject": "JSON",
        "body": {"contentType": "Text", "content": "Hi"},
        "toRecipients": [{"emailAddress": {"address": "ann@example.com"}}],
        "bccRecipients": [{"emailAddress": {"address": "bob@example.com", "name": "Bob"}}],
        "internetMessageHeaders": [{"name": "X-Relay", "value": "1"}],
        "attachments": [
            {
                "@odata.type": "#microsoft.graph.fileAttachment",
                "name": "a.txt",
                "contentType": "text/plain",
                "contentBytes": base64.b64encode(b"abc").decode(),
            }
        ],
    }
    sent = graph.request(
        "POST",
        path,
        headers=bearer(access_token),
        json_body={"message": message, "saveToSentItems": False},
    )
    assert sent.status == 202
    [record] = graph.control("GET", "messages")["messages"]
    assert (record["method"], record["to"], record["bcc"]) == (
        "json",
        ["ann@example.com"],
        ["bob@example.com"],
    )
    assert record["saved_to_sent_items"] is False
    assert record["internet_message_headers"] == [{"name": "X-Relay", "value": "1"}]
    assert base64.b64decode(record["attachments"][0]["content_b64"]) == b"abc"

    six = [{"name": f"x-h{i}", "value": "v"} for i in range(6)]
    for headers in (six, [{"name": "Foo", "value": "v"}]):
        response = graph.request(
            "POST",
            path,
            headers=bearer(access_token),
            json_body={"message": {**message, "internetMessageHeaders": headers}},
        )
        assert_graph_error(response, 400, "InvalidInternetMessageHeader")
    typo = graph.request(
        "POST",
        path,
        headers=bearer(access_token),
        json_body={"message": {**message, "toRecipient": []}},
    )
    assert_graph_error(typo, 400, "RequestBodyRead")
    broken = graph.request(
        "POST", path, b"{", {**bearer(access_token), "Content-Type": "application/json"}
    )
    assert_graph_error(broken, 400, "BadRequest")


def test_mailbox_and_permission_errors(graph):
    setup(graph, send_as=["news@contoso.com"])
    graph.control(
        "POST",
        "mailboxes",
        {"address": "gone@contoso.com", "tenant": TENANT, "mail_enabled": False},
    )
    graph.control("POST", "mailboxes", {"address": "other@contoso.com", "tenant": TENANT})
    access_token = token(graph)

    assert_graph_error(
        send_mime(graph, access_token, mime(), "nobody@contoso.com"), 404, "ErrorInvalidUser"
    )
    assert_graph_error(
        send_mime(graph, access_token, mime(), "gone@contoso.com"),
        404,
        "MailboxNotEnabledForRESTAPI",
    )
    foreign = mime("From: boss@contoso.com", "To: ann@example.com")
    assert_graph_error(send_mime(graph, access_token, foreign), 403, "ErrorSendAsDenied")
    assert (
        send_mime(graph, access_token, mime("From: news@contoso.com", "To: ann@example.com")).status
        == 202
    )
    draft = graph.request(
        "POST",
        f"/v1.0/users/{MAILBOX}/messages",
        headers=bearer(access_token),
        json_body={"subject": "x"},
    )
    assert_graph_error(draft, 403, "ErrorAccessDenied")
    me = graph.request(
        "POST",
        "/v1.0/me/sendMail",
        base64.b64encode(mime()),
        {**bearer(access_token), "Content-Type": "text/plain"},
    )
    assert_graph_error(me, 400, "BadRequest")

    # an application access policy scoping the app to one mailbox
    graph.request("PATCH", f"/_fake/apps/{CLIENT}", json_body={"mailboxes": ["other@contoso.com"]})
    policy = assert_graph_error(send_mime(graph, access_token, mime()), 403, "ErrorAccessDenied")
    assert "AccessPolicy" in policy["message"]
    assert (
        send_mime(
            graph,
            access_token,
            mime("From: other@contoso.com", "To: ann@example.com"),
            "other@contoso.com",
        ).status
        == 202
    )


def test_applications_and_users_need_their_permissions(graph):
    setup(graph, permissions=("Mail.Send",))
    path = f"/v1.0/applications(appId='{CLIENT}')?$select=passwordCredentials"
    denied = graph.request("GET", path, headers=bearer(token(graph)))
    assert_graph_error(denied, 403, "Authorization_RequestDenied")
    assert_graph_error(
        graph.request("GET", f"/v1.0/users/{MAILBOX}", headers=bearer(token(graph))),
        403,
        "Authorization_RequestDenied",
    )

    graph.control("POST", "reset")
    setup(graph, permissions=("Mail.Send", "Application.Read.All", "User.Read.All"))
    access_token = token(graph)
    quoted = path.replace("'", "%27").replace("(", "%28").replace(")", "%29")
    document = graph.request("GET", quoted, headers=bearer(access_token)).json()
    [credential] = document["passwordCredentials"]
    assert credential["hint"] == SECRET[:3] and credential["keyId"]
    assert datetime.datetime.fromisoformat(credential["endDateTime"]) > datetime.datetime.now(
        datetime.UTC
    )
    assert set(document) == {"@odata.context", "passwordCredentials"}
    user = graph.request("GET", f"/v1.0/users/{MAILBOX}", headers=bearer(access_token)).json()
    assert user["mail"] == MAILBOX and user["userPrincipalName"] == MAILBOX and user["id"]


# ---------------------------------------------------------------- drafts and upload sessions


def create_draft(graph, access_token, **message):
    message = message or {
        "subject": "Big",
        "toRecipients": [{"emailAddress": {"address": "ann@example.com"}}],
    }
    response = graph.request(
        "POST", f"/v1.0/users/{MAILBOX}/messages", headers=bearer(access_token), json_body=message
    )
    assert response.status == 201, response.body
    return response.json()["id"]


def upload_session(graph, access_token, draft_id, size, name="big.bin"):
    response = graph.request(
        "POST",
        f"/v1.0/users/{MAILBOX}/messages/{draft_id}/attachments/createUploadSession",
        headers=bearer(access_token),
        json_body={
            "AttachmentItem": {
                "attachmentType": "file",
                "name": name,
                "size": size,
                "contentType": "application/octet-stream",
            }
        },
    )
    assert response.status == 201, response.body
    session = response.json()
    assert session["nextExpectedRanges"] == ["0-"] and session["expirationDateTime"].endswith("Z")
    return session["uploadUrl"].removeprefix(graph.url)


def put_chunk(graph, url, data, start, total, **headers):
    return graph.request(
        "PUT",
        url,
        data,
        {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"bytes {start}-{start + len(data) - 1}/{total}",
            **headers,
        },
    )


def test_a_20_mb_attachment_goes_through_an_upload_session_byte_for_byte(graph):
    setup(graph, permissions=("Mail.Send", "Mail.ReadWrite"))
    access_token = token(graph)
    content = os.urandom(20 * MIB + 12345)
    draft_id = create_draft(graph, access_token)
    url = upload_session(graph, access_token, draft_id, len(content))

    step = 12 * CHUNK  # 3.75 MiB: a multiple of 320 KiB under 4 MB
    for start in range(0, len(content), step):
        response = put_chunk(graph, url, content[start : start + step], start, len(content))
        if start + step < len(content):
            assert response.status == 200, response.body
            assert response.json()["nextExpectedRanges"] == [str(start + step)]
        else:
            assert response.status == 201 and response.body == b""
            assert f"/Messages('{draft_id}')/Attachments('" in response.headers["location"]

    sent = graph.request(
        "POST", f"/v1.0/users/{MAILBOX}/messages/{draft_id}/send", b"", bearer(access_token)
    )
    assert sent.status == 202
    [message] = graph.control("GET", "messages")["messages"]
    assert message["method"] == "draft" and message["to"] == ["ann@example.com"]
    [attachment] = message["attachments"]
    assert attachment["name"] == "big.bin" and attachment["size"] == len(content)
    assert attachment["sha256"] == hashlib.sha256(content).hexdigest()
    assert base64.b64decode(attachment["content_b64"]) == content
    assert graph.control("GET", "drafts")["drafts"] == []


def test_upload_session_rules(graph):
    setup(graph, permissions=("Mail.Send", "Mail.ReadWrite"))
    access_token = token(graph)
    draft_id = create_draft(graph, access_token)
    size = 4 * MIB
    url = upload_session(graph, access_token, draft_id, size)
    data = os.urandom(size)

    with_auth = put_chunk(graph, url, data[:CHUNK], 0, size, **bearer(access_token))
    assert_graph_error(with_auth, 401, "InvalidAuthenticationToken")
    assert put_chunk(graph, url, data[: CHUNK + 1], 0, size).status == 400  # not a 320 KiB multiple
    assert put_chunk(graph, url, data[CHUNK : 2 * CHUNK], CHUNK, size).status == 416  # a gap
    assert put_chunk(graph, url, data[:CHUNK], 0, size).status == 200
    assert put_chunk(graph, url, data[:CHUNK], 0, size).status == 416  # again: overlaps
    wrong_token = url.split("authtoken=")[0] + "authtoken=forged"
    assert put_chunk(graph, wrong_token, data[CHUNK : 2 * CHUNK], CHUNK, size).status == 401

    small = graph.request(
        "POST",
        f"/v1.0/users/{MAILBOX}/messages/{draft_id}/attachments/createUploadSession",
        headers=bearer(access_token),
        json_body={"AttachmentItem": {"attachmentType": "file", "name": "s", "size": 1000}},
    )
    assert_graph_error(small, 400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize")

    other = upload_session(graph, access_token, draft_id, size, name="cancelled.bin")
    assert graph.request("DELETE", other).status == 204  # cancelling needs no Authorization either
    assert put_chunk(graph, other, data[:CHUNK], 0, size).status == 404

    deleted = graph.request(
        "DELETE", f"/v1.0/users/{MAILBOX}/messages/{draft_id}", headers=bearer(access_token)
    )
    assert deleted.status == 204
    assert [d["id"] for d in graph.control("GET", "deletions")["deletions"]] == [draft_id]
    assert graph.control("GET", "drafts")["drafts"] == []
    assert put_chunk(graph, url, data[CHUNK : 2 * CHUNK], CHUNK, size).status == 404
    gone = graph.request(
        "GET", f"/v1.0/users/{MAILBOX}/messages/{draft_id}", headers=bearer(access_token)
    )
    assert_graph_error(gone, 404, "ErrorItemNotFound")


def test_sending_a_draft_keeps_to_the_mailbox_size_limit(graph):
    setup(graph, permissions=("Mail.Send", "Mail.ReadWrite"), max_send_size=4 * MIB)
    access_token = token(graph)
    draft_id = create_draft(graph, access_token)
    content = os.urandom(3 * MIB + 1)  # 4 MB and more once base64-encoded
    url = upload_session(graph, access_token, draft_id, len(content))
    assert put_chunk(graph, url, content[: 9 * CHUNK], 0, len(content)).status == 200
    assert put_chunk(graph, url, content[9 * CHUNK :], 9 * CHUNK, len(content)).status == 201
    path = f"/v1.0/users/{MAILBOX}/messages/{draft_id}"
    too_big = graph.request("POST", path + "/send", b"", bearer(access_token))
    assert_graph_error(too_big, 400, "ErrorMessageSizeExceeded")
    assert [d["id"] for d in graph.control("GET", "drafts")["drafts"]] == [
        draft_id
    ]  # left to the sender
    assert graph.request("DELETE", path, headers=bearer(access_token)).status == 204

    # a draft marked PidTagDeleteAfterSubmit is not kept in Sent Items
    draft_id = create_draft(
        graph,
        access_token,
        subject="small",
        toRecipients=[{"emailAddress": {"address": "ann@example.com"}}],
        singleValueExtendedProperties=[{"id": "Boolean 0x0E01", "value": "true"}],
    )
    sent = graph.request(
        "POST", f"/v1.0/users/{MAILBOX}/messages/{draft_id}/send", b"", bearer(access_token)
    )
    assert sent.status == 202
    [message] = graph.control("GET", "messages")["messages"]
    assert message["saved_to_sent_items"] is False and message["subject"] == "small"


def test_a_draft_from_mime_gets_explicit_recipients(graph):
    setup(graph, permissions=("Mail.Send", "Mail.ReadWrite"))
    access_token = token(graph)
    raw = mime(f"From: {MAILBOX}", "To: visible@example.com")
    created = graph.request(
        "POST",
        f"/v1.0/users/{MAILBOX}/messages",
        base64.b64encode(raw),
        {**bearer(access_token), "Content-Type": "text/plain"},
    )
    assert created.status == 201
    draft = created.json()
    assert (
        draft["isDraft"]
        and draft["toRecipients"][0]["emailAddress"]["address"] == "visible@example.com"
    )

    path = f"/v1.0/users/{MAILBOX}/messages/{draft['id']}"
    patched = graph.request(
        "PATCH",
        path,
        headers=bearer(access_token),
        json_body={
            "toRecipients": [{"emailAddress": {"address": "ann@example.com"}}],
            "bccRecipients": [{"emailAddress": {"address": "hidden@example.com"}}],
        },
    )
    assert patched.status == 200 and patched.json()["bccRecipients"]
    small = {
        "@odata.type": "#microsoft.graph.fileAttachment",
        "name": "n.txt",
        "contentBytes": base64.b64encode(b"note").decode(),
    }
    assert (
        graph.request(
            "POST", path + "/attachments", headers=bearer(access_token), json_body=small
        ).status
        == 201
    )
    assert graph.request("POST", path + "/send", b"", bearer(access_token)).status == 202

    [message] = graph.control("GET", "messages")["messages"]
    assert (message["to"], message["bcc"]) == (["ann@example.com"], ["hidden@example.com"])
    assert base64.b64decode(message["mime_b64"]) == raw
    assert [a["name"] for a in message["attachments"]] == ["n.txt"]
    assert graph.request("GET", path, headers=bearer(access_token)).status == 404


# ---------------------------------------------------------------- faults and the control API


def test_scripted_faults_are_graph_shaped(graph):
    setup(graph)
    access_token = token(graph)
    graph.control("POST", "faults", {"route": "sendMail", "status": 503, "retry_after": 7})
    graph.control("POST", "faults", {"route": "sendMail", "status": 429, "retry_after_date": 120})
    graph.control(
        "POST",
        "faults/storm",
        {"route": "sendMail", "count": 2, "status": 504, "retry_after": 3, "retry_after_every": 2},
    )
    first = send_mime(graph, access_token, mime())
    assert_graph_error(first, 503, "ServiceUnavailable")
    assert first.headers["retry-after"] == "7"
    second = send_mime(graph, access_token, mime())
    assert_graph_error(second, 429, "ApplicationThrottled", inner=False)
    assert parsedate_to_datetime(second.headers["retry-after"]).timestamp() > time.time() + 60
    third, fourth = send_mime(graph, access_token, mime()), send_mime(graph, access_token, mime())
    assert (third.status, third.headers.get("retry-after")) == (504, "3")
    assert (fourth.status, fourth.headers.get("retry-after")) == (504, None)
    assert send_mime(graph, access_token, mime()).status == 202
    assert graph.control("GET", "faults")["faults"] == []

    graph.control("POST", "faults", {"route": "token", "status": 503})
    refused = token_request(graph, client_secret=SECRET)
    assert refused.status == 503 and refused.json()["error"] == "temporarily_unavailable"
    custom = graph.control(
        "POST", "faults", {"route": "*", "status": 500, "code": "Oops", "message": "m"}
    )
    assert custom["times"] == 1
    assert_graph_error(send_mime(graph, access_token, mime()), 500, "Oops")


def test_unanswered_requests_and_refused_connections(graph):
    setup(graph)
    access_token = token(graph)
    graph.control("POST", "faults", {"route": "sendMail", "action": "accept_then_drop"})
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError, ssl.SSLError)):
        send_mime(graph, access_token, mime())
    assert graph.control("GET", "stats")["messages"] == 1  # the ambiguous outcome: it was sent

    graph.control("POST", "faults", {"route": "sendMail", "action": "hang"})
    with pytest.raises(TimeoutError):
        graph.request(
            "POST",
            f"/v1.0/users/{MAILBOX}/sendMail",
            base64.b64encode(mime()),
            {**bearer(access_token), "Content-Type": "text/plain"},
            timeout=0.5,
        )
    assert graph.control("GET", "stats")["messages"] == 1  # read, never processed

    graph.control("POST", "refuse", {"connections": 1})
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        graph.request("GET", "/_fake/state")
    assert graph.request("GET", "/_fake/state").status == 200


def test_control_api_round_trip(graph):
    created = graph.control(
        "POST", "tenants", {"tenant_id": "t-2", "domains": ["fabrikam.example"]}
    )
    assert created == {"tenant_id": "t-2", "domains": ["fabrikam.example"], "display_name": None}
    app = graph.control(
        "POST",
        "apps",
        {
            "client_id": "app-2",
            "tenant": "t-2",
            "secrets": ["s"],
            "permissions": ["Mail.Send", "Mail.ReadWrite"],
        },
    )
    assert (
        app["permissions"] == ["Mail.ReadWrite", "Mail.Send"] and app["secrets"][0]["hint"] == "s"
    )
    graph.control("PATCH", "apps/app-2", {"permissions": ["Mail.Send"], "password_credentials": []})
    graph.control(
        "POST",
        "mailboxes",
        {"address": "box@fabrikam.example", "tenant": "t-2", "send_as": ["Alias@Fabrikam.example"]},
    )
    graph.control("PATCH", "mailboxes/box@fabrikam.example", {"max_recipients": 10})
    graph.control("POST", "settings", {"latency": 0.01, "token_lifetime": 60})
    graph.control("POST", "faults", {"route": "send", "status": 502, "times": 2})

    state = graph.control("GET", "state")
    assert [t["tenant_id"] for t in state["tenants"]] == ["t-2"]
    assert state["apps"][0]["permissions"] == ["Mail.Send"]
    assert state["mailboxes"][0]["send_as"] == ["alias@fabrikam.example"]
    assert state["mailboxes"][0]["max_recipients"] == 10
    assert state["settings"]["latency"] == 0.01 and state["settings"]["token_lifetime"] == 60
    assert state["faults"][0]["times"] == 2
    graph.control("DELETE", "faults")
    assert graph.control("GET", "faults")["faults"] == []

    bad = graph.request("POST", "/_fake/faults", json_body={"route": "nope"})
    assert bad.status == 400 and "unknown route" in bad.json()["error"]
    graph.control("POST", "reset")
    assert graph.control("GET", "state")["tenants"] == []


# ---------------------------------------------------------------- in-process, with treq


class InProcessTests(unittest.TestCase):
    """The fake inside the test's own reactor, steered through its methods."""

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        # not self.mktemp(): under pytest it would write into the working directory
        directory = tempfile.mkdtemp(prefix="graph-ca-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.ca = TestCA(directory)
        self.clock = task.Clock()
        self.fake = FakeGraph(reactor, clock=self.clock, latency=0.5)
        self.fake.listen(self.ca)
        self.addCleanup(self.fake.stop)
        self.fake.add_app(CLIENT, tenant=TENANT, secrets=[SECRET], permissions=["Mail.Send"])
        self.fake.add_mailbox(MAILBOX)
        pool = HTTPConnectionPool(reactor, persistent=False)
        policy = BrowserLikePolicyForHTTPS(
            trustRoot=Certificate.loadPEM(self.ca.ca_path.read_bytes())
        )
        self.http = treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))

    @defer.inlineCallbacks
    def token(self):
        response = yield self.http.post(
            f"{self.fake.url}/{TENANT}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": CLIENT,
                "client_secret": SECRET,
                "scope": f"{self.fake.url}/.default",
            },
        )
        self.assertEqual(response.code, 200)
        return (yield response.json())["access_token"]

    def send(self, access_token):
        return self.http.post(
            f"{self.fake.url}/v1.0/users/{MAILBOX}/sendMail",
            data=base64.b64encode(mime()),
            headers={"Authorization": f"Bearer {access_token}", "Content-Type": "text/plain"},
        )

    @defer.inlineCallbacks
    def test_more_than_four_in_flight_for_a_mailbox_is_throttled(self):
        access_token = yield self.token()
        responses = yield defer.gatherResults([self.send(access_token) for _ in range(6)])
        codes = sorted(r.code for r in responses)
        self.assertEqual(codes, [202, 202, 202, 202, 429, 429])
        throttled = next(r for r in responses if r.code == 429)
        self.assertEqual(throttled.headers.getRawHeaders(b"Retry-After"), [b"1"])
        body = yield throttled.json()
        self.assertEqual(
            body["error"]["message"], "Application is over its MailboxConcurrency limit."
        )
        for response in responses:
            yield response.content()
        stats = self.fake.stats()
        self.assertEqual(stats["max_concurrency"], {MAILBOX: 4})
        self.assertEqual(stats["throttled"], {MAILBOX: 2})
        self.assertEqual(len(self.fake.messages), 4)

    @defer.inlineCallbacks
    def test_the_clock_expires_tokens(self):
        self.fake.configure(latency=0)
        access_token = yield self.token()
        response = yield self.send(access_token)
        self.assertEqual(response.code, 202)
        self.clock.advance(3599)
        response = yield self.send(access_token)
        self.assertEqual(response.code, 401)
        body = yield response.json()
        self.assertIn("expired", body["error"]["message"])
        delivered = yield self.fake.wait_for_messages(1)
        self.assertEqual(delivered[0].delivered_mime, strip_bcc(mime()))

    @defer.inlineCallbacks
    def test_stop_closes_a_hanging_request(self):
        self.fake.configure(latency=0)
        access_token = yield self.token()
        self.fake.add_fault("sendMail", action="hang")
        outcome = []
        self.send(access_token).addBoth(outcome.append)
        yield task.deferLater(self.reactor, 0.2, lambda: None)
        self.assertEqual(outcome, [])
        self.assertEqual(
            self.fake.stats()["statuses"], {"token": {200: 1}, "sendMail": {"hang": 1}}
        )
        self.assertEqual(self.fake.messages, [])
        yield self.fake.stop()
        yield task.deferLater(self.reactor, 0, lambda: None)
        self.assertIsInstance(outcome[0], failure.Failure)
