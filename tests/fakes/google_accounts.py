"""Google credentials for tests: service-account key files as Google issues them, OAuth users.

Owns the client side of the credentials :class:`tests.fakes.gmail.FakeGoogle` checks:

* :class:`ServiceAccountKey`: an RSA key and the JSON key file exactly as the Google
  Cloud console downloads it (``type: service_account``, ``project_id``,
  ``private_key_id``, ``private_key`` as PKCS#8 PEM, ``client_email``, ``client_id``,
  ``auth_uri``, ``token_uri``, ``auth_provider_x509_cert_url``, ``client_x509_cert_url``,
  ``universe_domain``) with ``token_uri`` pointed at the fake, and the registration of
  its public key (and domain-wide delegations) with the fake, in-process
  (:meth:`ServiceAccountKey.register`) or as a control-API payload
  (:meth:`ServiceAccountKey.registration`);
* :class:`OAuthUser`: an OAuth client (id and secret shaped like Google's) with one
  refresh token for one mailbox, the same two ways.

Key generation costs tens of milliseconds: pass ``private_key`` to reuse one.
"""

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

GMAIL_SEND = "https://www.googleapis.com/auth/gmail.send"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"


def new_private_key(key_size=2048):
    return rsa.generate_private_key(public_exponent=65537, key_size=key_size)


def _digits(n):
    return str(secrets.randbelow(9) + 1) + "".join(
        str(secrets.randbelow(10)) for _ in range(n - 1)
    )


@dataclass(frozen=True)
class ServiceAccountKey:
    client_email: str
    project_id: str
    client_id: str
    private_key_id: str
    private_key_pem: str
    public_key_pem: str

    @classmethod
    def generate(cls, name="smtprelay", project_id="smtprelay-test", private_key=None):
        key = private_key or new_private_key()
        return cls(
            client_email=f"{name}@{project_id}.iam.gserviceaccount.com",
            project_id=project_id,
            client_id=_digits(21),
            private_key_id=secrets.token_hex(20),
            private_key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode("ascii"),
            public_key_pem=key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii"),
        )

    def info(self, token_uri=GOOGLE_TOKEN_URI):
        """The key file's content, as ``from_service_account_info`` takes it."""
        return {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self.private_key_id,
            "private_key": self.private_key_pem,
            "client_email": self.client_email,
            "client_id": self.client_id,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
            + quote(self.client_email, safe=""),
            "universe_domain": "googleapis.com",
        }

    def write(self, path, token_uri=GOOGLE_TOKEN_URI):
        """Write the key file (mode 0600, as a secret should be) and return its path."""
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.info(token_uri), f, indent=2)
            f.write("\n")
        return path

    def registration(self, delegations=None):
        """The body for ``POST /_fake/service-accounts``.

        ``delegations`` maps a subject (``user@domain``), a whole domain (``@domain``)
        or ``*`` to the scopes the Workspace admin granted this client id.
        """
        return {
            "client_email": self.client_email,
            "client_id": self.client_id,
            "keys": {self.private_key_id: self.public_key_pem},
            "delegations": {k: list(v) for k, v in (delegations or {}).items()},
        }

    def register(self, fake, delegations=None):
        """Register with an in-process FakeGoogle (call on the reactor thread)."""
        fake.add_service_account(**self.registration(delegations))
        return self


@dataclass(frozen=True)
class OAuthUser:
    """An OAuth client of type "Desktop"/"Web" and one user's refresh token."""

    mailbox: str
    client_id: str
    client_secret: str
    refresh_token: str
    scopes: tuple = (GMAIL_SEND,)

    @classmethod
    def generate(cls, mailbox, scopes=(GMAIL_SEND,)):
        return cls(
            mailbox=mailbox,
            client_id=f"{_digits(12)}-{secrets.token_hex(16)}.apps.googleusercontent.com",
            client_secret="GOCSPX-" + secrets.token_urlsafe(21)[:28],
            refresh_token="1//0" + secrets.token_urlsafe(72),
            scopes=tuple(scopes),
        )

    def client_registration(self):
        """The body for ``POST /_fake/oauth-clients``."""
        return {"client_id": self.client_id, "client_secret": self.client_secret}

    def token_registration(self, revoked=False):
        """The body for ``POST /_fake/refresh-tokens``."""
        return {
            "refresh_token": self.refresh_token,
            "client_id": self.client_id,
            "mailbox": self.mailbox,
            "scopes": list(self.scopes),
            "revoked": revoked,
        }

    def register(self, fake, revoked=False):
        """Register client and refresh token with an in-process FakeGoogle."""
        fake.add_oauth_client(**self.client_registration())
        fake.add_refresh_token(**self.token_registration(revoked))
        return self

    def authorized_user_info(self):
        """The ``authorized_user`` JSON google-auth writes (it has no token_uri)."""
        return {
            "type": "authorized_user",
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "refresh_token": self.refresh_token,
        }
