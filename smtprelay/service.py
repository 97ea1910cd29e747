"""The relay as a Twisted service: store, provider, queue runner, SMTP listeners, admin site.

``RelayService(config, reactor)`` wires the rooms together; nothing here
parses SMTP or SQL.  Start-up order: the store (schema, instance), then the
queue, then the listeners; shutdown is the reverse, with sessions in
progress allowed ``smtp.shutdown_grace`` to finish their message.

``reconfigure(new_config)`` applies a new configuration without a restart
(the admin API's ``PUT /api/config``): listeners that changed are rebound,
the provider is rebuilt, the front door, queue runner and lockout get the new
settings, and the queue is untouched.  It binds first and switches after, so
a failure (a port in use) leaves the old configuration running.
"""

import socket

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from smtprelay import __version__, logs
from smtprelay.admin.monitor import Monitor
from smtprelay.admin.shapes import safe_reason as _reason
from smtprelay.metrics import Metrics
from smtprelay.providers import make_provider
from smtprelay.queue import QueueRunner
from smtprelay.smtp.auth import Lockout, make_portal
from smtprelay.smtp.server import FrontDoor, RelaySMTPFactory
from smtprelay.store import make_store
from smtprelay.tls import ServerContextFactory

log = Logger()


class ListenError(Exception):
    """A listener could not be bound; the message names the key."""

    def __init__(self, message, key=None):
        super().__init__(message)
        self.key = key


class ApplyError(Exception):
    """A new configuration could not be applied; the old one keeps running.

    ``fields`` (dotted key -> problem) when the problem belongs to a key."""

    def __init__(self, message, fields=None):
        super().__init__(message)
        self.fields = dict(fields or {})


class RelayService(service.MultiService):
    def __init__(self, config, reactor, store=None, provider=None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.clock = reactor
        self.started_at = None
        logs.set_secrets(config.secrets())
        self.store = store or make_store(config.database, reactor, config.provider.type)
        self.provider = provider or make_provider(config, reactor)
        self.metrics = Metrics(config.provider.type, reactor)
        self.lockout = Lockout(reactor, config.smtp.auth.max_failures, config.smtp.auth.lockout)
        self.runner = QueueRunner(self.store, self.provider, config.delivery, reactor,
                                  retention=config.database.retention, metrics=self.metrics,
                                  # a database of its own: claim the next messages ahead
                                  claim_ahead=config.database.kind == "sqlite")
        self.runner.observers.append(self.metrics.outcome)
        self.door = FrontDoor(
            config, self.store, reactor, make_portal(config.smtp.auth.users, reactor),
            self.lockout, tls_context=self._tls_context(config), runner=self.runner,
            metrics=self.metrics,
        )
        self._ports = []
        self.smtp_running = False
        # the admin API (smtprelay.admin), on the same reactor
        self.monitor = Monitor(self, reactor)
        self._admin_port = None
        self._admin_site = None
        self._reconfiguring = defer.DeferredLock()

    @staticmethod
    def _tls_context(config):
        smtp = config.smtp
        if not smtp.tls_enabled:
            return None
        return ServerContextFactory(smtp.tls_certificate, smtp.tls_key, smtp.tls_minimum_version)

    # -- listeners ----------------------------------------------------------------

    def _bind(self):
        smtp = self.config.smtp
        ports = []
        try:
            for address in smtp.listen:
                ports.append(self._listen("smtp.listen", address, RelaySMTPFactory(self.door)))
            for address in smtp.tls_listen:
                factory = RelaySMTPFactory(self.door, implicit_tls=True)
                ports.append(self._listen("smtp.tls_listen", address, factory, tls=True))
        except ListenError:
            for p in ports:
                p.stopListening()
            raise
        return ports

    def _listen(self, key, address, factory, tls=False, context=None):
        from twisted.internet.error import CannotListenError

        try:
            if tls:
                return self.reactor.listenSSL(address.port, factory,
                                              context or self.door.tls_context,
                                              backlog=128, interface=address.interface)
            return self.reactor.listenTCP(address.port, factory, backlog=128,
                                          interface=address.interface)
        except CannotListenError as e:
            reason = e.socketError.strerror if getattr(e.socketError, "strerror", None) else e
            raise ListenError(f"{key}: cannot listen on {address}: {reason}", key) from None

    def bound_addresses(self):
        """"host:port" of every SMTP listener (ports resolved when 0 was asked)."""
        out = []
        for p in self._ports:
            h = p.getHost()
            out.append(f"[{h.host}]:{h.port}" if ":" in h.host else f"{h.host}:{h.port}")
        return out

    def privilegedStartService(self):
        # bind before twistd drops privileges (port 25); a port in use ends start-up
        try:
            self._ports = self._bind()
            self.smtp_running = True
            self._admin_port = self._bind_admin(self.config.admin.listen)
        except ListenError as e:
            import sys

            for p in self._ports:
                p.stopListening()
            sys.stderr.write(f"{self.config.path or 'relay.toml'}: {e}\n")
            raise SystemExit(1)
        super().privilegedStartService()

    # -- life ---------------------------------------------------------------------------

    def startService(self):
        super().startService()
        self.started_at = self.clock.seconds()
        if not self._ports:
            self._ports = self._bind()
            self.smtp_running = True
        if self._admin_port is None:
            self._admin_port = self._bind_admin(self.config.admin.listen)
        d = self._start()
        d.addErrback(self._fatal)

    @defer.inlineCallbacks
    def _start(self):
        # hold connections until the store is ready: they get the greeting late, not 451s
        held = self._ports + ([self._admin_port] if self._admin_port else [])
        for p in held:
            p.stopReading()
        yield self.store.start(self.clock.seconds())
        yield defer.maybeDeferred(self.provider.start)
        self.runner.startService()
        self.monitor.startService()
        for p in held:
            p.startReading()
        log.info("smtprelay {version} ready: SMTP on {listen}, provider {provider}, "
                 "delivery {mode}, instance {instance}",
                 version=__version__, listen=", ".join(self.bound_addresses()),
                 provider=self.config.provider.type, mode=self.config.delivery.mode,
                 instance=self.store.instance_id)

    def _fatal(self, failure):
        log.failure("start-up failed", failure)
        self.reactor.stop()

    @defer.inlineCallbacks
    def stopService(self):
        log.info("stopping: no new SMTP sessions; sessions in progress may finish their message")
        yield self.stop_smtp(grace=self.config.smtp.shutdown_grace)
        if self._admin_port is not None:
            yield defer.maybeDeferred(self._admin_port.stopListening)
            self._admin_port = None
        if self.monitor.running:
            yield self.monitor.stopService()
        if self.runner.running:
            yield self.runner.stopService()
        yield defer.maybeDeferred(self.provider.stop)
        yield self.store.stop(self.clock.seconds())
        yield defer.maybeDeferred(super().stopService)
        log.info("stopped")

    # -- SMTP start/stop (SIGTERM, the admin API) ----------------------------------------------

    @defer.inlineCallbacks
    def stop_smtp(self, grace=30.0):
        if not self.smtp_running:
            return
        yield self.close_smtp_listeners()
        yield self.drain_smtp_sessions(grace)

    def close_smtp_listeners(self):
        """No new SMTP sessions: fires once the listening sockets are closed."""
        self.smtp_running = False
        ports, self._ports = self._ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])

    @defer.inlineCallbacks
    def drain_smtp_sessions(self, grace):
        """Sessions in progress finish their message; after ``grace`` they are closed."""
        self.door.stop_accepting()
        waited = 0.0
        while self.door.sessions and waited < grace and not self.smtp_running:
            yield task.deferLater(self.clock, 0.1, lambda: None)
            waited += 0.1
        if self.door.sessions and not self.smtp_running:
            log.warn("closing {n} SMTP sessions still open after {g:.0f}s",
                     n=len(self.door.sessions), g=grace)
            self.door.force_close()

    def start_smtp(self):
        if self.smtp_running:
            return
        self._ports = self._bind()
        self.door.accepting = True
        self.smtp_running = True

    # -- the admin API: its listener, and applying a new configuration ----------------------

    @property
    def admin_site(self):
        if self._admin_site is None:
            from smtprelay.admin.site import make_site

            self._admin_site = make_site(self, self.reactor)
        return self._admin_site

    def _bind_admin(self, address):
        """Listen for the admin API on ``address`` (None: disabled) -> the port."""
        if address is None:
            return None
        port = self._listen("admin.listen", address, self.admin_site)
        log.info("admin API on {address}", address=_host_port(port))
        return port

    def admin_address(self):
        return _host_port(self._admin_port) if self._admin_port is not None else None

    @staticmethod
    def _smtp_specs(config):
        return ([("smtp.listen", a, False) for a in config.smtp.listen]
                + [("smtp.tls_listen", a, True) for a in config.smtp.tls_listen])

    def _bind_specs(self, specs, context):
        """Bind SMTP listeners, paused (not accepting yet) -> {spec: port}.
        On failure nothing stays bound; raises ListenError."""
        ports = {}
        try:
            for spec in specs:
                key, address, tls = spec
                factory = RelaySMTPFactory(self.door, implicit_tls=tls)
                ports[spec] = self._listen(key, address, factory, tls=tls, context=context)
                ports[spec].stopReading()
        except ListenError as e:
            e.spec = spec
            for p in ports.values():
                p.stopListening()
            raise
        return ports

    def reconfigure(self, new, pending_write=None):
        """Apply ``new`` (a Config) without a restart -> Deferred; ApplyError when it
        cannot be applied, and then the old configuration keeps running.

        ``pending_write`` (with blocking ``commit()``/``abort()``) puts the new file
        in place once everything is bound, before anything is switched.
        """
        return self._reconfiguring.run(self._reconfigure, new, pending_write)

    @defer.inlineCallbacks
    def _reconfigure(self, new, pending_write):
        from twisted.internet.threads import deferToThreadPool

        old = self.config
        secrets = old.secrets() + new.secrets()
        if new.database.url != old.database.url:
            raise ApplyError("the database cannot be changed while the relay runs", {
                "database.url": "cannot be changed while the relay runs: edit the "
                                "configuration file and restart"})
        smtp_o, smtp_n = old.smtp, new.smtp
        tls_changed = ((smtp_o.tls_certificate, smtp_o.tls_key, smtp_o.tls_minimum_version)
                       != (smtp_n.tls_certificate, smtp_n.tls_key, smtp_n.tls_minimum_version))
        context = self.door.tls_context
        provider = None
        try:
            if tls_changed:
                context = self._tls_context(new)
            if _provider_changed(old, new):
                provider = make_provider(new, self.reactor)
        except Exception as e:
            raise ApplyError(f"the new configuration cannot be set up: {_reason(e, secrets)}")

        # bind what is new (paused) before anything is switched
        have = list(zip(self._smtp_specs(old), self._ports)) if self.smtp_running else []
        want = self._smtp_specs(new)
        keep = {spec: port for spec, port in have
                if spec in want and not (spec[2] and tls_changed)}
        remove = [(spec, port) for spec, port in have if spec not in keep]
        add = [spec for spec in want if spec not in keep]
        released, added, admin_port = [], {}, None
        try:
            try:
                added = self._bind_specs(add, context)
            except ListenError as e:
                # the new address may be one that a listener about to go still holds
                port_number = e.spec[1].port
                if not any(p.getHost().port == port_number for _, p in remove):
                    raise
                released = [(spec, port.getHost()) for spec, port in remove]
                yield defer.gatherResults([defer.maybeDeferred(p.stopListening)
                                           for _, p in remove])
                added = self._bind_specs(add, context)
            if new.admin.listen != old.admin.listen and new.admin.listen is not None:
                admin_port = self._bind_admin(new.admin.listen)
                admin_port.stopReading()
            if pending_write is not None:
                pool = self.reactor.getThreadPool()
                try:
                    yield deferToThreadPool(self.reactor, pool, pending_write.commit)
                except Exception as e:
                    raise ApplyError("cannot write the configuration file: "
                                     f"{_reason(e, secrets)}") from None
        except (ListenError, ApplyError) as e:
            for p in added.values():
                p.stopListening()
            if admin_port is not None:
                admin_port.stopListening()
            if released:
                self._restore(released, remove, keep, want=self._smtp_specs(old))
            if provider is not None:
                defer.maybeDeferred(provider.stop).addErrback(lambda f: None)
            if pending_write is not None:
                pending_write.abort()
            if isinstance(e, ListenError):
                raise ApplyError(str(e), {e.key: str(e).partition(": ")[2]} if e.key else None)
            raise

        # switch: from here on nothing can fail for the configuration's sake
        self.config = new
        logs.set_secrets(new.secrets())
        door = self.door
        door.config = new
        door.hostname = smtp_n.hostname
        door.tls_context = context
        door.portal = make_portal(smtp_n.auth.users, self.reactor)
        self.lockout.max_failures = smtp_n.auth.max_failures
        self.lockout.window = smtp_n.auth.lockout
        self.runner.delivery = new.delivery
        self.runner.limiter.concurrency = new.delivery.concurrency
        self.runner.retention = new.database.retention
        if provider is not None:
            self._switch_provider(provider)
        if self.smtp_running:
            self._ports = [keep.get(spec) or added[spec] for spec in want]
            for p in added.values():
                p.startReading()
            if not released:
                for _, p in remove:
                    p.stopListening()
        else:
            for p in added.values():  # only a test that the addresses are free
                p.stopListening()
        if new.admin.listen != old.admin.listen:
            if self._admin_port is not None:
                # the request that asked for this is answered on its own connection
                self._admin_port.stopListening()
            self._admin_port = admin_port
            if admin_port is not None:
                admin_port.startReading()
        log.info("configuration applied: SMTP on {listen}, provider {provider}",
                 listen=", ".join(str(a) for a in smtp_n.listen + smtp_n.tls_listen),
                 provider=new.provider.type)

    def _restore(self, released, remove, keep, want):
        """Put back SMTP listeners released for a reconfiguration that failed."""
        from smtprelay.config import ListenAddress

        restored = {}
        for spec, host in released:
            key, address, tls = spec
            actual = ListenAddress(address.host, host.port)
            try:
                restored[spec] = self._bind_specs([(key, actual, tls)], None)[(key, actual, tls)]
                restored[spec].startReading()
            except ListenError as e:
                log.error("could not listen again after a failed reconfiguration: {why}", why=e)
        self._ports = [p for p in (keep.get(spec) or restored.get(spec) for spec in want) if p]

    def _switch_provider(self, provider):
        old = self.provider
        self.provider = provider
        self.runner.provider = provider
        self.metrics.provider_type = provider.type
        defer.maybeDeferred(provider.start).addErrback(
            lambda f: log.warn("starting the {type} provider failed: {why}",
                               type=provider.type, why=_reason(f.value, self.config.secrets())))
        # the old provider stops once the deliveries that may be using it are done
        calls = [_settled(d) for d in list(self.runner._in_flight.values())]
        done = defer.DeferredList(calls)
        done.addCallback(lambda _: defer.maybeDeferred(old.stop))
        done.addErrback(lambda f: log.warn("stopping the old provider failed: {why}",
                                           why=f.getErrorMessage()))


def hostname():
    return socket.getfqdn()


def _settled(d):
    """A Deferred that fires (with None) when ``d`` does, leaving ``d``'s result alone."""
    out = defer.Deferred()

    def fire(result):
        if not out.called:
            out.callback(None)
        return result

    d.addBoth(fire)
    return out


def _provider_changed(old, new):
    """Does the provider need rebuilding?  (Secret values compare too: ``Secret``
    equality ignores the value.)"""
    from smtprelay.config import _walk_secrets

    def shape(c):
        return (c.provider, c.sender, c.smtp.hostname, c.delivery, c.monitoring,
                [s.reveal() for s in _walk_secrets(c.provider)])

    return shape(old) != shape(new)


def _host_port(port):
    h = port.getHost()
    return f"[{h.host}]:{h.port}" if ":" in h.host else f"{h.host}:{h.port}"
