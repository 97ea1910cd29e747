"""The SMTP replies the relay gives: one table, shared by the server, the intake and the tests.

``shared/spec/smtp.md`` fixes these codes and texts; clients and the acceptance
tests compare them, so an entry changes only with the contract.  A text with
``{name}`` fields is completed with :meth:`Reply.format`.  The replies to a
refused body (NUL, bare CR/LF, line and size limits) are the DataReader's own,
in :mod:`smtprelay.smtp.data`; a direct-mode delivery's reply carries the
provider's words (:func:`smtprelay.intake.direct_reply`).
"""

from __future__ import annotations

from typing import Any

import attr


@attr.frozen
class Reply:
    """One reply line: ``code``, RFC 3463 ``status`` (None for a greeting or a 334), ``text``."""

    code: int
    status: str | None
    text: str

    def format(self, **fields: Any) -> Reply:
        """This reply with the ``{name}`` fields of its text filled in."""
        return attr.evolve(self, text=self.text.format(**fields))

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}" if self.status else \
            f"{self.code} {self.text}"


@attr.frozen
class Lines:
    """A multi-line reply (``code-line`` ... ``code line``)."""

    code: int
    lines: tuple[str, ...]


# -- connection ------------------------------------------------------------------------------------

GREETING = Reply(220, None, "{hostname} ESMTP smtprelay")
NETWORK_REFUSED = Reply(554, "5.7.1", "{host} is not allowed to use this relay")
NOT_ACCEPTING = Reply(421, "4.3.2", "{hostname} Service not available, closing channel")
LOCKED_OUT_AT_CONNECT = Reply(421, "4.7.0",
                              "{hostname} Too many failed authentications; try later")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "{hostname} Too many connections; try again later")
TOO_MANY_FROM_ADDRESS = Reply(421, "4.7.0", "{hostname} Too many connections from your address")
TIMEOUT = Reply(421, "4.4.2", "{hostname} Error: timeout exceeded")
SHUTTING_DOWN = Reply(421, "4.3.2", "{hostname} Service shutting down")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors; closing connection")

# -- commands --------------------------------------------------------------------------------------

LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
INVALID_CHARACTERS = Reply(500, "5.5.2", "Invalid characters in command")
INVALID_CHARACTERS_8BIT = Reply(500, "5.5.2", "Invalid characters in command (8-bit)")
BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")
NOT_RECOGNIZED = Reply(500, "5.5.1", "Error: command not recognized")
INTERNAL_ERROR = Reply(451, "4.3.0", "Error: internal error in processing")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")

GREET_SYNTAX = Reply(501, "5.5.4", "Syntax: {verb} hostname")
HELLO = Reply(250, None, "{hostname} Hello {helo} [{host}]")
OK = Reply(250, "2.0.0", "Ok")
RSET_SYNTAX = Reply(501, "5.5.4", "Syntax: RSET")
BYE = Reply(221, "2.0.0", "Bye")
VRFY_SYNTAX = Reply(501, "5.5.4", "Syntax: VRFY address")
CANNOT_VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Lines(214, (
    "2.0.0 smtprelay: an SMTP relay to Microsoft 365, Gmail or upstream SMTP",
    "2.0.0 Commands: HELO EHLO STARTTLS AUTH MAIL RCPT DATA RSET NOOP VRFY HELP QUIT",
    "2.0.0 End of HELP",
))

# -- STARTTLS --------------------------------------------------------------------------------------

STARTTLS_SYNTAX = Reply(501, "5.5.4", "Syntax: STARTTLS")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")

# -- AUTH ------------------------------------------------------------------------------------------

AUTH_NOT_ENABLED = Reply(502, "5.5.1", "Error: authentication not enabled")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11",
                            "Encryption required for requested authentication mechanism")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "Error: AUTH not permitted during a mail transaction")
AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
AUTH_MECHANISM_UNKNOWN = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_CONTINUE = Reply(334, None, "")
AUTH_USERNAME = Reply(334, None, "VXNlcm5hbWU6")  # base64 "Username:"
AUTH_PASSWORD = Reply(334, None, "UGFzc3dvcmQ6")  # base64 "Password:"
AUTH_CANCELLED = Reply(501, "5.5.2", "Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Invalid base64 data in AUTH response")
AUTH_BAD_PLAIN = Reply(501, "5.5.2", "Malformed PLAIN authentication response")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_LOCKED_OUT = Reply(421, "4.7.0", "Too many failed authentications; try again later")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")

# -- the envelope ----------------------------------------------------------------------------------

NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Non-ASCII addresses are not supported")
BAD_SIZE = Reply(501, "5.5.4", "Bad SIZE parameter")
SIZE_EXCEEDED = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BAD_BODY = Reply(501, "5.5.4", "Bad BODY parameter")
UNSUPPORTED_PARAMETER = Reply(555, "5.5.4", "Unsupported parameter {name}")
SENDER_NOT_ALLOWED = Reply(550, "5.7.1", "Sender not allowed")
SENDER_OK = Reply(250, "2.1.0", "Ok")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")

# -- DATA and the end of data ------------------------------------------------------------------

DATA_SYNTAX = Reply(501, "5.5.4", "Syntax: DATA")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
# the body itself refused, at its end (smtp/data.py decides which)
NUL_NOT_ALLOWED = Reply(550, "5.6.0", "NUL character not allowed")
BARE_NEWLINE_NOT_ALLOWED = Reply(550, "5.6.0", "Bare CR or LF not allowed")
DATA_LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
LOCAL_ERROR = Reply(451, "4.3.0", "Error: local error in processing; try again later")
FROM_HEADER_NOT_ALLOWED = Reply(550, "5.7.1", "Sender not allowed in From header")
STORAGE_FAILURE = Reply(451, "4.3.0", "Error: temporary storage failure; try again later")
QUEUED = Reply(250, "2.0.0", "Ok: queued as {id}")

# direct mode: the reply waits for the provider
SENT = Reply(250, "2.0.0", "Ok: sent {id}")
SENT_TO_SOME = Reply(250, "2.0.0", "Ok: sent {id} to {sent} of {total} recipients; {detail}")
# the status and, when the provider said something, the text are the provider's
DELIVERY_DEFERRED = Reply(451, "4.0.0", "Temporary delivery failure")
DELIVERY_FAILED = Reply(554, "5.0.0", "Delivery failed")
