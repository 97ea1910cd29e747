"""What can go wrong with an upstream SMTP server, besides a reply.

This module owns the failures the client side raises: those a pending
command sees instead of a reply (:class:`ConnectionFailed` and its kinds)
and :class:`UpstreamFailure`, a session that could not be set up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smtprelay.providers.smtp.replies import Reply


class ConnectionFailed(Exception):
    """Base of the failures a pending command sees instead of a reply."""


class ReplyTimeout(ConnectionFailed):
    def __init__(self, seconds: float, waiting_for: str) -> None:
        super().__init__(f"no reply to {waiting_for} within {seconds:g}s")
        self.seconds = seconds
        self.waiting_for = waiting_for


class BodyStalled(ConnectionFailed):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"the server stopped reading the message for {seconds:g}s")
        self.seconds = seconds


class ConnectionClosed(ConnectionFailed):
    def __init__(self, reason: BaseException, waiting_for: str | None = None,
                 streaming: bool = False) -> None:
        super().__init__(f"connection lost: {reason!r}")
        self.reason = reason  # the exception Twisted reported
        self.waiting_for = waiting_for
        self.streaming = streaming  # lost while the body was still being written


class ProtocolViolation(ConnectionFailed):
    """The server said something SMTP does not allow here."""


class PrematureReply(ConnectionFailed):
    """A reply arrived while the body was still being sent."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"the server replied before the end of the message: {reply}")
        self.reply = reply


class UpstreamFailure(Exception):
    """A session could not be set up; ``stage`` is "connect", "tls" or "auth".

    ``notes`` holds what the steps before it achieved (for ``check()``).
    """

    def __init__(self, detail: str, stage: str, notes: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.stage = stage
        self.notes = dict(notes or {})
