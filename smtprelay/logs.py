"""Log observers: plain text or JSON lines, with secrets scrubbed.

The relay never logs a secret on purpose; these observers are the second
line: any configured secret value (or its base64 form, as in an AUTH line)
that still reaches an event, in a message, a field or a traceback, is
replaced by ``[redacted]`` before it is written.

The plugin installs the plain one by default (same destination as twistd's
own: stdout under ``-n``, else ``--logfile``); ``twistd
--logger=smtprelay.logs.json_observer`` gives JSON lines.
"""

import base64
import io
import sys

from twisted.logger import jsonFileLogObserver, textFileLogObserver
from twisted.python import logfile

_secrets = []


def set_secrets(values):
    """Values to scrub from every log event (called when a config is loaded)."""
    found = set()
    for v in values:
        if v and len(v) >= 4:
            found.add(v)
            found.add(base64.b64encode(v.encode("utf-8")).decode("ascii").rstrip("="))
    _secrets[:] = sorted(found, key=len, reverse=True)


def scrub(text):
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "[redacted]")
    return text


class _ScrubbingFile(io.TextIOBase):
    def __init__(self, out):
        self._out = out

    def write(self, text):
        return self._out.write(scrub(text))

    def flush(self):
        self._out.flush()


def text_observer(out=None):
    """Plain text, one event per line (with tracebacks), secrets scrubbed."""
    return textFileLogObserver(_ScrubbingFile(out or sys.stdout))


def json_observer(out=None):
    """JSON lines (twisted.logger's format), secrets scrubbed."""
    return jsonFileLogObserver(_ScrubbingFile(out or sys.stdout))


def observer_for_twistd(twistd_options):
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
