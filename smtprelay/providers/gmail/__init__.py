"""The gmail provider (``provider.type = "gmail"``): the Gmail API of Google Workspace.

Its rooms: :mod:`.credentials` (google-auth service account and user OAuth, tokens
refreshed on the token threads), :mod:`.requests` (the upload and the profile probe
over treq), :mod:`.classify` (what Google's answers mean; pure) and :mod:`.provider`
(:class:`GmailProvider`: one message in, one outcome out).
"""

from smtprelay.providers.gmail.provider import GmailProvider

__all__ = ["GmailProvider"]
