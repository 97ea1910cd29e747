"""Providers: where stored messages go (Graph, Gmail API, upstream SMTP, a Maildir).

One package per type (``m365/``, ``gmail/``, ``smtp/``) and ``outbox.py``; shared
HTTP plumbing in ``_http.py``, token threads in ``_tokens.py``, the interface in
``base.py``.  Nothing above this package knows a provider's type but this factory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smtprelay.config import Config
    from smtprelay.providers.base import IProvider


def make_provider(config: Config, reactor: Any) -> IProvider:
    """The IProvider for ``config.provider`` (imported lazily: each has its own deps)."""
    from smtprelay.config import GmailProvider, M365Provider, OutboxProvider, SMTPProvider

    p = config.provider
    if isinstance(p, OutboxProvider):
        from smtprelay.providers.outbox import OutboxProvider as Outbox

        return Outbox(p.directory, reactor, hostname=config.smtp.hostname)
    if isinstance(p, SMTPProvider):
        from smtprelay.providers.smtp import SMTPProvider as Upstream

        return Upstream(config, reactor)
    if isinstance(p, M365Provider):
        from smtprelay.providers.m365 import GraphProvider

        return GraphProvider(config, reactor)
    if isinstance(p, GmailProvider):
        from smtprelay.providers.gmail import GmailProvider as Gmail

        return Gmail(config, reactor)
    raise ValueError(f"unknown provider type {getattr(p, 'type', p)!r}")
