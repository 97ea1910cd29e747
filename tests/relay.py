"""Running the real relay for tests: ``twistd -n smtprelay --config`` in a subprocess.

``RelayProcess`` writes a relay.toml (listening on port 0), starts twistd,
reads the bound ports from its log, and offers the outbox, the database and
the log to the test.  ``RawSMTP`` is a blocking socket client that sends
exact bytes and reads replies, for protocol and attack tests; ``smtplib``
and ``swaks`` are the other real clients.
"""

import email
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path

import tomlkit

TWISTD = str(Path(sys.executable).with_name("twistd"))
REPO = Path(__file__).resolve().parent.parent


def deep_merge(base, extra):
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def base_config(directory):
    return {
        "smtp": {"listen": "127.0.0.1:0", "hostname": "relay.test", "idle_timeout": "30s"},
        "sender": {"default": "relay@example.com", "allowed": ["*"]},
        "provider": {"type": "outbox", "directory": str(directory / "outbox")},
        "delivery": {"retry": ["1s", "2s"]},
        "database": {"url": f"sqlite:///{directory / 'relay.db'}"},
        "admin": {"listen": ""},
    }


class RelayProcess:
    def __init__(self, directory, config=None, env=None, logger=None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config = deep_merge(base_config(self.directory), config or {})
        self.config_path = self.directory / "relay.toml"
        self.log_path = self.directory / "twistd.log"
        self.env = dict(os.environ, **(env or {}))
        # the relay under test is this checkout, whatever the venv was installed from
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO)] + [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.env.pop("REQUESTS_CA_BUNDLE", None)
        self.env.pop("CURL_CA_BUNDLE", None)
        self.logger = logger
        self.proc = None
        self.smtp_ports = []
        self.admin_port = None
        self.instance_id = None  # the store's instance id (lease owner), once ready
        self._log_offset = 0

    # -- life --------------------------------------------------------------------

    def write_config(self):
        self.config_path.write_text(tomlkit.dumps(self.config))

    def start(self, timeout=30, expect_ready=True):
        self.write_config()
        args = [TWISTD, "-n", "--pidfile=", "--logfile=-"]
        if self.logger:
            args.append(f"--logger={self.logger}")
        args += ["smtprelay", "--config", str(self.config_path)]
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self._logf, stderr=subprocess.STDOUT,
                                     cwd=self.directory, env=self.env)
        if expect_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            # plain text, or the fields of a JSON line (--logger smtprelay.logs.json_observer)
            m = (re.search(r"ready: SMTP on (\S+:\d+(?:, \S+:\d+)*), provider", text)
                 or re.search(r'"listen": "(\S+:\d+(?:, \S+:\d+)*)"', text))
            if m:
                self.smtp_ports = [int(a.rsplit(":", 1)[1]) for a in m.group(1).split(", ")]
                a = (re.search(r"admin API on \S+:(\d+)", text)
                     or re.search(r'"address": "\S+:(\d+)", [^\n]*"log_format": "admin API on',
                                  text))
                if a:
                    self.admin_port = int(a.group(1))
                i = re.search(r"ready: .*, instance (\S+)", text)
                self.instance_id = i.group(1) if i else None
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise RuntimeError(f"relay not ready after {timeout}s:\n{self.log()}")

    def wait_exit(self, timeout=30):
        try:
            return self.proc.wait(timeout)
        finally:
            self._logf.close()

    def stop(self, timeout=40):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self._logf.close()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._logf.close()

    def freeze(self):
        """SIGSTOP: the process holds whatever it holds, doing nothing."""
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self):
        self.proc.send_signal(signal.SIGCONT)

    def restart(self, **kw):
        self.stop()
        return self.start(**kw)

    @property
    def port(self):
        return self.smtp_ports[0]

    # -- what it did ---------------------------------------------------------------------

    def log(self, whole=False):
        if not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()
        if whole:
            return data.decode("utf-8", "replace")
        return data[self._log_offset:].decode("utf-8", "replace")

    @property
    def outbox(self):
        return Path(self.config["provider"].get("directory", self.directory / "outbox")) / "new"

    def outbox_files(self):
        if not self.outbox.exists():
            return []
        return sorted(self.outbox.iterdir(), key=lambda p: p.stat().st_mtime_ns)

    def wait_outbox(self, count, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            files = self.outbox_files()
            if len(files) >= count:
                return files
            time.sleep(0.05)
        raise AssertionError(f"expected {count} outbox files, found {len(self.outbox_files())}\n"
                             f"{self.log()[-3000:]}")

    @property
    def database_url(self):
        return self.config["database"]["url"]

    @property
    def on_postgres(self):
        return self.database_url.startswith(("postgresql:", "postgres:"))

    def db(self):
        """A connection to the relay's database (sqlite3 or psycopg, autocommit);
        the caller closes it."""
        if self.on_postgres:
            import psycopg

            return psycopg.connect(self.database_url, autocommit=True)
        return sqlite3.connect(self.database_url[len("sqlite:///"):], timeout=30)

    def query(self, sql, params=()):
        """The rows of ``sql``, written with ``?`` placeholders as the store's SQL
        is, whichever database the relay uses."""
        conn = self.db()
        try:
            if self.on_postgres:
                from smtprelay.store.postgres import PostgresDialect

                cur = conn.execute(PostgresDialect().sql(sql), params)
                return cur.fetchall() if cur.description else []
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def wait_status(self, message_id, statuses, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.query("SELECT status FROM messages WHERE id = ?", (message_id,))
            if rows and rows[0][0] in statuses:
                return rows[0][0]
            time.sleep(0.05)
        raise AssertionError(f"{message_id} not in {statuses}: {rows}\n{self.log()[-3000:]}")


def parse_outbox(path):
    """(envelope_from, [envelope_to], message_bytes_without_envelope_headers)."""
    data = Path(path).read_bytes()
    env_from, env_to = None, []
    while data.startswith(b"X-Smtprelay-Envelope-"):
        line, _, data = data.partition(b"\r\n")
        name, _, value = line.partition(b": ")
        addr = value.decode()[1:-1]
        if name == b"X-Smtprelay-Envelope-From":
            env_from = addr
        else:
            env_to.append(addr)
    return env_from, env_to, data


def strip_received(data):
    """The message as the client sent it: without the relay's Received header."""
    assert data.startswith(b"Received: from "), data[:200]
    end = data.index(b"\r\n", data.index(b";\r\n\t") + 3) + 2
    return data[end:]


class SMTPReply:
    def __init__(self, lines):
        self.lines = lines
        self.code = int(lines[-1][:3])
        self.text = "\n".join(line[4:] for line in lines)

    def __repr__(self):
        return f"<SMTPReply {' | '.join(self.lines)}>"

    @property
    def enhanced(self):
        m = re.match(r"\d{3}[ -](\d\.\d{1,3}\.\d{1,3})", self.lines[-1])
        return m.group(1) if m else None


class RawSMTP:
    """Exact bytes out, parsed replies in; for protocol and attack tests."""

    def __init__(self, port, host="127.0.0.1", timeout=15, tls=False, ca=None):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        if tls:
            self.sock = self._wrap(ca)
        self.buffer = b""

    def _wrap(self, ca):
        ctx = ssl.create_default_context(cafile=ca)
        ctx.check_hostname = False
        if ca is None:
            ctx.verify_mode = ssl.CERT_NONE
        return ctx.wrap_socket(self.sock, server_hostname="localhost")

    def starttls(self, ca=None):
        self.sock = self._wrap(ca)
        self.buffer = b""

    def send(self, data):
        self.sock.sendall(data)

    def cmd(self, line):
        self.send(line.encode() + b"\r\n" if isinstance(line, str) else line + b"\r\n")
        return self.reply()

    def _readline(self):
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unread: {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line.decode("utf-8", "replace")

    def reply(self):
        lines = [self._readline()]
        while len(lines[-1]) > 3 and lines[-1][3] == "-":
            lines.append(self._readline())
        return SMTPReply(lines)

    def replies(self, n):
        return [self.reply() for _ in range(n)]

    def closed(self, timeout=5):
        """True when the server closes the connection (after any pending bytes)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def require_tool(name):
    """The path of a Debian tool a test needs; skip with a clear reason if missing
    (CI sets SMTPRELAY_REQUIRE_TOOLS=1, which turns the skip into a failure)."""
    import pytest

    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None
    )
    if path is None:
        package = "postfix" if name.startswith("smtp-") else name
        message = f"{name} is not installed (apt-get install {package})"
        if os.environ.get("SMTPRELAY_REQUIRE_TOOLS"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def message_from_bytes(data):
    return email.message_from_bytes(data)


__all__ = [
    "RawSMTP",
    "RelayProcess",
    "json",
    "message_from_bytes",
    "parse_outbox",
    "require_tool",
    "strip_received",
]
