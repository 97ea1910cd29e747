"""The relay as a Twisted service: store, provider, queue runner, SMTP listeners.

``RelayService(config, reactor)`` wires the rooms together; nothing here
parses SMTP or SQL.  Start-up order: the store (schema, instance), then the
queue, then the listeners; shutdown is the reverse, with sessions in
progress allowed ``smtp.shutdown_grace`` to finish their message.
"""

import socket

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from smtprelay import __version__, logs
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
                                  retention=config.database.retention, metrics=self.metrics)
        self.runner.observers.append(self.metrics.outcome)
        self.door = FrontDoor(
            config, self.store, reactor, make_portal(config.smtp.auth.users, reactor),
            self.lockout, tls_context=self._tls_context(config), runner=self.runner,
            metrics=self.metrics,
        )
        self._ports = []
        self.smtp_running = False

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

    def _listen(self, key, address, factory, tls=False):
        from twisted.internet.error import CannotListenError

        try:
            if tls:
                return self.reactor.listenSSL(address.port, factory, self.door.tls_context,
                                              backlog=128, interface=address.interface)
            return self.reactor.listenTCP(address.port, factory, backlog=128,
                                          interface=address.interface)
        except CannotListenError as e:
            reason = e.socketError.strerror if getattr(e.socketError, "strerror", None) else e
            raise ListenError(f"{key}: cannot listen on {address}: {reason}") from None

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
        except ListenError as e:
            import sys

            sys.stderr.write(f"{self.config.path or 'relay.toml'}: {e}\n")
            raise SystemExit(1)
        self.smtp_running = True
        super().privilegedStartService()

    # -- life ---------------------------------------------------------------------------

    def startService(self):
        super().startService()
        self.started_at = self.clock.seconds()
        if not self._ports:
            self._ports = self._bind()
            self.smtp_running = True
        d = self._start()
        d.addErrback(self._fatal)

    @defer.inlineCallbacks
    def _start(self):
        # hold connections until the store is ready: they get the greeting late, not 451s
        for p in self._ports:
            p.stopReading()
        yield self.store.start(self.clock.seconds())
        yield defer.maybeDeferred(self.provider.start)
        self.runner.startService()
        for p in self._ports:
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
        self.smtp_running = False
        ports, self._ports = self._ports, []
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
        self.door.stop_accepting()
        waited = 0.0
        while self.door.sessions and waited < grace:
            yield task.deferLater(self.clock, 0.1, lambda: None)
            waited += 0.1
        if self.door.sessions:
            log.warn("closing {n} SMTP sessions still open after {g:.0f}s",
                     n=len(self.door.sessions), g=grace)
            self.door.force_close()

    def start_smtp(self):
        if self.smtp_running:
            return
        self.door.accepting = True
        self._ports = self._bind()
        self.smtp_running = True


def hostname():
    return socket.getfqdn()
