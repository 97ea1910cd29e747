"""Microsoft Entra ID as the Graph fake sees it: credentials, assertions, error bodies.

This module owns the pure parts of the fake token service behind
:mod:`tests.fakes.graph`: the application credentials an app registration holds
(client secrets and certificates), the verification of a certificate client
assertion (an RS256 or PS256 JWT, RFC 7523) exactly as Entra demands it, the
OpenID discovery document, and the shape of Entra's error answers
(``{"error", "error_description": "AADSTS...", "error_codes", "timestamp",
"trace_id", "correlation_id", "error_uri"}``).  Nothing here does I/O; the
caller passes the current time.
"""

import base64
import binascii
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ERROR_LOOKUP = "https://login.microsoftonline.com/error?code={}"
CERT_DOCS = (
    "Review the documentation at https://docs.microsoft.com/azure/active-directory/develop/"
    "active-directory-certificate-credentials ."
)


def utc_iso(ts, digits=7):
    """``2019-09-25T01:09:30.7671707Z``: the form Exchange and the directory write."""
    whole = int(ts)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    if digits:
        fraction = f"{ts - whole:.{digits}f}"[2:]
        text += "." + fraction
    return text + "Z"


def parse_when(value):
    """Epoch seconds from a number or an ISO 8601 string (``Z`` or offset); None stays None."""
    if value is None or isinstance(value, (int, float)):
        return value
    parsed = datetime.fromisoformat(str(value).replace("z", "Z"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def b64url_decode(text):
    """Decode base64url with or without padding; anything else in it is an error."""
    if isinstance(text, bytes):
        text = text.decode("ascii")
    stripped = text.rstrip("=")
    if any(c not in _B64URL for c in stripped) or len(stripped) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))


_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


# ---------------------------------------------------------------- errors


class EntraError(Exception):
    """An answer of the token service: HTTP status, OAuth ``error``, AADSTS number, text."""

    def __init__(self, status, error, code, description):
        super().__init__(f"AADSTS{code}: {description}")
        self.status = status
        self.error = error
        self.code = code
        self.description = description

    def body(self, now, trace_id=None, correlation_id=None):
        trace_id = trace_id or str(uuid.uuid4())
        correlation_id = correlation_id or str(uuid.uuid4())
        stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(now))
        return {
            "error": self.error,
            "error_description": (
                f"AADSTS{self.code}: {self.description}\r\nTrace ID: {trace_id}\r\n"
                f"Correlation ID: {correlation_id}\r\nTimestamp: {stamp}"
            ),
            "error_codes": [self.code],
            "timestamp": stamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": ERROR_LOOKUP.format(self.code),
        }


def invalid_secret(client_id):
    return EntraError(
        401,
        "invalid_client",
        7000215,
        "Invalid client secret provided. Ensure the secret being sent in the request is the "
        f"client secret value, not the client secret ID, for a secret added to app '{client_id}'.",
    )


def expired_secret(client_id):
    return EntraError(
        401,
        "invalid_client",
        7000222,
        f"The provided client secret keys for app '{client_id}' are expired. Visit the Azure "
        "portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider "
        "using certificate credentials for added security: https://aka.ms/certCreds.",
    )


def unknown_client(client_id, directory):
    return EntraError(
        400,
        "unauthorized_client",
        700016,
        f"Application with identifier '{client_id}' was not found in the directory "
        f"'{directory}'. This can happen if the application has not been installed by the "
        "administrator of the tenant or consented to by any user in the tenant. You may have "
        "sent your authentication request to the wrong tenant.",
    )


def unknown_tenant(name, error="invalid_request"):
    return EntraError(
        400,
        error,
        90002,
        f"Tenant '{name}' not found. Check to make sure you have the correct tenant ID and are "
        "signing into the correct cloud. Check with your subscription administrator, this may "
        "happen if there are no active subscriptions for the tenant.",
    )


def missing_parameter(name):
    return EntraError(
        400,
        "invalid_request",
        900144,
        f"The request body must contain the following parameter: '{name}'.",
    )


def missing_credential():
    return EntraError(
        401,
        "invalid_client",
        7000218,
        "The request body must contain the following parameter: 'client_assertion' or "
        "'client_secret'.",
    )


def unsupported_grant(grant):
    return EntraError(
        400,
        "unsupported_grant_type",
        70003,
        f"The app requested an unsupported grant type '{grant}'.",
    )


def post_only(method):
    return EntraError(
        400,
        "invalid_request",
        900561,
        f"The endpoint only accepts POST, OPTIONS requests. Received a {method} request.",
    )


def invalid_scope(scope):
    return EntraError(
        400,
        "invalid_scope",
        1002012,
        f"The provided value for scope {scope} is not valid. Client credential flows must have "
        "a scope value with /.default suffixed to the resource identifier (application ID URI).",
    )


def unknown_resource(resource, directory):
    return EntraError(
        400,
        "invalid_resource",
        500011,
        f"The resource principal named {resource} was not found in the tenant named "
        f"{directory}. This can happen if the application has not been installed by the "
        "administrator of the tenant or consented to by any user in the tenant. You might have "
        "sent your authentication request to the wrong tenant.",
    )


def common_endpoint():
    return EntraError(
        400,
        "invalid_request",
        9001023,
        "The grant type isn't supported over the /common or /consumers endpoints. Please use "
        "the /organizations or tenant-specific endpoint.",
    )


def malformed_assertion():
    return EntraError(400, "invalid_request", 50027, "JWT token is invalid or malformed.")


def missing_claim(name):
    return EntraError(
        400,
        "invalid_request",
        90014,
        f"The required field '{name}' is missing from the credential. Ensure that you have all "
        "the necessary parameters for the login request.",
    )


def assertion_client_mismatch():
    return EntraError(
        401,
        "invalid_client",
        700021,
        f"Client assertion application identifier doesn't match 'client_id' parameter. {CERT_DOCS}",
    )


def assertion_time_range(now, nbf, exp):
    def stamp(ts):
        return "-" if ts is None else time.strftime("%m/%d/%Y %H:%M:%S", time.gmtime(ts))

    return EntraError(
        401,
        "invalid_client",
        700024,
        f"Client assertion is not within its valid time range. Current time: {stamp(now)}, "
        f"assertion valid from {stamp(nbf)}, expiry time of assertion {stamp(exp)}. {CERT_DOCS}",
    )


def assertion_rejected(client_id, reason, thumbprint=None, key=None):
    parts = [f"Reason - {reason}"]
    if thumbprint:
        parts.append(f"Thumbprint of key used by client: '{thumbprint}'")
    if key is not None:
        parts.append(f"Found key 'Start={_us_date(key.start)}, End={_us_date(key.end)}'")
    parts.append(
        "Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see "
        f"configured keys for app Id '{client_id}'. Review the documentation at "
        "https://docs.microsoft.com/en-us/graph/deployments to determine the corresponding "
        "service endpoint and https://docs.microsoft.com/en-us/graph/api/application-get?"
        "view=graph-rest-1.0&tabs=http to build a query request URL, such as "
        f"'https://graph.microsoft.com/beta/applications/{client_id}'"
    )
    lead = (
        "The certificate with identifier used to sign the client assertion is not registered "
        "on application."
        if reason == "The key was not found."
        else "Client assertion failed signature validation."
    )
    return EntraError(401, "invalid_client", 700027, f"{lead} [{', '.join(parts)}]")


def _us_date(ts):
    return time.strftime("%m/%d/%Y %H:%M:%S", time.gmtime(ts))


# ---------------------------------------------------------------- credentials


@dataclass
class PasswordCredential:
    """A client secret: the value is what the app sends, the hint its first 3 characters."""

    value: str
    end: float
    start: float
    key_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    display_name: str = None

    @property
    def hint(self):
        return self.value[:3]

    def matches(self, presented):
        return hmac.compare_digest(self.value.encode("utf-8"), presented.encode("utf-8"))

    def describe(self):
        """The passwordCredential resource Graph reports (never the secret itself)."""
        return {
            "customKeyIdentifier": None,
            "displayName": self.display_name,
            "endDateTime": utc_iso(self.end),
            "hint": self.hint,
            "keyId": self.key_id,
            "secretText": None,
            "startDateTime": utc_iso(self.start),
        }


@dataclass
class KeyCredential:
    """A certificate registered on an app: only its public part, as in the portal."""

    certificate: x509.Certificate
    start: float
    end: float
    key_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    display_name: str = None

    @classmethod
    def from_pem(cls, pem, start=None, end=None, key_id=None, display_name=None):
        if isinstance(pem, str):
            pem = pem.encode("ascii")
        cert = x509.load_pem_x509_certificate(pem)
        if not isinstance(cert.public_key(), rsa.RSAPublicKey):
            raise ValueError("Entra accepts RSA certificates for client assertions")
        return cls(
            certificate=cert,
            start=cert.not_valid_before_utc.timestamp() if start is None else start,
            end=cert.not_valid_after_utc.timestamp() if end is None else end,
            key_id=key_id or str(uuid.uuid4()),
            display_name=display_name or cert.subject.rfc4514_string(),
        )

    @property
    def sha1(self):
        return self.certificate.fingerprint(hashes.SHA1())

    @property
    def sha256(self):
        return self.certificate.fingerprint(hashes.SHA256())

    def describe(self):
        return {
            "customKeyIdentifier": self.sha1.hex().upper(),
            "displayName": self.display_name,
            "endDateTime": utc_iso(self.end),
            "key": None,
            "keyId": self.key_id,
            "startDateTime": utc_iso(self.start),
            "type": "AsymmetricX509Cert",
            "usage": "Verify",
        }


def verify_client_assertion(assertion, client_id, keys, audiences, now):
    """Check a client assertion as Entra does; return (the signing KeyCredential, JWT header).

    ``audiences`` are the token endpoint URLs the ``aud`` claim may name.
    Raises :class:`EntraError` with the AADSTS code Entra would send.
    """
    try:
        header_b64, payload_b64, signature_b64 = assertion.split(".")
        header = json.loads(b64url_decode(header_b64))
        claims = json.loads(b64url_decode(payload_b64))
        signature = b64url_decode(signature_b64)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise malformed_assertion() from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise malformed_assertion()

    algorithm = header.get("alg")
    if algorithm not in ("RS256", "PS256"):
        raise assertion_rejected(
            client_id, f"The signing algorithm '{algorithm}' is not supported."
        )

    key, thumbprint = _find_key(header, keys)
    if key is None:
        raise assertion_rejected(client_id, "The key was not found.", thumbprint)
    if not key.start <= now <= key.end:
        raise assertion_rejected(client_id, "The key used is expired.", thumbprint, key)

    signing_input = f"{header_b64}.{payload_b64}".encode("ascii")
    if algorithm == "RS256":
        scheme = padding.PKCS1v15()
    else:  # RFC 7518 3.5: MGF1 with SHA-256 and a salt as long as the hash
        scheme = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    try:
        key.certificate.public_key().verify(signature, signing_input, scheme, hashes.SHA256())
    except InvalidSignature:
        raise assertion_rejected(
            client_id,
            "The key was found but use of the key to verify the signature failed.",
            thumbprint,
            key,
        ) from None

    for claim in ("aud", "iss", "sub", "exp", "jti"):
        if claim not in claims:
            raise missing_claim(claim)
    if claims["iss"] != client_id or claims["sub"] != client_id:
        raise assertion_client_mismatch()
    if claims["aud"] not in audiences:
        raise EntraError(
            401,
            "invalid_client",
            700027,
            f"Client assertion failed signature validation. [Reason - The audience "
            f"'{claims['aud']}' is not the token endpoint of this tenant.] {CERT_DOCS}",
        )
    exp, nbf = claims["exp"], claims.get("nbf")
    if not isinstance(exp, (int, float)) or (nbf is not None and not isinstance(nbf, (int, float))):
        raise malformed_assertion()
    if now >= exp or (nbf is not None and now < nbf):
        raise assertion_time_range(now, nbf, exp)
    return key, header


def _find_key(header, keys):
    """The registered key named by ``x5t#S256`` (preferred) or ``x5t``, and its hex thumbprint."""
    for name, digest in (("x5t#S256", "sha256"), ("x5t", "sha1")):
        if name not in header:
            continue
        try:
            wanted = b64url_decode(header[name])
        except (ValueError, TypeError, binascii.Error):
            return None, None
        for key in keys:
            if hmac.compare_digest(getattr(key, digest), wanted):
                return key, wanted.hex().upper()
        return None, wanted.hex().upper()
    return None, None


# ---------------------------------------------------------------- discovery


def openid_configuration(origin, path_tenant, tenant_id):
    """The v2.0 discovery document Entra serves, with every URL on this fake's origin.

    ``tenant_id`` is None for ``common``/``organizations``: the issuer then carries
    Entra's literal ``{tenantid}`` placeholder.
    """
    tid = tenant_id or path_tenant
    base = f"{origin}/{tid}"
    return {
        "token_endpoint": f"{base}/oauth2/v2.0/token",
        "token_endpoint_auth_methods_supported": [
            "client_secret_post",
            "private_key_jwt",
            "client_secret_basic",
        ],
        "jwks_uri": f"{base}/discovery/v2.0/keys",
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": f"{origin}/{tenant_id or '{tenantid}'}/v2.0",
        "request_uri_parameter_supported": False,
        "userinfo_endpoint": f"{origin}/oidc/userinfo",
        "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
        "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
        "http_logout_supported": True,
        "frontchannel_logout_supported": True,
        "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
        "claims_supported": [
            "sub",
            "iss",
            "cloud_instance_name",
            "cloud_instance_host_name",
            "cloud_graph_host_name",
            "msgraph_host",
            "aud",
            "exp",
            "iat",
            "auth_time",
            "acr",
            "nonce",
            "preferred_username",
            "name",
            "tid",
            "ver",
            "at_hash",
            "c_hash",
            "email",
        ],
        "kerberos_endpoint": f"{base}/kerberos",
        "tenant_region_scope": "EU",
        "cloud_instance_name": "microsoftonline.com",
        "cloud_graph_host_name": "graph.windows.net",
        "msgraph_host": "graph.microsoft.com",
        "rbac_url": "https://pas.windows.net",
    }
