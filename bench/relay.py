"""smtprelay under ``twistd`` as an administrator runs it, for the benchmark.

``BenchRelay(folder, provider)`` writes a relay.toml (SMTP on a free loopback
port, SQLite in ``folder``, admin API off), starts ``twistd -n smtprelay`` in
a session of its own (see :mod:`bench.procs`) and waits for its "ready" line.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import tomlkit

from bench.procs import PROCESSES, free_port

REPO = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


def merge(base, extra):
    out = dict(base)
    for key, value in (extra or {}).items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and \
            isinstance(out.get(key), dict) else value
    return out


class BenchRelay:
    def __init__(self, folder, provider, config=None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = merge({
            "smtp": {"listen": f"127.0.0.1:{self.port}", "hostname": "relay.bench.example",
                     "max_connections": 2000, "max_connections_per_address": 2000,
                     "max_message_size": "150MB"},
            "sender": {"default": "app@example.com", "allowed": ["*"]},
            "provider": provider,
            "delivery": {"retry": ["1s", "2s"]},
            "database": {"url": f"sqlite:///{self.folder / 'relay.db'}"},
            "admin": {"listen": ""},
        }, config)
        self.log_path = self.folder / "twistd.log"
        self.proc = None

    def start(self, timeout=60):
        path = self.folder / "relay.toml"
        path.write_text(tomlkit.dumps(self.config))
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self._log = open(self.log_path, "ab")
        self.proc = PROCESSES.spawn(
            [TWISTD, "-n", "--pidfile=", "--logfile=-", "smtprelay", "--config", str(path)],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.folder, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if re.search(r"ready: SMTP on ", text):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"the relay exited:\n{text[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"the relay was not ready in {timeout}s:\n{text[-3000:]}")

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        if self.proc is not None:
            PROCESSES.stop(self.proc, timeout=40)
            self._log.close()
            self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def query(self, sql, params=()):
        import sqlite3

        conn = sqlite3.connect(str(self.folder / "relay.db"), timeout=30)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def count(self, status):
        return self.query("SELECT COUNT(*) FROM messages WHERE status = ?", (status,))[0][0]
