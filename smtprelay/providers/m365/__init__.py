"""The Microsoft 365 provider (Microsoft Graph), room by room.

:mod:`.provider` sends (sendMail or a draft) and answers the admin;
:mod:`.credentials` gets tokens from Entra ID (msal) and knows the
credential's expiry; :mod:`.requests` makes one HTTP request to Graph
(connection pool, per-mailbox slots, timeouts); :mod:`.classify` says what an
answer means; :mod:`.mime` cuts a stored message into what Graph takes.  Who
receives is decided by :mod:`smtprelay.recipients`, shared with Gmail.
"""

from smtprelay.providers.m365.provider import GraphProvider

__all__ = ["GraphProvider"]
