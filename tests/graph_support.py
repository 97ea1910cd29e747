"""Shared by the Microsoft 365 provider tests: configurations, messages, a fake Graph process.

``provider_config`` builds the ``Config`` a :class:`GraphProvider` is made
from, pointing authority and Graph at a :class:`tests.fakes.graph.FakeGraph`.
``FakeGraphProcess`` runs the fake as ``python -m tests.fakes.graph`` for the
end-to-end tests and steers it through its ``/_fake/`` control API.
``build_message`` makes MIME messages of a wanted shape and size.
"""

import datetime
import json
import os
import select
import ssl
import subprocess
import sys
import urllib.request
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from smtprelay.config import (
    Config,
    DeliveryConfig,
    M365Provider,
    MonitoringConfig,
    Secret,
    SenderConfig,
    SMTPConfig,
)

REPO = Path(__file__).resolve().parent.parent
TENANT = "6a1b2c3d-0000-4000-8000-00000000c0de"
CLIENT = "2f6f1a62-1111-4222-8333-444455556666"
SECRET = "Q~x8.secret-value-for-tests"
MAILBOX = "relay@contoso.com"
MIB = 1024 * 1024

ALL_PERMISSIONS = ("Mail.Send", "Mail.ReadWrite")


def provider_config(url, ca_file, secret=SECRET, certificate=None, key=None,
                    save_to_sent_items=True, concurrency=4, warning_days=30,
                    expires=None, timeout=30.0, sender=MAILBOX, max_size=150 * MIB):
    provider = M365Provider(
        tenant_id=TENANT,
        client_id=CLIENT,
        client_secret=Secret("literal", None, secret) if certificate is None else None,
        client_secret_expires=expires,
        certificate=certificate or "",
        certificate_key=key or "",
        save_to_sent_items=save_to_sent_items,
        authority=url,
        graph_endpoint=url,
        ca_file=str(ca_file),
        timeout=timeout,
    )
    return Config(
        smtp=SMTPConfig(max_message_size=max_size),
        sender=SenderConfig(default=sender),
        provider=provider,
        delivery=DeliveryConfig(concurrency=concurrency),
        monitoring=MonitoringConfig(secret_warning_days=warning_days),
    )


def self_signed_certificate(directory, days=365):
    """(certificate path, key path, PEM of the certificate) of a new RSA certificate."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smtprelay m365 test")])
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
    directory = Path(directory)
    cert_path, key_path = directory / "m365-cert.pem", directory / "m365-key.pem"
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path, cert_pem.decode()


# ---------------------------------------------------------------- messages


def build_message(to=("ann@example.com",), cc=(), bcc=(), sender=MAILBOX, subject="test",
                  body="Hello.\n", attachments=(), html=None, inline=(), message_id=None,
                  extra_headers=()):
    """RFC 5322 bytes (CRLF) from a few parts: attachments are (name, bytes, mime type)."""
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = sender
    if to:
        msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    if bcc:
        msg["Bcc"] = ", ".join(bcc)
    msg["Subject"] = subject
    msg["Message-ID"] = message_id or f"<{os.urandom(8).hex()}@app.example>"
    for name, value in extra_headers:
        msg[name] = value
    msg.set_content(body)
    if html is not None:
        msg.add_alternative(html, subtype="html")
        for cid, data in inline:
            msg.get_payload()[1].add_related(data, "image", "png", cid=f"<{cid}>")
    for name, data, kind in attachments:
        maintype, subtype = kind.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    for i, part in enumerate(p for p in msg.walk() if p.is_multipart()):
        part.set_boundary(f"=_smtprelay-test-{i}")  # fixed lengths: sizes are predictable
    return msg.as_bytes()


def sized_message(total, **kw):
    """``build_message(**kw)`` with a text body grown so that it is exactly ``total`` bytes."""
    kw.setdefault("message_id", "<sized@app.example>")

    def body(size):
        full, rest = divmod(size, 72)  # a line of 70 characters is 72 bytes with its CRLF
        lines = ["x" * 70] * full
        if rest == 1:
            lines[-1] += "x"
        elif rest >= 2:
            lines.append("y" * (rest - 2))
        return "".join(line + "\n" for line in lines)

    size = 144
    for _ in range(5):
        raw = build_message(body=body(size), **kw)
        if len(raw) == total:
            return raw
        size += total - len(raw)
        assert size >= 144, "the message is larger than wanted without a body"
    raise AssertionError(f"cannot make a message of {total} bytes")


# ---------------------------------------------------------------- the fake as a process


class FakeGraphProcess:
    """``python -m tests.fakes.graph`` and its control API."""

    def __init__(self, ca_dir, *args):
        self.ca_dir = Path(ca_dir)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.graph", "--port", "0", "--ca-dir",
             str(self.ca_dir), *args],
            stdout=subprocess.PIPE, cwd=REPO)
        ready, _, _ = select.select([self.process.stdout], [], [], 30)
        assert ready, "the Graph fake did not start"
        info = json.loads(self.process.stdout.readline())
        self.port, self.url = info["port"], info["url"]
        self.ca_file = self.ca_dir / "ca.pem"
        self._context = ssl.create_default_context(cafile=str(self.ca_file))

    def control(self, method, path, document=None, timeout=60):
        data = None if document is None else json.dumps(document).encode()
        request = urllib.request.Request(f"{self.url}/_fake/{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, context=self._context, timeout=timeout) as r:
            return json.loads(r.read())

    def setup(self, permissions=ALL_PERMISSIONS, secrets=(SECRET,), certificates=(),
              max_send_size=None, **app):
        mailbox = {"address": MAILBOX, "tenant": TENANT}
        if max_send_size:
            mailbox["max_send_size"] = max_send_size
        self.control("POST", "reset")
        self.control("POST", "setup", {
            "tenants": [{"tenant_id": TENANT, "domains": ["contoso.onmicrosoft.com"]}],
            "apps": [{"client_id": CLIENT, "tenant": TENANT, "secrets": list(secrets),
                      "certificates": list(certificates), "permissions": list(permissions),
                      **app}],
            "mailboxes": [mailbox],
        })

    def messages(self, wait=0, timeout=30, content=True):
        query = f"?wait={wait}&timeout={timeout}" if wait else "?"
        if not content:
            query += "&content=0"
        return self.control("GET", f"messages{query}", timeout=timeout + 30)["messages"]

    def stats(self):
        return self.control("GET", "stats")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def relay_provider(fake, secret=SECRET, **extra):
    """The ``[provider]`` table of a relay.toml pointing at ``fake``."""
    table = {"type": "m365", "tenant_id": TENANT, "client_id": CLIENT,
             "authority": fake.url, "graph_endpoint": fake.url, "ca_file": str(fake.ca_file)}
    if secret is not None:
        table["client_secret"] = secret
    table.update(extra)
    return table
