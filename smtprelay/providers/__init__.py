"""Providers: where stored messages go (Graph, Gmail API, upstream SMTP, a Maildir)."""


def make_provider(config, reactor):
    """The IProvider for ``config.provider`` (imported lazily: each has its own deps)."""
    p = config.provider
    if p.type == "outbox":
        from smtprelay.providers.outbox import OutboxProvider

        return OutboxProvider(p.directory, reactor, hostname=config.smtp.hostname)
    if p.type == "smtp":
        from smtprelay.providers.smtp import SMTPProvider

        return SMTPProvider(config, reactor)
    if p.type == "m365":
        from smtprelay.providers.m365 import GraphProvider

        return GraphProvider(config, reactor)
    if p.type == "gmail":
        from smtprelay.providers.gmail import GmailProvider

        return GmailProvider(config, reactor)
    raise ValueError(f"unknown provider type {p.type!r}")
