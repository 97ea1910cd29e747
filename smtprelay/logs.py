"""Log observers: plain text or JSON lines, with secrets scrubbed.

The relay never logs a secret on purpose; these observers are the second
line: any configured secret value that still reaches an event (in a message,
a field or a traceback) is replaced by ``[redacted]`` before it is written.
Use ``twistd --logger smtprelay.logs.json_observer`` for JSON lines.
"""

import io
import json
import sys

from twisted.logger import (
    FileLogObserver,
    eventAsJSON,
    formatEvent,
    formatEventAsClassicLogText,
    jsonFileLogObserver,
    textFileLogObserver,
)

_secrets = []


def set_secrets(values):
    """Values to scrub from every log event (called when a config is loaded)."""
    _secrets[:] = sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)
    for v in list(_secrets):
        import base64

        b64 = base64.b64encode(v.encode()).decode()
        if b64 not in _secrets:
            _secrets.append(b64)


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


def format_plain(event):
    return scrub(formatEventAsClassicLogText(event) or "")


__all__ = ["set_secrets", "scrub", "text_observer", "json_observer", "FileLogObserver",
           "eventAsJSON", "formatEvent", "json"]
