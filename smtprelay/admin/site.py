"""The twisted.web Site around the Klein app: request bodies capped, safe headers.

A request body larger than :data:`MAX_BODY` is not kept: it is counted and
discarded, and the request is answered ``413`` once it has arrived (a client
sending far more than that is disconnected).  Every answer carries headers
that keep browsers from sniffing, framing or leaking it; the page's own
Content-Security-Policy allows only this origin's script and style.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.web import server

from smtprelay.admin.api import AdminAPI, error_body

if TYPE_CHECKING:
    # only for the annotation: the service imports this module (lazily)
    from smtprelay.service import RelayService

MAX_BODY = 1_000_000  # bytes of a request body (a configuration is a few KB)
DISCONNECT_AFTER = 16 * MAX_BODY

SECURITY_HEADERS = {
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-store",
    b"Content-Security-Policy": (
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
}


class AdminRequest(server.Request):
    """A Request that refuses oversized bodies instead of buffering them."""

    _body_seen = 0
    too_large = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY:
            self.too_large = True
        super().gotLength(length if not self.too_large else 0)

    def handleContentChunk(self, data: bytes) -> None:
        self._body_seen += len(data)
        if self._body_seen > MAX_BODY:
            self.too_large = True
        if self.too_large:
            if self._body_seen > DISCONNECT_AFTER:
                transport = self.channel.transport
                if transport is not None:
                    transport.loseConnection()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        for name, value in SECURITY_HEADERS.items():
            self.setHeader(name, value)
        if self.too_large:
            channel: Any = self.channel  # its ``site`` is set by Site.buildProtocol
            self.site = channel.site
            self.setResponseCode(413)
            self.setHeader(b"Content-Type", b"application/json")
            self.setHeader(b"Connection", b"close")
            self.write(error_body(f"the request body is larger than {MAX_BODY} bytes"))
            self.finish()
            return
        super().process()


def make_site(relay: RelayService, clock: IReactorTime) -> server.Site:
    site = server.Site(AdminAPI(relay, clock).app.resource())
    site.requestFactory = AdminRequest
    site.noisy = False
    site.displayTracebacks = False
    return site
