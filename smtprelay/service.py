"""The relay as a Twisted service: store, provider, queue runner, SMTP listeners, admin site.

``RelayService(config, reactor)`` wires the rooms together; nothing here
parses SMTP or SQL.  Start-up order: the store (schema, instance), then the
queue, then the listeners; shutdown is the reverse, with sessions in
progress allowed ``smtp.shutdown_grace`` to finish their message.

``reconfigure(new_config)`` applies a new configuration without a restart
(the admin API's ``PUT /api/config``): listeners that changed are rebound,
the provider is rebuilt, the front door, queue runner and lockout get the new
settings, and the queue is untouched.  It binds first and switches after, so
a failure (a port in use) leaves the old configuration running.  The service
only sequences a change (prepare, bind paused, write the file, switch, swap
listeners); each room's ``apply`` knows what of the configuration is its own.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, cast

import attr
from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.internet.tcp import Port
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from smtprelay import __version__, scrub
from smtprelay.admin.monitor import Monitor
from smtprelay.admin.shapes import safe_reason as _reason
from smtprelay.config import Config, ListenAddress, secrets_in
from smtprelay.errors import ApplyError, ListenError
from smtprelay.metrics import Metrics
from smtprelay.providers import make_provider
from smtprelay.providers.base import IProvider
from smtprelay.queue import QueueRunner
from smtprelay.smtp.auth import Lockout, make_portal
from smtprelay.smtp.server import FrontDoor, RelaySMTPFactory
from smtprelay.store import make_store
from smtprelay.store.interface import IStore
from smtprelay.tls import ServerContextFactory

if TYPE_CHECKING:
    from smtprelay.admin.configfile import PendingWrite

__all__ = ["RelayService", "hostname"]

log = Logger()

# The reactor: TCP, SSL, time and threads in one object, which no single
# Twisted interface describes.
Reactor = Any
# An SMTP listener: (configuration key, address, implicit TLS)
Spec = tuple[str, ListenAddress, bool]


class RelayService(service.MultiService):
    def __init__(self, config: Config, reactor: Reactor, store: IStore | None = None,
                 provider: IProvider | None = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.clock = reactor
        self.started_at: float | None = None
        scrub.set_secrets(config.secrets())
        self.store: IStore = store if store is not None else \
            make_store(config.database, reactor)
        self.provider: IProvider = provider if provider is not None else \
            make_provider(config, reactor)
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
        self._ports: list[Port] = []
        self.smtp_running = False
        # the admin API (smtprelay.admin), on the same reactor
        self.monitor = Monitor(self, reactor)
        self._admin_port: Port | None = None
        self._admin_site: Site | None = None
        self._reconfiguring = defer.DeferredLock()

    @staticmethod
    def _tls_context(config: Config) -> ServerContextFactory | None:
        smtp = config.smtp
        if not smtp.tls_enabled:
            return None
        return ServerContextFactory(smtp.tls_certificate, smtp.tls_key, smtp.tls_minimum_version)

    # -- listeners ----------------------------------------------------------------

    def _bind(self) -> list[Port]:
        smtp = self.config.smtp
        ports: list[Port] = []
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

    def _listen(self, key: str, address: ListenAddress, factory: Any, tls: bool = False,
                context: ServerContextFactory | None = None) -> Port:
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

    def bound_addresses(self) -> list[str]:
        """"host:port" of every SMTP listener (ports resolved when 0 was asked)."""
        out = []
        for p in self._ports:
            h = p.getHost()
            out.append(f"[{h.host}]:{h.port}" if ":" in h.host else f"{h.host}:{h.port}")
        return out

    def privilegedStartService(self) -> None:
        # bind before twistd drops privileges (port 25); a port in use ends start-up
        try:
            self._ports = self._bind()
            self.smtp_running = True
            self._admin_port = self._bind_admin(self.config.admin.listen)
        except ListenError as e:
            for p in self._ports:
                p.stopListening()
            sys.stderr.write(f"{self.config.path or 'relay.toml'}: {e}\n")
            raise SystemExit(1) from None
        super().privilegedStartService()

    # -- life ---------------------------------------------------------------------------

    def startService(self) -> None:
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
    def _start(self) -> Generator[Any, Any, None]:
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

    def _fatal(self, failure: Failure) -> None:
        log.failure("start-up failed", failure)
        self.reactor.stop()

    @defer.inlineCallbacks
    def stopService(self) -> Generator[Any, Any, None]:
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
    def stop_smtp(self, grace: float = 30.0) -> Generator[Any, Any, None]:
        if not self.smtp_running:
            return
        yield self.close_smtp_listeners()
        yield self.drain_smtp_sessions(grace)

    def close_smtp_listeners(self) -> defer.Deferred[Any]:
        """No new SMTP sessions: fires once the listening sockets are closed."""
        self.smtp_running = False
        ports, self._ports = self._ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])

    @defer.inlineCallbacks
    def drain_smtp_sessions(self, grace: float) -> Generator[Any, Any, None]:
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

    def start_smtp(self) -> None:
        if self.smtp_running:
            return
        self._ports = self._bind()
        self.door.accepting = True
        self.smtp_running = True

    # -- the admin API: its listener, and applying a new configuration ----------------------

    @property
    def admin_site(self) -> Site:
        if self._admin_site is None:
            from smtprelay.admin.site import make_site

            self._admin_site = make_site(self, self.reactor)
        return self._admin_site

    def _bind_admin(self, address: ListenAddress | None) -> Port | None:
        """Listen for the admin API on ``address`` (None: disabled) -> the port."""
        if address is None:
            return None
        port = self._listen("admin.listen", address, self.admin_site)
        log.info("admin API on {address}", address=_host_port(port))
        return port

    def admin_address(self) -> str | None:
        return _host_port(self._admin_port) if self._admin_port is not None else None

    @staticmethod
    def _smtp_specs(config: Config) -> list[Spec]:
        return ([("smtp.listen", a, False) for a in config.smtp.listen]
                + [("smtp.tls_listen", a, True) for a in config.smtp.tls_listen])

    def _bind_specs(self, specs: list[Spec], context: ServerContextFactory | None
                    ) -> dict[Spec, Port]:
        """Bind SMTP listeners, paused (not accepting yet) -> {spec: port}.
        On failure nothing stays bound; raises ListenError."""
        ports: dict[Spec, Port] = {}
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

    def reconfigure(self, new: Config, pending_write: PendingWrite | None = None
                    ) -> defer.Deferred[None]:
        """Apply ``new`` (a Config) without a restart -> Deferred; ApplyError when it
        cannot be applied, and then the old configuration keeps running.

        ``pending_write`` (with blocking ``commit()``/``abort()``) puts the new file
        in place once everything is bound, before anything is switched.
        """
        return self._reconfiguring.run(self._reconfigure, new, pending_write)

    @defer.inlineCallbacks
    def _reconfigure(self, new: Config, pending_write: PendingWrite | None
                     ) -> Generator[Any, Any, None]:
        # prepare, bind (paused), write the file; then switch the rooms and the listeners
        _refuse_unchangeable(self.config, new)
        context = self.door.tls_context
        if _tls_changed(self.config, new):
            context = yield self._new_tls_context(new)
        change = self._prepare(new, context)
        try:
            yield self._bind_new(change)
            if pending_write is not None:
                yield self._write(pending_write, change.secrets)
        except (ListenError, ApplyError) as e:
            self._undo(change, pending_write)
            if isinstance(e, ListenError):
                raise _apply_error(e) from e
            raise
        # from here on nothing can fail for the configuration's sake
        self._switch(change)
        self._swap_listeners(change)
        smtp = new.smtp
        log.info("configuration applied: SMTP on {listen}, provider {provider}",
                 listen=", ".join(str(a) for a in smtp.listen + smtp.tls_listen),
                 provider=new.provider.type)

    @defer.inlineCallbacks
    def _new_tls_context(self, new: Config
                         ) -> Generator[Any, Any, ServerContextFactory | None]:
        """The TLS context for ``new``, built on a thread (it reads the certificate and
        key files); ApplyError when it cannot be built."""
        try:
            context = yield deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                              self._tls_context, new)
        except Exception as e:
            raise ApplyError("the new configuration cannot be set up: "
                             f"{_reason(e, self.config.secrets() + new.secrets())}") from None
        return context

    def _prepare(self, new: Config, context: ServerContextFactory | None) -> _Change:
        """What ``new`` needs, built and planned before anything is bound -> the change;
        ApplyError when it cannot be set up (and nothing has changed).  ``context`` is
        the TLS context for new sessions (built already when TLS changed)."""
        old = self.config
        secrets = old.secrets() + new.secrets()
        change = _Change(old, new, secrets, tls_changed=_tls_changed(old, new),
                         context=context)
        try:
            if _provider_changed(old, new):
                change.provider = make_provider(new, self.reactor)
        except Exception as e:
            raise ApplyError(
                f"the new configuration cannot be set up: {_reason(e, secrets)}") from None
        self._plan_listeners(change)
        return change

    def _plan_listeners(self, change: _Change) -> None:
        """Which SMTP listeners stay, go and are new (a TLS one is new with new TLS)."""
        have = list(zip(self._smtp_specs(change.old), self._ports)) if self.smtp_running else []
        change.want = self._smtp_specs(change.new)
        change.keep = {spec: port for spec, port in have
                       if spec in change.want and not (spec[2] and change.tls_changed)}
        change.remove = [(spec, port) for spec, port in have if spec not in change.keep]
        change.add = [spec for spec in change.want if spec not in change.keep]

    @defer.inlineCallbacks
    def _bind_new(self, change: _Change) -> Generator[Any, Any, None]:
        """Bind what is new, paused, before anything is switched; raises ListenError."""
        try:
            change.added = self._bind_specs(change.add, change.context)
        except ListenError as e:
            # the new address may be one that a listener about to go still holds
            port_number = e.spec[1].port if e.spec is not None else None
            if not any(p.getHost().port == port_number for _, p in change.remove):
                raise
            change.released = [(spec, port.getHost()) for spec, port in change.remove]
            yield defer.gatherResults([defer.maybeDeferred(p.stopListening)
                                       for _, p in change.remove])
            change.added = self._bind_specs(change.add, change.context)
        if change.admin_changed and change.new.admin.listen is not None:
            change.admin_port = self._bind_admin(change.new.admin.listen)
            if change.admin_port is not None:
                change.admin_port.stopReading()

    @defer.inlineCallbacks
    def _write(self, pending_write: PendingWrite, secrets: list[str]
               ) -> Generator[Any, Any, None]:
        """Put the new configuration file in place (on a thread: it blocks)."""
        pool = self.reactor.getThreadPool()
        try:
            yield deferToThreadPool(self.reactor, pool, pending_write.commit)
        except Exception as e:
            raise ApplyError("cannot write the configuration file: "
                             f"{_reason(e, secrets)}") from None

    def _undo(self, change: _Change, pending_write: PendingWrite | None) -> None:
        """A change that failed before the switch: give back what it took."""
        for p in change.added.values():
            p.stopListening()
        if change.admin_port is not None:
            change.admin_port.stopListening()
        if change.released:
            self._restore(change.released, change.remove, change.keep,
                          want=self._smtp_specs(change.old))
        if change.provider is not None:
            defer.maybeDeferred(change.provider.stop).addErrback(lambda f: None)
        if pending_write is not None:
            pending_write.abort()

    def _switch(self, change: _Change) -> None:
        """Every room takes its part of the new configuration."""
        new = change.new
        self.config = new
        scrub.set_secrets(new.secrets())
        self.door.apply(new, change.context, make_portal(new.smtp.auth.users, self.reactor))
        self.lockout.apply(new.smtp.auth)
        self.runner.apply(new)
        if change.provider is not None:
            self._switch_provider(change.provider)

    def _swap_listeners(self, change: _Change) -> None:
        """The new listeners start accepting; those that went are closed."""
        if self.smtp_running:
            self._ports = [change.keep.get(spec) or change.added[spec] for spec in change.want]
            for p in change.added.values():
                p.startReading()
            if not change.released:
                for _, p in change.remove:
                    p.stopListening()
        else:
            for p in change.added.values():  # only a test that the addresses are free
                p.stopListening()
        if change.admin_changed:
            if self._admin_port is not None:
                # the request that asked for this is answered on its own connection
                self._admin_port.stopListening()
            self._admin_port = change.admin_port
            if change.admin_port is not None:
                change.admin_port.startReading()

    def _restore(self, released: list[tuple[Spec, Any]], remove: list[tuple[Spec, Port]],
                 keep: dict[Spec, Port], want: list[Spec]) -> None:
        """Put back SMTP listeners released for a reconfiguration that failed."""
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

    def _switch_provider(self, provider: IProvider) -> None:
        self.provider = provider
        # fires with the old provider once the deliveries that may be using it are done
        settled = self.runner.switch_provider(provider)
        self.metrics.provider_type = provider.type

        def start_failed(f: Failure) -> None:
            log.warn("starting the {type} provider failed: {why}",
                     type=provider.type,
                     why=_reason(cast(BaseException, f.value), self.config.secrets()))

        defer.maybeDeferred(provider.start).addErrback(start_failed)
        settled.addCallback(lambda old: defer.maybeDeferred(old.stop))
        settled.addErrback(lambda f: log.warn("stopping the old provider failed: {why}",
                                              why=f.getErrorMessage()))


@attr.define
class _Change:
    """One reconfiguration under way: what was built and bound for it, so that a
    failure gives back exactly what it took and a success switches to it."""

    old: Config
    new: Config
    secrets: list[str]
    tls_changed: bool
    context: ServerContextFactory | None  # for new sessions and new TLS listeners
    provider: IProvider | None = None  # rebuilt for the new configuration
    want: list[Spec] = attr.Factory(list)  # the SMTP listeners of the new configuration
    keep: dict[Spec, Port] = attr.Factory(dict)  # running, and staying as they are
    remove: list[tuple[Spec, Port]] = attr.Factory(list)  # running, and going
    add: list[Spec] = attr.Factory(list)  # to be bound
    added: dict[Spec, Port] = attr.Factory(dict)  # bound for the change, paused
    released: list[tuple[Spec, Any]] = attr.Factory(list)  # (spec, address) closed early
    admin_port: Port | None = None  # the admin API's new listener, paused

    @property
    def admin_changed(self) -> bool:
        return self.new.admin.listen != self.old.admin.listen


def _apply_error(e: ListenError) -> ApplyError:
    """The ApplyError for a listener that could not be bound (its key, if known)."""
    return ApplyError(str(e), {e.key: str(e).partition(": ")[2]} if e.key else None)


def _refuse_unchangeable(old: Config, new: Config) -> None:
    """ApplyError for what only a restart can change."""
    if new.database.url != old.database.url:
        raise ApplyError("the database cannot be changed while the relay runs", {
            "database.url": "cannot be changed while the relay runs: edit the "
                            "configuration file and restart"})


def _tls_changed(old: Config, new: Config) -> bool:
    o, n = old.smtp, new.smtp
    return ((o.tls_certificate, o.tls_key, o.tls_minimum_version)
            != (n.tls_certificate, n.tls_key, n.tls_minimum_version))


def hostname() -> str:
    return socket.getfqdn()


def _provider_changed(old: Config, new: Config) -> bool:
    """Does the provider need rebuilding?  (Secret values compare too: ``Secret``
    equality ignores the value.)"""
    def shape(c: Config) -> tuple[object, ...]:
        return (c.provider, c.sender, c.smtp.hostname, c.delivery, c.monitoring,
                [s.reveal() for s in secrets_in(c.provider)])

    return shape(old) != shape(new)


def _host_port(port: Port) -> str:
    h = port.getHost()
    return f"[{h.host}]:{h.port}" if ":" in h.host else f"{h.host}:{h.port}"
