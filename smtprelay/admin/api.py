"""The admin REST API and the web page: a Klein application on the relay's reactor.

Every route of ``shared/spec/admin-api.md`` is here, and each is described in
``openapi.py`` (a test keeps the two equal).  Handlers read and steer the
relay only through the store and :class:`~smtprelay.service.RelayService`;
pure work (validation, shapes of answers, warnings, the test message, the
TOML file) lives in the sibling modules.

Conventions: JSON in and out; errors are ``{"error": sentence}`` plus
``"fields"`` for validation problems (400); ``/api/*`` and ``/metrics`` need
the bearer token when one is set; no answer and no log line carries a secret
(the configuration is redacted, exception texts are scrubbed).  A handler is
never cancelled half-way when its client goes away: what it started (a
delivery, a reconfiguration) runs to its end.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Generator
from importlib import resources
from typing import TYPE_CHECKING, Any, cast

import attr
from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from smtprelay import __version__
from smtprelay import config as configuration
from smtprelay.admin import auth, configfile, openapi, shapes, testmail
from smtprelay.admin.monitor import credential_status
from smtprelay.admin.shapes import safe_reason as _reason
from smtprelay.errors import ApplyError, ListenError
from smtprelay.intake import NotStored
from smtprelay.model import Status, new_message_id
from smtprelay.store import DeliveryPage, DeliveryRow

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from smtprelay.service import RelayService

log = Logger()

# what an inlineCallbacks handler is, as a generator
Inline = Generator[Deferred[Any], Any, bytes]
Handler = Callable[..., Any]

JSON = b"application/json; charset=utf-8"
PING_TIMEOUT = 5.0
CHECK_TIMEOUT = 120.0


def error_body(message: str, fields: dict[str, str] | None = None) -> bytes:
    body: dict[str, Any] = {"error": message}
    if fields is not None:
        body["fields"] = fields
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


class ApiError(Exception):
    """An answer other than success: ``code``, a sentence, and per-field problems."""

    def __init__(self, code: int, message: str, fields: dict[str, str] | None = None,
                 headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = fields
        self.headers = headers or {}


def _shield(d: Deferred[Any]) -> Deferred[Any]:
    """``d``'s result, but cancelling the returned Deferred does not cancel ``d``."""
    out: Deferred[Any] = Deferred()

    def passon(result: object) -> None:
        if not out.called:
            out.callback(result)
        return None  # once cancelled, what ``d`` ends with is not anyone's business

    d.addBoth(passon)
    return out


def route(app: Klein, path: str, methods: list[str],
          token: bool = True) -> Callable[[Handler], Handler]:
    """``app.route`` for one handler, with the token check and the origin guard."""

    def wrap(fn: Handler) -> Handler:
        @functools.wraps(fn)
        def handler(self: AdminAPI, request: IRequest, **kw: Any) -> Deferred[Any]:
            if token:
                self.guard(request)
            return _shield(defer.maybeDeferred(fn, self, request, **kw))

        handler.token_required = token  # type: ignore[attr-defined]
        return app.route(path, methods=methods)(handler)

    return wrap


class AdminAPI:
    app = Klein()

    def __init__(self, relay: RelayService, clock: IReactorTime) -> None:
        self.relay = relay
        self.clock = clock
        self._config_lock = defer.DeferredLock()

    # -- plumbing ---------------------------------------------------------------------

    def guard(self, request: IRequest) -> None:
        token = self.relay.config.admin.token
        token_value = token.reveal() if token is not None else ""

        def header(name: str) -> str | None:
            v = request.getHeader(name)
            return v.decode("latin-1") if isinstance(v, bytes) else v

        reason = auth.foreign_request(header("host"), header("origin"),
                                      header("sec-fetch-site"), bool(token_value))
        if reason:
            raise ApiError(403, reason)
        if not auth.token_ok(request.getHeader("authorization"), token_value):
            raise ApiError(401, "unauthorized",
                           headers={b"WWW-Authenticate": b'Bearer realm="smtprelay"'})

    @staticmethod
    def json(request: IRequest, obj: object, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", JSON)
        return json.dumps(obj, ensure_ascii=False).encode("utf-8")

    @staticmethod
    def body(request: IRequest) -> Any:
        data = request.content.read() if request.content is not None else b""
        if not data.strip():
            raise ApiError(400, "the request needs a JSON body", {"": "empty body"})
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, "the body is not valid JSON",
                           {"": str(e).splitlines()[0][:200]}) from None

    @staticmethod
    def query_args(request: IRequest) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for k, values in (request.args or {}).items():
            try:
                out[k.decode("utf-8")] = [v.decode("utf-8") for v in values]
            except UnicodeDecodeError:
                raise ApiError(400, "invalid query", {k.decode("latin-1"): "not UTF-8"}) \
                    from None
        return out

    def now(self) -> float:
        return self.clock.seconds()

    # -- errors -----------------------------------------------------------------------------

    @app.handle_errors(ApiError)
    def api_error(self, request: IRequest, failure: Failure) -> bytes:
        e = cast(ApiError, failure.value)
        request.setResponseCode(e.code)
        for name, value in e.headers.items():
            request.setHeader(name, value)
        request.setHeader(b"Content-Type", JSON)
        return error_body(e.message, e.fields)

    @app.handle_errors(shapes.ValidationError)
    def validation_error(self, request: IRequest, failure: Failure) -> bytes:
        e = cast(shapes.ValidationError, failure.value)
        request.setResponseCode(400)
        request.setHeader(b"Content-Type", JSON)
        return error_body(e.message, e.fields)

    @app.handle_errors(HTTPException)
    def http_error(self, request: IRequest, failure: Failure) -> bytes:
        e = cast(HTTPException, failure.value)
        request.setResponseCode(e.code or 500)
        if isinstance(e, MethodNotAllowed) and e.valid_methods:
            request.setHeader(b"Allow", ", ".join(e.valid_methods).encode("ascii"))
        if e.code and e.code < 400:  # a redirect (a trailing slash)
            for name, value in e.get_response({}).headers:
                if name.lower() == "location":
                    request.setHeader(b"Location", value.encode("utf-8"))
            return b""
        request.setHeader(b"Content-Type", JSON)
        messages = {404: "no such path", 405: "method not allowed for this path"}
        return error_body(messages.get(e.code or 500, e.name.lower()))

    @app.handle_errors(Exception)
    def internal_error(self, request: IRequest, failure: Failure) -> bytes:
        log.error("admin API: {method} {path} failed: {why}",
                  method=request.method.decode("latin-1", "replace"),
                  path=request.path.decode("latin-1", "replace"),
                  why=_reason(cast(BaseException, failure.value), self.relay.config.secrets()))
        request.setResponseCode(500)
        request.setHeader(b"Content-Type", JSON)
        return error_body("internal error; see the relay's log")

    # -- the page -------------------------------------------------------------------------------

    @app.route("/", methods=["GET"])
    def page(self, request: IRequest) -> bytes:
        return self._static(request, "index.html")

    @app.route("/static/<string:name>", methods=["GET"])
    def static(self, request: IRequest, name: str) -> bytes:
        return self._static(request, name)

    _STATIC = re.compile(r"^[a-z0-9_-]+\.(html|js|css|png|svg|ico)$")
    _TYPES = {"html": b"text/html; charset=utf-8", "js": b"text/javascript; charset=utf-8",
              "css": b"text/css; charset=utf-8", "png": b"image/png",
              "svg": b"image/svg+xml", "ico": b"image/x-icon"}

    def _static(self, request: IRequest, name: str) -> bytes:
        if not self._STATIC.match(name):
            raise ApiError(404, "no such file")
        f = resources.files("smtprelay.admin").joinpath("static", name)
        if not f.is_file():
            raise ApiError(404, "no such file")
        request.setHeader(b"Content-Type", self._TYPES[name.rsplit(".", 1)[1]])
        return f.read_bytes()

    # -- health and status -------------------------------------------------------------------------

    @app.route("/healthz", methods=["GET"])
    @defer.inlineCallbacks
    def healthz(self, request: IRequest) -> Inline:
        problem = None
        if not self.relay.smtp_running:
            problem = "SMTP is stopped"
        else:
            try:
                d = defer.maybeDeferred(self.relay.store.ping)
                d.addTimeout(PING_TIMEOUT, self.clock)
                yield d
            except defer.TimeoutError:
                problem = f"the database did not answer within {PING_TIMEOUT:.0f}s"
            except Exception as e:
                problem = f"the database does not answer: {_reason(e, self.relay.config.secrets())}"
        if problem:
            return self.json(request, {"status": "unavailable", "error": problem}, 503)
        return self.json(request, {"status": "ok"})

    @defer.inlineCallbacks
    def status(self) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        relay = self.relay
        cfg = relay.config
        now = self.now()
        found = yield relay.monitor.check()
        try:
            instances = yield relay.store.instances(now)
        except Exception:
            instances = []
        expires, _ = credential_status(relay)
        if relay.smtp_running:
            listen = relay.bound_addresses()
        else:
            listen = [str(a) for a in cfg.smtp.listen + cfg.smtp.tls_listen]
        return {
            "state": "running" if relay.smtp_running else "stopped",
            "version": __version__,
            "started_at": shapes.rfc3339(relay.started_at),
            "uptime_seconds": int(now - relay.started_at) if relay.started_at else 0,
            "listen": listen,
            "admin_listen": relay.admin_address(),
            "smtp_sessions": len(relay.door.sessions),
            "delivery_mode": cfg.delivery.mode,
            "provider": {
                "type": cfg.provider.type,
                "sender_default": cfg.sender.default,
                "credential_expires": shapes.date_text(expires),
                "credential_days_left": shapes.days_left(expires, now),
            },
            "warnings": [w.message for w in found],
            "warning_codes": [w.code for w in found],
            "instance": {"id": relay.store.instance_id},
            "instances": [shapes.instance_json(i, this=i.id == relay.store.instance_id)
                          for i in instances],
        }

    @route(app, "/api/status", ["GET"])
    @defer.inlineCallbacks
    def get_status(self, request: IRequest) -> Generator[Deferred[Any], Any, bytes]:
        status = yield self.status()
        return self.json(request, status)

    @route(app, "/api/stats", ["GET"])
    @defer.inlineCallbacks
    def get_stats(self, request: IRequest) -> Generator[Deferred[Any], Any, bytes]:
        now = self.now()
        stats = yield self.relay.store.stats(now)
        uptime = now - self.relay.started_at if self.relay.started_at else 0
        return self.json(request, shapes.stats_json(stats, uptime))

    # -- the delivery log --------------------------------------------------------------------------

    @route(app, "/api/deliveries", ["GET"])
    @defer.inlineCallbacks
    def list_deliveries(self, request: IRequest) -> Generator[Deferred[Any], Any, bytes]:
        query = shapes.delivery_query(self.query_args(request))
        page: DeliveryPage = yield self.relay.store.deliveries(query)
        provider = self.relay.config.provider.type
        return self.json(request, {"items": [shapes.delivery_json(i, provider)
                                             for i in page.items],
                                   "next": page.next_cursor})

    def _delivery_id(self, delivery_id: str) -> str:
        if not shapes.is_delivery_id(delivery_id):
            raise ApiError(404, "no delivery with this id")
        return delivery_id

    @route(app, "/api/deliveries/<string:delivery_id>", ["GET"])
    @defer.inlineCallbacks
    def get_delivery(self, request: IRequest,
                     delivery_id: str) -> Generator[Deferred[Any], Any, bytes]:
        item: DeliveryRow | None = yield self.relay.store.delivery(self._delivery_id(delivery_id))
        if item is None:
            raise ApiError(404, "no delivery with this id")
        return self.json(request, shapes.delivery_json(item, self.relay.config.provider.type))

    @route(app, "/api/deliveries/<string:delivery_id>/retry", ["POST"])
    @defer.inlineCallbacks
    def retry_delivery(self, request: IRequest,
                       delivery_id: str) -> Generator[Deferred[Any], Any, bytes]:
        delivery_id = self._delivery_id(delivery_id)
        try:
            before = yield self.relay.store.requeue(delivery_id, self.now())
        except ValueError as e:
            raise ApiError(409, str(e)) from None
        if before is None:
            raise ApiError(404, "no delivery with this id")
        log.info("{id} ({status}) queued again by the admin API", id=delivery_id, status=before)
        self.relay.runner.wake()
        item: DeliveryRow | None = yield self.relay.store.delivery(delivery_id)
        if item is None:  # purged in between: as if it had never been there
            raise ApiError(404, "no delivery with this id")
        answer = shapes.delivery_json(item, self.relay.config.provider.type)
        return self.json(request, dict(answer, previous_status=before), 202)

    @route(app, "/api/deliveries/<string:delivery_id>", ["DELETE"])
    @defer.inlineCallbacks
    def cancel_delivery(self, request: IRequest,
                        delivery_id: str) -> Generator[Deferred[Any], Any, bytes]:
        delivery_id = self._delivery_id(delivery_id)
        try:
            before = yield self.relay.store.cancel(delivery_id, self.now(), "cancelled by admin")
        except ValueError as e:
            raise ApiError(409, str(e)) from None
        if before is None:
            raise ApiError(404, "no delivery with this id")
        log.info("{id} ({status}) cancelled by the admin API", id=delivery_id, status=before)
        request.setResponseCode(204)
        return b""

    # -- configuration -----------------------------------------------------------------------------

    def redacted(self, cfg: configuration.Config | None = None) -> Any:
        cfg = cfg or self.relay.config
        return shapes.json_document(configuration.redact(cfg.document))

    @route(app, "/api/config", ["GET"])
    def get_config(self, request: IRequest) -> bytes:
        return self.json(request, self.redacted())

    @route(app, "/api/config", ["PUT"])
    def put_config(self, request: IRequest) -> defer.Deferred[bytes]:
        body = self.body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the configuration must be a JSON object",
                           {"": "expected an object"})
        return self._config_lock.run(self._put_config, request, body)

    @defer.inlineCallbacks
    def _put_config(self, request: IRequest,
                    body: dict[str, Any]) -> Generator[defer.Deferred[Any], Any, bytes]:
        relay = self.relay
        current = relay.config
        if not current.path:
            raise ApiError(409, "the relay was not started from a configuration file")
        document = configuration.unredact(
            shapes.carry_user_passwords(body, current.document), current.document)
        # the secret files, readable paths and key pair are looked at in a thread; the
        # validation itself is pure and runs here
        facts = yield threads.deferToThreadPool(
            relay.reactor, relay.reactor.getThreadPool(),
            configuration.gather, document, os.path.dirname(current.path))
        try:
            new = configuration.parse_document(document, facts,
                                               source=os.path.basename(current.path))
        except configuration.ConfigError as e:
            raise ApiError(400, "the configuration is not valid", e.fields()) from None
        new = attr.evolve(new, path=current.path)
        secrets = current.secrets() + new.secrets()
        try:
            pending = yield threads.deferToThreadPool(
                relay.reactor, relay.reactor.getThreadPool(),
                configfile.prepare, current.path, document)
        except Exception as e:
            raise ApiError(409, f"cannot write the configuration file: {_reason(e, secrets)}") \
                from None
        try:
            yield relay.reconfigure(new, pending)
        except ApplyError as e:
            log.warn("a new configuration was not applied: {why}", why=str(e))
            if e.fields:
                raise ApiError(400, str(e), e.fields) from None
            raise ApiError(409, str(e)) from None
        log.info("the configuration was changed through the admin API and written to {path}",
                 path=current.path)
        return self.json(request, self.redacted(new))

    @route(app, "/api/users/hash-password", ["POST"])
    @defer.inlineCallbacks
    def hash_password(self, request: IRequest) -> Inline:
        from smtprelay.passwords import hash_password

        body = self.body(request)
        password = body.get("password") if isinstance(body, dict) else None
        if not isinstance(password, str) or not password:
            raise ApiError(400, "invalid request", {"password": "required: a non-empty string"})
        if len(password) > 1024:
            raise ApiError(400, "invalid request", {"password": "at most 1024 characters"})
        hashed = yield threads.deferToThreadPool(
            self.relay.reactor, self.relay.reactor.getThreadPool(),
            hash_password, password.encode("utf-8"))
        return self.json(request, {"hash": hashed})

    # -- provider test, test mail ----------------------------------------------------------------

    @route(app, "/api/provider/test", ["POST"])
    @defer.inlineCallbacks
    def provider_test(self, request: IRequest) -> Inline:
        relay = self.relay
        try:
            d = defer.maybeDeferred(relay.provider.check)
            d.addTimeout(CHECK_TIMEOUT, self.clock)
            result = yield d
            answer = result.to_json()
        except Exception as e:
            answer = {"ok": False, "steps": [{
                "name": "check", "ok": False,
                "detail": (f"no answer within {CHECK_TIMEOUT:.0f}s"
                           if isinstance(e, defer.TimeoutError)
                           else _reason(e, relay.config.secrets()))}]}
        secrets = relay.config.secrets()
        for step in answer["steps"]:
            step["detail"] = _reason(step["detail"], secrets) if step["detail"] else ""
        log.info("provider {type} tested through the admin API: {result}",
                 type=relay.config.provider.type, result="ok" if answer["ok"] else "failed")
        return self.json(request, answer)

    @route(app, "/api/test-mail", ["POST"])
    @defer.inlineCallbacks
    def test_mail(self, request: IRequest) -> Inline:
        relay = self.relay
        to, subject = shapes.test_mail_request(self.body(request))
        cfg = relay.config
        sender = cfg.sender.default
        if not sender:
            raise ApiError(409, "sender.default is not set: a test message needs a sender")
        now = self.now()
        message_id = new_message_id(now)
        client = getattr(request.getClientAddress(), "host", "127.0.0.1")
        message = testmail.prepare(message_id, sender, to, subject, cfg.smtp.hostname, client,
                                   cfg.provider.type, now)
        try:
            transition = yield relay.door.intake.test_message(
                testmail.facts(sender, to, client), message)
        except NotStored as e:
            raise ApiError(503, f"the test message could not be stored: {e}") from None
        return self.json(request, {
            "ok": transition.status is Status.SENT,
            "delivery_id": message_id,
            "status": str(transition.status),
            "detail": transition.attempt.detail,
        })

    # -- SMTP on and off -------------------------------------------------------------------

    @route(app, "/api/smtp/start", ["POST"])
    @defer.inlineCallbacks
    def smtp_start(self, request: IRequest) -> Inline:
        if not self.relay.smtp_running:
            try:
                self.relay.start_smtp()
            except ListenError as e:
                raise ApiError(409, str(e)) from None
            log.info("SMTP started through the admin API: listening on {listen}",
                     listen=", ".join(self.relay.bound_addresses()))
        status = yield self.status()
        return self.json(request, status)

    @route(app, "/api/smtp/stop", ["POST"])
    @defer.inlineCallbacks
    def smtp_stop(self, request: IRequest) -> Inline:
        relay = self.relay
        if relay.smtp_running:
            yield relay.close_smtp_listeners()
            log.info("SMTP stopped through the admin API: no new sessions; {n} in progress "
                     "may finish; the queue keeps delivering", n=len(relay.door.sessions))
            drain = relay.drain_smtp_sessions(relay.config.smtp.shutdown_grace)
            drain.addErrback(lambda f: log.failure("closing SMTP sessions failed", f))
        status = yield self.status()
        return self.json(request, status)

    # -- metrics, the API's own description -------------------------------------------------

    @route(app, "/metrics", ["GET"])
    @defer.inlineCallbacks
    def metrics(self, request: IRequest) -> Generator[Deferred[Any], Any, bytes]:
        relay = self.relay
        now = self.now()
        try:
            stats = yield relay.store.stats(now)
        except Exception:
            stats = None
        expires, _ = credential_status(relay)
        relay.metrics.refresh(stats=stats, credential_days=shapes.days_left(expires, now),
                              sessions=len(relay.door.sessions))
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return relay.metrics.render()

    @route(app, "/api/openapi.json", ["GET"])
    def get_openapi(self, request: IRequest) -> bytes:
        return self.json(request, openapi.document())
