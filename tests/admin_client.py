"""A small blocking HTTP client for the admin API (http.client over loopback)."""

import http.client
import json as jsonlib
import time


class Answer:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    @property
    def json(self):
        return jsonlib.loads(self.body) if self.body else None

    def __repr__(self):
        return f"<Answer {self.status} {self.body[:300]!r}>"


class AdminClient:
    def __init__(self, port, token=None, host="127.0.0.1"):
        self.port = port
        self.token = token
        self.host = host
        self.answers = []  # every answer, for leak checks

    def call(self, method, path, body=None, token=..., headers=None, raw=None, timeout=90):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        hdrs = {"Accept": "application/json"}
        token = self.token if token is ... else token
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        data = raw
        if body is not None:
            data = jsonlib.dumps(body).encode("utf-8")
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            answer = Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()},
                            resp.read())
        finally:
            conn.close()
        self.answers.append(answer)
        return answer

    def get(self, path, **kw):
        return self.call("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.call("POST", path, body, **kw)

    def put(self, path, body=None, **kw):
        return self.call("PUT", path, body, **kw)

    def delete(self, path, **kw):
        return self.call("DELETE", path, **kw)

    def ok(self, method, path, body=None, status=200, **kw):
        """The JSON of an answer that must have ``status``."""
        a = self.call(method, path, body, **kw)
        assert a.status == status, (method, path, a)
        return a.json

    def wait(self, predicate, timeout=20, step=0.05):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            time.sleep(step)
