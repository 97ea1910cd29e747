"""A TCP proxy that misbehaves on request, between the relay and its provider.

The relay talks to ``127.0.0.1:proxy.port`` as if it were the provider (an
upstream SMTP server, the Graph fake, the Google fake); the proxy forwards the
bytes both ways, untouched, until a test scripts a fault:

- ``proxy.refuse()`` / ``proxy.accept()``: nothing listens on the port
  (connections are refused by the kernel), then it listens again;
- ``proxy.arm(*modes)``: the current connections are reset (a pooled
  connection is not spared) and the next connections, one mode each, get:

  ``"close"``          accepted, then closed at once (a TLS handshake sees EOF)
  ``"garbage"``        accepted, answered with bytes that are not TLS nor SMTP, closed
  ``"reset"``          accepted, then reset (RST)
  ``"hang"``           accepted, read, never answered (until the proxy stops)
  ``("reset_after", n)``  forwarded until the client has sent ``n`` bytes, then
                       reset both ways: mid-request, mid-body
  ``"abort_tls"``      forwarded until the client starts a TLS handshake (also
                       after STARTTLS), then both sides are closed
  ``("slow", s)``      the server's bytes are held back ``s`` seconds first
  ``"pass"``           forwarded as is

``proxy.injected`` counts the connections each fault was applied to (and
``"refused"`` the time the proxy was not listening).  Threads only; nothing
here is a fake of a provider: what is behind the proxy is.
"""

import collections
import select
import socket
import struct
import threading
import time

GARBAGE = b"HTTP/1.0 418 not what you expected\r\n\r\n\x00\xff\x00\xff" * 4


def _rst(sock):
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _close(sock)


def _close(sock):
    try:
        sock.close()
    except OSError:
        pass


class _Link:
    """One client connection and its upstream, served by one thread (``select``): a
    socket is only ever closed by the thread that reads it, so a close takes effect
    at once (closing a socket another thread is blocked on sends nothing)."""

    def __init__(self, proxy, client, mode):
        self.proxy = proxy
        self.client = client
        self.mode = mode
        self.upstream = None
        self.sent = 0  # bytes from the client
        self.dead = threading.Event()  # set by arm(): reset both ways

    def kill(self):
        self.dead.set()

    def _finish(self, reset):
        for sock in (self.client, self.upstream):
            if sock is not None:
                (_rst if reset else _close)(sock)

    def run(self):
        mode, arg = (self.mode if isinstance(self.mode, tuple) else (self.mode, None))
        reset = True
        try:
            if mode == "close":
                reset = False
                return
            if mode == "reset":
                return
            if mode == "garbage":
                self.client.sendall(GARBAGE)
                reset = False
                return
            if mode != "hang":
                self.upstream = socket.create_connection(self.proxy.target, timeout=10)
            reset = self._serve(mode, arg)
        except OSError:
            pass
        finally:
            self._finish(reset)
            self.proxy._forget(self)

    def _serve(self, mode, arg):
        """Forward (or, for "hang", swallow) until one side ends -> reset the other?"""
        started = time.monotonic()
        held = []  # the server's bytes held back ("slow")
        sockets = [self.client] if self.upstream is None else [self.client, self.upstream]
        while not self.dead.is_set() and not self.proxy.stopped.is_set():
            if held and time.monotonic() - started >= arg:
                self.client.sendall(b"".join(held))
                held = []
            readable, _, _ = select.select(sockets, [], [], 0.05)
            if self.client in readable:
                data = self.client.recv(65536)
                if not data:
                    return False  # the client closed: close the upstream too
                if mode == "hang":
                    continue
                if mode == "abort_tls" and data[:2] == b"\x16\x03":
                    return False  # a ClientHello: close both before the server sees it
                if mode == "reset_after" and self.sent + len(data) >= arg:
                    keep = arg - self.sent
                    if keep > 0:
                        self.upstream.sendall(data[:keep])
                    self.sent += len(data)
                    return True
                self.upstream.sendall(data)
                self.sent += len(data)
            if self.upstream is not None and self.upstream in readable:
                data = self.upstream.recv(65536)
                if not data:
                    if held:
                        self.client.sendall(b"".join(held))
                    return False
                if mode == "slow" and (held or time.monotonic() - started < arg):
                    held.append(data)
                else:
                    self.client.sendall(data)
        return True


class FaultProxy:
    def __init__(self, target_port, target_host="127.0.0.1"):
        self.target = (target_host, target_port)
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.script = collections.deque()
        self.links = set()
        self.injected = collections.Counter()
        self.connections = 0
        self.refusals = 0
        self.port = 0
        self._refused_at = None
        self._listener = None
        self._listen()

    # -- listening ---------------------------------------------------------------------

    def _listen(self):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        self.port = s.getsockname()[1]
        self._listener = s
        threading.Thread(target=self._accept_loop, args=(s,), daemon=True).start()

    def _accept_loop(self, listener):
        while not self.stopped.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self.lock:
                mode = self.script.popleft() if self.script else "pass"
                self.connections += 1
                if mode != "pass":
                    self.injected[mode if isinstance(mode, str) else mode[0]] += 1
                link = _Link(self, client, mode)
                self.links.add(link)
            threading.Thread(target=link.run, daemon=True).start()

    def _forget(self, link):
        with self.lock:
            self.links.discard(link)

    # -- faults ------------------------------------------------------------------------

    def arm(self, *modes):
        """Reset every current connection; the next connections get ``modes``, in order.

        Returns once the resets are out (and a moment more, for the client to see
        them: a pooled connection reused before its reset arrives is a fault of
        another kind, a request that may or may not have been read)."""
        with self.lock:
            self.script.extend(modes)
            links = list(self.links)
        for link in links:
            link.kill()
        deadline = time.monotonic() + 5
        while links and time.monotonic() < deadline:
            with self.lock:
                links = [link for link in links if link in self.links]
            time.sleep(0.01)
        time.sleep(0.2 if links or modes else 0)

    def disarm(self):
        with self.lock:
            left = len(self.script)
            self.script.clear()
        return left

    def cut(self):
        """Reset every current connection (nothing scripted)."""
        self.arm()

    def refuse(self):
        """Stop listening: connecting is refused until :meth:`accept`."""
        if self._listener is not None:
            _close(self._listener)
            self._listener = None
            self._refused_at = time.monotonic()
            self.refusals += 1
        self.cut()

    def accept(self):
        if self._listener is None:
            self.injected["refused (seconds)"] += round(time.monotonic() - self._refused_at)
            self._listen()

    def stop(self):
        self.stopped.set()
        if self._listener is not None:
            _close(self._listener)
        self.cut()

    @property
    def faults(self):
        """How many faults were applied (refusals count once per refusal period)."""
        return sum(n for k, n in self.injected.items() if k != "refused (seconds)") + \
            self.refusals

    def refuse_for(self, seconds):
        """Refuse connections for ``seconds`` (in the background)."""
        self.refuse()
        timer = threading.Timer(seconds, self.accept)
        timer.daemon = True
        timer.start()
        return timer

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
