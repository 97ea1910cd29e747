"""The test message of ``POST /api/test-mail``: a proper RFC 5322 message (pure).

It carries what a message received over SMTP carries: a ``Received:`` header
made by the same function as the SMTP side (``with HTTP``), then Date,
Message-ID, From (``sender.default``), To, Subject, MIME-Version and a short
UTF-8 text body saying where it came from.  Lines end in CRLF, as stored
messages do.
"""

import email.policy
import email.utils
from email.message import EmailMessage

from smtprelay import message as msg

_POLICY = email.policy.SMTP.clone(max_line_length=78)


def message_id_header(message_id, hostname):
    """The Message-ID of the test message with the relay's id ``message_id``."""
    return f"<{message_id}.test@{hostname or 'smtprelay'}>"


def build(message_id, sender, to, subject, hostname, client_address, provider_type, now):
    """-> the message bytes (CRLF), ``Received:`` first."""
    m = EmailMessage(policy=_POLICY)
    m["Date"] = email.utils.formatdate(now, usegmt=True)
    m["Message-ID"] = message_id_header(message_id, hostname)
    m["From"] = email.utils.formataddr(("smtprelay", sender))
    m["To"] = to
    m["Subject"] = subject
    m["Auto-Submitted"] = "auto-generated"
    m["X-Smtprelay-Test"] = "yes"
    m.set_content(
        "This is a test message from smtprelay.\n"
        "\n"
        f"It was sent from the admin page or API of the relay {hostname or '(unnamed)'}\n"
        f"through the {provider_type} provider, as {sender}, to {to}.\n"
        "If you can read it, the relay can deliver mail.\n",
        charset="utf-8",
        cte="quoted-printable",
    )
    received = msg.received_header(b"admin-api", client_address or "127.0.0.1", hostname,
                                   message_id, "HTTP", now)
    return received + m.as_bytes()
