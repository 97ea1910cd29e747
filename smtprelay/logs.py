"""Log observers: plain text or JSON lines, with secrets scrubbed.

The relay never logs a secret on purpose; these observers are the second
line: any configured secret value that still reaches an event, in a message,
a field or a traceback, is replaced by ``[redacted]`` before it is written, in
every form it takes on the way: as is, base64 (at any of the three alignments:
an AUTH PLAIN payload holds the password after the user name), URL-encoded (a
token request's form body) and JSON-escaped.  A provider that quotes back what
it was sent puts them in its answer; :func:`scrub` is also what the queue runs
over a provider's answer before it goes into the delivery log.

The plugin installs the plain one by default (same destination as twistd's
own: stdout under ``-n``, else ``--logfile``); ``twistd
--logger=smtprelay.logs.json_observer`` gives JSON lines.
"""

import base64
import io
import json
import sys
from urllib.parse import quote, quote_plus

from twisted.logger import jsonFileLogObserver, textFileLogObserver
from twisted.python import logfile

_secrets = []


MIN_BASE64_CORE = 8  # shorter runs of base64 would match text by chance


def secret_forms(value):
    """``value`` and the ways it is written on the wire (see the module docstring)."""
    raw = value.encode("utf-8")
    found = {value, base64.b64encode(raw).decode("ascii").rstrip("="),
             quote_plus(value), quote(value), quote(value, safe=""), json.dumps(value)[1:-1]}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw).decode("ascii")
        # only the 4-character groups made of the value's bytes alone: the same
        # whatever precedes or follows it
        start = 4 if offset else 0
        end = len(encoded) - (4 if (offset + len(raw)) % 3 else 0)
        if end - start >= MIN_BASE64_CORE:
            found.add(encoded[start:end])
    return found


def set_secrets(values):
    """Values to scrub from every log event (called when a config is loaded)."""
    found = set()
    for v in values:
        if v and len(v) >= 4:
            found.update(secret_forms(v))
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
