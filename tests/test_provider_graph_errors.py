"""The classification of every Graph and Entra answer (smtprelay.providers.m365.classify).

The table of ``providers.md`` row by row, then properties over every status
code and arbitrary texts: nothing raises, a detail is one line with the
status, Graph's code and the request-id, 5xx and 429 are never permanent.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtprelay.providers.m365 import classify as e
from smtprelay.providers.m365.classify import PERMANENT, REFRESH, TEMPORARY, TOO_LARGE

NOW = 1_800_000_000.0

TABLE = [
    # status, code, operation, action, mailbox_wide
    (400, "ErrorMimeContentInvalidBase64String", "sendMail", PERMANENT, False),
    (400, "ErrorInvalidRecipients", "sendMail", PERMANENT, False),
    (400, "ErrorMessageSizeExceeded", "send", PERMANENT, False),
    (400, "BadRequest", "createMessage", PERMANENT, False),
    (400, "RequestBodyRead", "updateMessage", PERMANENT, False),
    (401, "InvalidAuthenticationToken", "sendMail", REFRESH, False),
    (403, "ErrorAccessDenied", "sendMail", PERMANENT, False),
    (403, "ErrorAccessDenied", "createMessage", PERMANENT, False),
    (403, "ErrorSendAsDenied", "sendMail", PERMANENT, False),
    (403, "Authorization_RequestDenied", "getUser", PERMANENT, False),
    (404, "ErrorInvalidUser", "sendMail", PERMANENT, False),
    (404, "MailboxNotEnabledForRESTAPI", "sendMail", PERMANENT, False),
    (404, "ErrorItemNotFound", "send", TEMPORARY, False),
    (404, "ResourceNotFound", "sendMail", TEMPORARY, False),
    (404, None, "sendMail", TEMPORARY, False),
    (409, "ErrorIrresolvableConflict", "send", TEMPORARY, False),
    (413, "RequestEntityTooLarge", "sendMail", TOO_LARGE, False),
    (415, "UnsupportedMediaType", "sendMail", PERMANENT, False),
    (416, "ErrorInvalidRange", "upload", TEMPORARY, False),
    (429, "ApplicationThrottled", "sendMail", TEMPORARY, True),
    (429, None, "upload", TEMPORARY, True),
    (500, "ErrorInternalServerError", "sendMail", TEMPORARY, False),
    (502, "BadGateway", "sendMail", TEMPORARY, False),
    (503, "ServiceUnavailable", "sendMail", TEMPORARY, False),
    (504, "GatewayTimeout", "sendMail", TEMPORARY, False),
]


@pytest.mark.parametrize("status,code,operation,action,wide", TABLE)
def test_the_table(status, code, operation, action, wide):
    v = e.classify(status, code, "words", "rid-1", None, NOW, operation)
    assert (v.action, v.mailbox_wide) == (action, wide), v
    assert f"Graph {status}" in v.detail and "(request-id rid-1)" in v.detail
    if code:
        assert code in v.detail


def test_a_second_401_is_temporary():
    v = e.classify(401, "InvalidAuthenticationToken", "expired", None, None, NOW, refreshed=True)
    assert v.action == TEMPORARY and "refused twice" in v.detail


def test_a_refused_upload_url_is_temporary_and_needs_no_token():
    v = e.classify(401, "InvalidAuthenticationToken", "expired", None, None, NOW, "upload")
    assert v.action == TEMPORARY and "upload session" in v.detail


def test_retry_after_applies_to_the_mailbox():
    throttled = e.classify(429, "ApplicationThrottled", "over", None, NOW + 7, NOW)
    assert (throttled.not_before, throttled.mailbox_wide) == (NOW + 7, True)
    bare = e.classify(429, "ApplicationThrottled", "over", None, None, NOW)
    assert bare.not_before == NOW + e.DEFAULT_THROTTLE_SECONDS and bare.mailbox_wide
    unavailable = e.classify(503, "ServiceUnavailable", "later", None, NOW + 30, NOW)
    assert (unavailable.action, unavailable.not_before, unavailable.mailbox_wide) == (
        TEMPORARY, NOW + 30, True)
    plain = e.classify(503, "ServiceUnavailable", "later", None, None, NOW)
    assert (plain.not_before, plain.mailbox_wide) == (None, False)


def test_hints_say_what_to_do():
    policy = e.classify(403, "ErrorAccessDenied", "Access to OData is disabled: [RAOP] : Blocked "
                        "by tenant configured AppOnly AccessPolicy settings.", None, None, NOW)
    assert "access policy" in policy.detail
    send = e.classify(403, "ErrorAccessDenied", "Access is denied.", None, None, NOW, "sendMail")
    assert "Mail.Send" in send.detail
    draft = e.classify(403, "ErrorAccessDenied", "Access is denied.", None, None, NOW,
                       "createUploadSession")
    assert "Mail.ReadWrite" in draft.detail
    assert "Send As" in e.classify(403, "ErrorSendAsDenied", "x", None, None, NOW).detail
    assert "MaxSendSize" in e.classify(400, "ErrorMessageSizeExceeded", "x", None, None,
                                       NOW, "send").detail


def test_operations_are_named():
    assert e.classify(500, None, None, None, None, NOW, "upload").detail.startswith(
        "uploading an attachment: Graph 500")
    assert e.classify(500, None, None, None, None, NOW, "send").detail.startswith(
        "sending the draft: Graph 500")


@settings(max_examples=300)
@given(status=st.integers(100, 599), code=st.none() | st.text(max_size=60),
       message=st.none() | st.text(max_size=2000), rid=st.none() | st.text(max_size=60),
       operation=st.sampled_from(sorted(e._OPERATION_TEXT)), refreshed=st.booleans())
def test_every_answer_has_a_one_line_verdict(status, code, message, rid, operation, refreshed):
    v = e.classify(status, code, message, rid, None, NOW, operation, refreshed)
    assert v.action in (PERMANENT, TEMPORARY, REFRESH, TOO_LARGE)
    assert "\n" not in v.detail and "\r" not in v.detail
    assert f"Graph {status}" in v.detail
    assert len(v.detail) < 1000
    if status >= 500 or status == 429:
        assert v.action == TEMPORARY
    if status == 429:
        assert v.mailbox_wide and v.not_before is not None
    if v.action == PERMANENT:
        assert 400 <= status < 500 and status not in (401, 408, 413, 429)
    if v.action == REFRESH:
        assert status == 401 and not refreshed and operation != "upload"


# ---------------------------------------------------------------- tokens


def entra(code, error="invalid_client", text="Something."):
    return {"error": error, "error_codes": [code],
            "error_description": f"AADSTS{code}: {text}\r\nTrace ID: 1\r\nCorrelation ID: 2"}


@pytest.mark.parametrize("code,problem", [
    (7000215, "the client secret was rejected (AADSTS7000215)"),
    (7000222, "the client secret has expired (AADSTS7000222)"),
    (700016, "the application (client_id) is not registered in the tenant (AADSTS700016)"),
    (90002, "the tenant (tenant_id) was not found (AADSTS90002)"),
    (700027, "the certificate was rejected (AADSTS700027)"),
])
def test_credential_errors_are_temporary_and_named(code, problem):
    v = e.classify_token(entra(code, text="Invalid client secret provided. Ensure ..."))
    assert v.action == TEMPORARY
    assert v.credential_problem == problem
    assert v.detail.startswith(f"cannot get a token: invalid_client: AADSTS{code}: Invalid")
    assert "Trace ID" not in v.detail and "\n" not in v.detail


def test_throttled_or_failing_token_service_is_no_credential_problem():
    v = e.classify_token(entra(90055, "temporarily_unavailable", "Too many requests."))
    assert v.action == TEMPORARY and v.credential_problem is None
    v = e.classify_token(entra(50000, "server_error", "Oops."))
    assert v.credential_problem is None


def test_unknown_token_answers():
    assert e.classify_token({}).detail == "cannot get a token: unknown_error"
    v = e.classify_token({"error": "invalid_client", "error_description": "no number"})
    assert v.credential_problem == "the token service refused the credential (invalid_client)"
    assert e.aadsts_code({"error_description": "AADSTS7000222: expired"}) == 7000222


@pytest.mark.parametrize("kind,text,status,words", [
    ("ConnectionError", "Max retries exceeded", None, "unreachable"),
    ("ReadTimeout", "read timed out", None, "unreachable"),
    ("SSLError", "certificate verify failed", None, "TLS error"),
    ("MsalServiceError", "HTTP Error: 503", 503, "answered HTTP 503"),
    ("ValueError", "Unable to get authority configuration for https://x/t", None,
     "OpenID configuration"),
    ("RuntimeError", "boom", None, "RuntimeError: boom"),
])
def test_token_exceptions_are_temporary(kind, text, status, words):
    v = e.classify_token_exception(kind, text, status)
    assert v.action == TEMPORARY and words in v.detail and v.credential_problem is None


def test_one_line():
    assert e.one_line("a\r\n  b\tc") == "a b c"
    assert len(e.one_line("x" * 1000)) == e.MAX_TEXT
    assert e.one_line(None) == ""
