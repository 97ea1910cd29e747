"""The test message of ``POST /api/test-mail``: a proper RFC 5322 message (pure).

It carries what a message received over SMTP carries: a ``Received:`` header
made by the same function as the SMTP side (``with HTTP``), then Date,
Message-ID, From (``sender.default``), To, Subject, MIME-Version and a short
UTF-8 text body saying where it came from.  Lines end in CRLF, as stored
messages do.  :func:`facts` and :func:`prepare` give it to the intake
(:meth:`smtprelay.intake.Intake.test_message`), which stores and delivers it
directly as it does a message received over SMTP in direct mode.
"""

from __future__ import annotations

import email.policy
import email.utils
from email.message import EmailMessage

from smtprelay import message as msg
from smtprelay.intake import AuthUser, Prepared, Transaction

_POLICY = email.policy.SMTP.clone(max_line_length=78)


def message_id_header(message_id: str, hostname: str) -> str:
    """The Message-ID of the test message with the relay's id ``message_id``."""
    return f"<{message_id}.test@{hostname or 'smtprelay'}>"


def build(message_id: str, sender: str, to: str, subject: str, hostname: str,
          client_address: str, provider_type: str, now: float) -> bytes:
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


def facts(sender: str, to: str, client_address: str) -> Transaction:
    """The test message as the intake sees a transaction: from the admin API, always direct."""
    return Transaction(sender=sender, original_sender=sender, recipients=(to,),
                       client_address=client_address, helo="admin-api",
                       user=AuthUser("admin"), protocol="HTTP", mode="direct")


def prepare(message_id: str, sender: str, to: str, subject: str, hostname: str,
            client_address: str, provider_type: str, now: float) -> Prepared:
    """The test message built (:func:`build`), with the headers its envelope keeps."""
    data = build(message_id, sender, to, subject, hostname, client_address, provider_type, now)
    return Prepared(id=message_id, received_at=now, data=data, header_from=sender.lower(),
                    subject=subject, message_id=message_id_header(message_id, hostname))
