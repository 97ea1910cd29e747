"""``provider.type = "smtp"``: relay stored messages to one upstream SMTP server.

The package, by what each module owns:

- :mod:`.provider`: ``SMTPProvider`` (IProvider): session set-up (connect,
  TLS, AUTH), ``send()`` and ``check()``;
- :mod:`.transaction`: one mail transaction (MAIL, RCPT, DATA) and its
  per-recipient outcome;
- :mod:`.client`: the client protocol on the wire (replies, deadlines, the body);
- :mod:`.pool`: reuse of authenticated connections;
- :mod:`.tls`: TLS options and what a handshake says;
- :mod:`.replies`: what the upstream's replies mean (pure);
- :mod:`.errors`: the failures short of a reply.
"""

from smtprelay.providers.smtp.provider import SMTPProvider

__all__ = ["SMTPProvider"]
