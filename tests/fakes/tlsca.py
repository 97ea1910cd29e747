"""A test certificate authority (trustme) written to a folder, shared by fakes and tests.

``TestCA(directory)`` creates (once) ``ca.pem`` and a server certificate for
``localhost``, ``127.0.0.1`` and ``::1`` (``server.pem`` with its key,
``server-key.pem``).  Other host names get their own pair through
``issue(name)``.  Clients trust ``ca.pem``; nothing here touches the system store.
"""

import os
from pathlib import Path

import trustme

SERVER_NAMES = ("localhost", "127.0.0.1", "::1")


class TestCA:
    __test__ = False  # not a pytest class

    def __init__(self, directory):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca_path = self.directory / "ca.pem"
        ca_key = self.directory / "ca-key.pem"
        if self.ca_path.exists() and ca_key.exists():
            self._ca = trustme.CA.from_pem(self.ca_path.read_bytes(), ca_key.read_bytes())
        else:
            self._ca = trustme.CA()
            self._ca.private_key_pem.write_to_path(str(ca_key))
            self._ca.cert_pem.write_to_path(str(self.ca_path))
            self._write_pair("server", SERVER_NAMES)

    def _write_pair(self, stem, names):
        cert = self._ca.issue_cert(*names)
        cert_path = self.directory / f"{stem}.pem"
        key_path = self.directory / f"{stem}-key.pem"
        # certificate first, then the chain up to (not including) the root
        with open(cert_path, "wb") as f:
            for blob in cert.cert_chain_pems:
                f.write(blob.bytes())
        cert.private_key_pem.write_to_path(str(key_path))
        os.chmod(key_path, 0o600)
        return cert_path, key_path

    @property
    def server_cert(self):
        return self.directory / "server.pem"

    @property
    def server_key(self):
        return self.directory / "server-key.pem"

    def issue(self, *names, stem=None):
        """A new certificate and key for ``names``; returns (cert_path, key_path)."""
        return self._write_pair(stem or names[0].replace(":", "_"), names)

    def server_context_factory(self):
        """A Twisted server context factory for the localhost certificate."""
        from twisted.internet import ssl

        pem = self.server_cert.read_bytes() + self.server_key.read_bytes()
        return ssl.PrivateCertificate.loadPEM(pem).options()
