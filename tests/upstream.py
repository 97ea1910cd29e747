"""Real upstream SMTP servers on loopback, for the SMTP provider's tests.

- ``Upstream``: aiosmtpd in its own thread, with STARTTLS, implicit TLS and
  AUTH (certificates from the test CA), recording every MAIL, AUTH attempt
  and message it sees, and knobs to refuse recipients, answer the end of
  data differently, or drop the connection after the final dot.
- ``SmtpSink``: Postfix's ``smtp-sink`` in a subprocess, dumping each message
  to a file (its dump has LF line ends and a trailing empty line).
- ``silent_listener``: a socket that accepts connections (the kernel does)
  and never says a word.

None of these is a fake of ours: aiosmtpd and smtp-sink are real SMTP servers;
the knobs only choose which of their replies a test gets.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import attr
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from tests.relay import require_tool


@attr.define
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool
    auth: object  # the login name (bytes) or None


class _Handler:
    def __init__(self, upstream: Upstream) -> None:
        self.up = upstream

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.up.users is None:
            # aiosmtpd announces AUTH even without users: this upstream offers none
            responses = [r for r in responses if not r[4:].startswith("AUTH")]
        if self.up.pipelining:
            # aiosmtpd reads one command at a time from its stream, so it copes
            # with pipelined commands; it just does not say so
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        self.up.mail_commands.append((address, self.up.encrypted(session), list(mail_options)))
        reply = self.up.mail_reply(address) if self.up.mail_reply else None
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        self.up.rcpt_commands.append(address)
        reply = self.up.rcpt_reply(address) if self.up.rcpt_reply else None
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        # aiosmtpd calls DATA only after MAIL, and with the content read
        got = Received(cast(str, envelope.mail_from), list(envelope.rcpt_tos),
                       cast(bytes, envelope.original_content),
                       self.up.encrypted(session), getattr(session, "relay_login", None))
        self.up.transports.append(server.transport)
        if self.up.drop_after_dot > 0:
            # the message arrived whole; the connection dies before the reply
            self.up.drop_after_dot -= 1
            self.up.dropped.append(got)
            cast(Any, server.transport).abort()
            await asyncio.sleep(3600)
        if self.up.data_delay:
            await asyncio.sleep(self.up.data_delay)
        reply = self.up.data_reply(got) if self.up.data_reply else None
        if reply and not reply.startswith("2"):
            self.up.refused.append(got)
            return reply
        self.up.messages.append(got)
        return reply or f"250 2.0.0 Ok: queued as Q{len(self.up.messages)}"


class _CountingSMTP(SMTP):
    """aiosmtpd's SMTP, counting the connections open at once."""

    def __init__(self, upstream: Upstream, *args: Any, **kw: Any) -> None:
        self._up = upstream
        super().__init__(*args, **kw)

    def connection_made(self, transport: Any) -> None:
        if self._original_transport is None:  # not the TLS layer STARTTLS adds
            with self._up.lock:
                self._up.connections += 1
                self._up.open_now += 1
                self._up.max_open = max(self._up.max_open, self._up.open_now)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        with self._up.lock:
            self._up.open_now -= 1
        super().connection_lost(exc)


class _Controller(Controller):
    """aiosmtpd's threaded controller on a socket bound beforehand (port 0)."""

    def __init__(self, upstream: Upstream, sock: socket.socket, **kw: Any) -> None:
        self._up = upstream
        self._sock = sock
        super().__init__(_Handler(upstream), hostname="127.0.0.1",
                         port=sock.getsockname()[1], **kw)

    def factory(self) -> _CountingSMTP:
        return _CountingSMTP(self._up, self.handler, **self.SMTP_kwargs)

    def _create_server(self) -> Any:
        return self.loop.create_server(self._factory_invoker, sock=self._sock,
                                       ssl=self.ssl_context)


class Upstream:
    """aiosmtpd on 127.0.0.1 as the relay's upstream.

    ``mode``: "starttls" (STARTTLS offered), "tls" (TLS from the first byte)
    or "none" (no TLS at all).  ``users``: name -> password for AUTH (None:
    no AUTH offered).  ``auth_plaintext``: offer AUTH before STARTTLS too.
    ``cert``: (certificate, key) paths; the CA's localhost pair by default.
    """

    def __init__(self, ca: Any, mode: str = "starttls", users: dict[str, str] | None = None,
                 auth_plaintext: bool = False, cert: tuple[Any, Any] | None = None,
                 exclude_auth: tuple[str, ...] | list[str] = (),
                 data_size_limit: int | None = None, idle_timeout: float = 60,
                 pipelining: bool = False,
                 tls_versions: tuple[ssl.TLSVersion, ssl.TLSVersion] | None = None) -> None:
        self.ca = ca
        self.pipelining = pipelining
        self.mode = mode
        self.users = users
        self.messages: list[Received] = []  # accepted
        self.refused: list[Received] = []  # refused at the end of data
        self.dropped: list[Received] = []  # received whole, connection dropped before the reply
        self.mail_commands: list[tuple[str, bool, list[str]]] = []  # (address, over TLS, options)
        self.rcpt_commands: list[str] = []
        # (mechanism, login, over TLS, succeeded)
        self.auth_attempts: list[tuple[str, bytes | None, bool, bool]] = []
        self.transports: list[Any] = []
        # fn(address) -> reply text or None (accept)
        self.mail_reply: Callable[[str], str | None] | None = None
        self.rcpt_reply: Callable[[str], str | None] | None = None
        # fn(Received) -> reply text or None (250)
        self.data_reply: Callable[[Received], str | None] | None = None
        self.data_delay: float = 0
        self.drop_after_dot = 0
        self.lock = threading.Lock()
        self.connections = 0
        self.open_now = 0
        self.max_open = 0
        cert, key = cert or (ca.server_cert, ca.server_key)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cert), str(key))
        if tls_versions:
            # an old server: only these versions (OpenSSL needs SECLEVEL 0 for < 1.2)
            with warnings.catch_warnings():  # "ssl.TLSVersion.TLSv1 is deprecated": the point
                warnings.simplefilter("ignore", DeprecationWarning)
                context.minimum_version, context.maximum_version = tls_versions
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        kw: dict[str, Any] = dict(server_hostname="upstream.test", timeout=idle_timeout)
        if mode == "starttls":
            kw["tls_context"] = context
        elif mode == "tls":
            kw["ssl_context"] = context
        if users is not None:
            kw["authenticator"] = self._authenticate
            # aiosmtpd knows only STARTTLS as encryption: with TLS from the first
            # byte, "require TLS" would hide AUTH altogether
            kw["auth_require_tls"] = not auth_plaintext and mode != "tls"
            kw["auth_exclude_mechanism"] = list(exclude_auth)
        if data_size_limit is not None:
            kw["data_size_limit"] = data_size_limit
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._controller = _Controller(self, self._sock, **kw)

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                      mechanism: str, data: Any) -> AuthResult:
        login = getattr(data, "login", None)
        users = self.users or {}
        ok = (login is not None and users.get(login.decode()) is not None
              and users[login.decode()].encode() == data.password)
        self.auth_attempts.append((mechanism, login, self.encrypted(session), ok))
        if ok:
            session.relay_login = login  # type: ignore[attr-defined]
        # handled=False: aiosmtpd then answers 535 itself
        return AuthResult(success=ok, handled=False)

    def encrypted(self, session: Session) -> bool:
        # aiosmtpd sets session.ssl after STARTTLS only
        return self.mode == "tls" or session.ssl is not None

    def start(self) -> Upstream:
        self._controller.start()
        # the controller's own probe connection is not a client's
        deadline = time.monotonic() + 5
        while self.open_now and time.monotonic() < deadline:
            time.sleep(0.01)
        with self.lock:
            self.connections = self.max_open = 0
        return self

    def stop(self) -> None:
        self._controller.stop()

    def drop_connections(self) -> None:
        """Abort every connection it served a message on, from its own thread, and wait."""
        done = threading.Event()

        def abort() -> None:
            for t in self.transports:
                t.abort()
            done.set()

        self._controller.loop.call_soon_threadsafe(abort)
        assert done.wait(5)
        time.sleep(0.05)  # let the kernel deliver the RST to the client's socket

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@attr.define
class SinkMessage:
    helo: str
    mail_args: str
    rcpt_args: list[str]
    content: bytes  # as dumped: LF line ends


class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1, each message dumped to ``directory``."""

    def __init__(self, directory: str | os.PathLike[str], *options: str) -> None:
        self.tool = require_tool("smtp-sink")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.options = list(options)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None

    def start(self) -> SmtpSink:
        for _ in range(5):
            self.port = free_port()
            args = [self.tool]
            if os.geteuid() == 0:
                args += ["-u", "root"]  # required when run as root: it drops privileges
            args += self.options + ["-d", f"{self.directory}/%M.", f"127.0.0.1:{self.port}", "100"]
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                    return self
                except OSError:
                    time.sleep(0.02)
            self.stop()
        stderr = self.proc.stderr.read() if self.proc and self.proc.stderr else b""
        raise RuntimeError(f"smtp-sink did not start: {stderr!r}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)

    def messages(self) -> list[SinkMessage]:
        out = []
        for path in sorted(self.directory.iterdir(), key=lambda p: p.stat().st_mtime_ns):
            out.append(parse_sink_dump(path.read_bytes()))
        return out

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parse_sink_dump(data: bytes) -> SinkMessage:
    """An smtp-sink dump -> SinkMessage (its own headers and trailing empty line removed)."""
    helo, mail, rcpts = "", "", list[str]()
    rest = data
    while True:
        line, _, rest = rest.partition(b"\n")
        name, _, value = line.decode("latin-1").partition(": ")
        if name == "X-Helo-Args":
            helo = value
        elif name == "X-Mail-Args":
            mail = value
        elif name == "X-Rcpt-Args":
            rcpts.append(value)
        elif name == "Received":
            # two continuation lines follow
            for _ in range(2):
                _, _, rest = rest.partition(b"\n")
            break
    assert rest.endswith(b"\n\n") or rest == b"\n", rest[-20:]
    return SinkMessage(helo, mail, rcpts, rest[:-1])


def silent_listener() -> socket.socket:
    """A listening socket nobody accepts on: connections succeed, no greeting ever."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s
