"""Hostile providers that repeat what they are sent, for the secret-leak tests.

A careless or hostile server may quote a request back in its error: the relay
then holds its own credentials in a provider's answer, which it logs.  These
servers do exactly that, every time:

- :class:`EchoSMTP`: an SMTP server (no TLS; ``security = "none"``) that offers
  AUTH PLAIN or LOGIN (alternately) and refuses every AUTH quoting each line it
  got, as sent (base64) and decoded;
- :class:`EchoHTTPS`: an HTTPS server for the token endpoints (Entra's and
  Google's) and the APIs: OpenID discovery answered properly (msal needs it),
  every other request answered ``400`` with an OAuth/Graph-shaped error whose
  description is the request line, headers and body, as received.
"""

import base64
import json
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class EchoSMTP:
    def __init__(self):
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self.auth_lines = []
        self._n = 0
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._n += 1
            threading.Thread(target=self._session, args=(conn, self._n % 2), daemon=True).start()

    def _session(self, conn, login):
        f = conn.makefile("rb")

        def say(line):
            conn.sendall(line.encode("utf-8", "replace") + b"\r\n")

        def echo(lines):
            shown = []
            for line in lines:
                try:
                    decoded = base64.b64decode(line.split()[-1], validate=True)
                    decoded = decoded.replace(b"\0", b"^@").decode("utf-8", "replace")
                except Exception:
                    decoded = "?"
                shown.append(f"{line} ({decoded})")
            return "535 5.7.8 Authentication failed; you sent: " + " | ".join(shown)

        try:
            say("220 echo.test ESMTP")
            pending = []
            while True:
                raw = f.readline()
                if not raw:
                    return
                line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
                verb = line.split(" ", 1)[0].upper()
                if pending:
                    pending.append(line)
                    self.auth_lines.append(line)
                    if len(pending) < 3:
                        say("334 UGFzc3dvcmQ6")
                    else:
                        say(echo(pending))
                        pending = []
                elif verb == "EHLO":
                    say("250-echo.test")
                    say("250 AUTH LOGIN" if login else "250 AUTH PLAIN")
                elif verb == "AUTH":
                    self.auth_lines.append(line)
                    if line.upper().startswith("AUTH LOGIN"):
                        pending = [line]
                        say("334 VXNlcm5hbWU6")
                    else:
                        say(echo([line]))
                elif verb == "QUIT":
                    say("221 bye")
                    return
                else:
                    say("503 5.5.1 authenticate first")
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self):
        self._stop = True
        self._sock.close()


class _Echo(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, status, document):
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _echo(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        seen = f"{body} | {self.command} {self.path} {dict(self.headers)}"
        self.server.requests.append(seen)
        self._reply(400, {"error": "invalid_client",
                          "error_description": f"you sent: {seen}",
                          "error_codes": [7000215],
                          "message": f"you sent: {seen}"})

    def do_GET(self):
        if self.path.endswith("/.well-known/openid-configuration"):
            tenant = self.path.split("/")[1]
            base = f"https://127.0.0.1:{self.server.server_port}/{tenant}"
            self._reply(200, {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "issuer": f"{base}/v2.0", "token_endpoint_auth_methods_supported": [
                    "client_secret_post", "private_key_jwt", "client_secret_basic"],
            })
            return
        self._echo()

    do_POST = do_PUT = _echo


class EchoHTTPS:
    def __init__(self, ca):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
        self.server.requests = []
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(ca.server_cert), str(ca.server_key))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_port
        self.url = f"https://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def requests(self):
        return self.server.requests

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
