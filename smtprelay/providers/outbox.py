"""The outbox provider: each delivered message becomes a Maildir file in ``new/``.

For trying the relay and legacy applications without sending mail.  The file
is the stored message with ``X-Smtprelay-Envelope-From`` and one
``X-Smtprelay-Envelope-To`` per recipient in front, written to ``tmp/``,
fsynced, renamed into ``new/`` and the folder fsynced: after the outcome
"sent" it survives a power loss.  Blocking file work runs in a thread.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from typing import Any

from twisted.internet import defer, threads
from twisted.python.failure import Failure
from zope.interface import implementer

from smtprelay.model import Outcome
from smtprelay.providers.base import CheckResult, IProvider, OutgoingMessage, ProviderBase, Step

_COPY = 1 << 20


def _header_value(address: str) -> str:
    # addresses come from the SMTP envelope, which cannot hold CR or LF; be sure
    return address.replace("\r", "").replace("\n", "")


def envelope_headers(sender: str, recipients: Iterable[str]) -> bytes:
    lines = [b"X-Smtprelay-Envelope-From: <" + _header_value(sender).encode("utf-8") + b">\r\n"]
    for r in recipients:
        lines.append(b"X-Smtprelay-Envelope-To: <" + _header_value(r).encode("utf-8") + b">\r\n")
    return b"".join(lines)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@implementer(IProvider)
class OutboxProvider(ProviderBase):
    type = "outbox"

    # the reactor: its clock and its thread pool
    def __init__(self, directory: str, reactor: Any, hostname: str | None = None) -> None:
        self.directory = directory
        self._reactor = reactor
        self._hostname = ((hostname or socket.gethostname())
                          .replace("/", "\\057").replace(":", "\\072"))
        self._seq = 0

    def _ensure(self) -> None:
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(self.directory, sub), exist_ok=True)

    def _write(self, message: OutgoingMessage, name: str) -> str:
        self._ensure()
        tmp = os.path.join(self.directory, "tmp", name)
        final = os.path.join(self.directory, "new", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(envelope_headers(message.sender, message.recipients))
                message.body.seek(0)
                while True:
                    chunk = message.body.read(_COPY)
                    if not chunk:
                        break
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, final)
            _fsync_dir(os.path.join(self.directory, "new"))
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return final

    def _name(self, message: OutgoingMessage) -> str:
        self._seq += 1
        now = self._reactor.seconds()
        return (f"{int(now)}.M{int((now % 1) * 1e6)}P{os.getpid()}Q{self._seq}"
                f".{message.id}.{self._hostname}")

    def send(self, message: OutgoingMessage) -> defer.Deferred[Outcome]:
        name = self._name(message)
        d = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                      self._write, message, name)

        def ok(path: str) -> Outcome:
            return Outcome.sent(f"written to {os.path.basename(os.path.dirname(path))}/{name}",
                                provider_id=name)

        def failed(f: Failure) -> Outcome:
            e = f.value
            reason = e.strerror if isinstance(e, OSError) and e.strerror else f.getErrorMessage()
            return Outcome.temporary(f"cannot write to the outbox {self.directory}: {reason}")

        return d.addCallbacks(ok, failed)

    def check(self) -> defer.Deferred[CheckResult]:
        def probe() -> None:
            self._ensure()
            path = os.path.join(self.directory, "tmp", f".check.{os.getpid()}")
            with open(path, "wb") as f:
                f.write(b"x")
                os.fsync(f.fileno())
            os.unlink(path)

        d = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), probe)

        def ok(_: None) -> CheckResult:
            return CheckResult((Step("outbox writable", True, self.directory),))

        def failed(f: Failure) -> CheckResult:
            e = f.value
            reason = e.strerror if isinstance(e, OSError) and e.strerror else f.getErrorMessage()
            return CheckResult((Step("outbox writable", False, f"{self.directory}: {reason}"),))

        return d.addCallbacks(ok, failed)
