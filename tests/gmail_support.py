"""Shared by the Gmail end-to-end tests: the fake Google process and its control API.

``FakeGoogleProcess`` runs ``python -m tests.fakes.gmail`` (token endpoint and
Gmail API, over HTTPS with the test CA) on a free port and steers it through its
``/_fake/`` control API.
"""

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.relay import REPO


class FakeGoogleProcess:
    """``python -m tests.fakes.gmail`` on a free port, and its control API."""

    def __init__(self, ca_dir, log_path):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.gmail", "--port", "0", "--ca-dir", str(ca_dir)],
            stdout=subprocess.PIPE, stderr=self._log, cwd=REPO, env=env)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fake did not start: {Path(log_path).read_text()}")
        self.port = json.loads(line)["port"]
        self.url = f"https://127.0.0.1:{self.port}"
        self.token_uri = self.url + "/token"
        self.http = requests.Session()
        self.http.verify = str(Path(ca_dir) / "ca.pem")

    def control(self, method, name, payload=None, **params):
        response = self.http.request(method, f"{self.url}/_fake/{name}", json=payload,
                                     params=params, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def messages(self, bodies=True):
        out = self.control("GET", "messages", bodies="1" if bodies else "0")["messages"]
        for m in out:
            for key in ("raw", "delivered"):
                if m.get(key) is not None:
                    m[key] = base64.b64decode(m[key])
        return out

    def wait_messages(self, count, timeout=30, bodies=True, relay=None):
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages(bodies=bodies)
            if len(found) >= count or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(found) >= count, (f"{len(found)} of {count} messages arrived\n"
                                     + (relay.log()[-4000:] if relay else ""))
        return found

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self._log.close()
        self.http.close()
