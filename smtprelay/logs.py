"""Log observers: plain text or JSON lines, with secrets scrubbed.

The relay never logs a secret on purpose; these observers are the second
line: any configured secret value that still reaches an event, in a message,
a field or a traceback, is replaced by ``[redacted]`` before it is written, in
every form it takes on the way (:func:`smtprelay.scrub.secret_forms`: as is,
base64, URL-encoded, JSON-escaped); the configured secrets are those that
:func:`smtprelay.scrub.set_secrets` was last given.

The plugin installs the plain one by default (same destination as twistd's
own: stdout under ``-n``, else ``--logfile``); ``twistd
--logger=smtprelay.logs.json_observer`` gives JSON lines.
"""

from __future__ import annotations

import io
import sys
from typing import IO, Any, cast

from twisted.logger import ILogObserver, jsonFileLogObserver, textFileLogObserver
from twisted.python import logfile

from smtprelay.scrub import scrub_configured as scrub

__all__ = ["json_observer", "observer_for_twistd", "text_observer"]


class _ScrubbingFile(io.TextIOBase):
    def __init__(self, out: IO[str] | logfile.LogFile) -> None:
        self._out = out

    def write(self, text: str) -> int:
        return self._out.write(scrub(text)) or 0

    def flush(self) -> None:
        self._out.flush()


def text_observer(out: IO[str] | logfile.LogFile | None = None) -> ILogObserver:
    """Plain text, one event per line (with tracebacks), secrets scrubbed."""
    return textFileLogObserver(cast(IO[str], _ScrubbingFile(out or sys.stdout)))


def json_observer(out: IO[str] | logfile.LogFile | None = None) -> ILogObserver:
    """JSON lines (twisted.logger's format), secrets scrubbed."""
    return jsonFileLogObserver(cast(IO[str], _ScrubbingFile(out or sys.stdout)))


def observer_for_twistd(twistd_options: dict[str, Any] | None) -> ILogObserver | None:
    """The scrubbing text observer at the destination twistd would use, or None
    (syslog, or options we cannot read: then twistd's own observer stays)."""
    if twistd_options is None or twistd_options.get("syslog"):
        return None
    path = twistd_options.get("logfile")
    if path == "-" or (not path and twistd_options.get("nodaemon")):
        return text_observer(sys.stdout)
    if not path:
        path = "twistd.log"
    return text_observer(logfile.LogFile.fromFullPath(path))
