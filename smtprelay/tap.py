"""twistd glue: ``twistd -n smtprelay --config PATH``.

Configuration problems end start-up here, before the reactor runs, with one
line per problem naming the key and a non-zero exit.
"""

from __future__ import annotations

import sys

from twisted.application import service
from twisted.application.service import IServiceMaker, MultiService
from twisted.logger import ILogObserver
from twisted.plugin import IPlugin
from twisted.python import usage
from twisted.python.components import Componentized
from zope.interface import implementer

from smtprelay import config as configuration
from smtprelay import logs


class Options(usage.Options):
    synopsis = "--config PATH"
    optParameters = [["config", "c", "etc/relay.toml", "the configuration file (relay.toml)"]]
    longdesc = "Run the smtprelay SMTP relay with the configuration in --config."


class _Root(MultiService):
    """Sets the scrubbing log observer on twistd's application (used unless
    ``--logger`` was given), then holds the relay service."""

    def __init__(self, relay: service.Service, observer: ILogObserver | None) -> None:
        super().__init__()
        self.observer = observer
        relay.setServiceParent(self)

    def setServiceParent(self, parent: service.IServiceCollection) -> None:
        if (self.observer is not None and isinstance(parent, Componentized)
                and parent.getComponent(ILogObserver, None) is None):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


@implementer(IServiceMaker, IPlugin)
class RelayServiceMaker:
    tapname = "smtprelay"
    description = "SMTP relay to Microsoft Graph, the Gmail API or an upstream SMTP server"
    options = Options

    def makeService(self, options: usage.Options) -> _Root:
        from twisted.internet import reactor

        from smtprelay.service import RelayService

        try:
            config = configuration.load(options["config"])
        except configuration.ConfigError as e:
            sys.stderr.write("\n".join(e.lines()) + "\n")
            raise SystemExit(2) from None
        relay = RelayService(config, reactor)
        return _Root(relay, logs.observer_for_twistd(getattr(options, "parent", None)))


serviceMaker = RelayServiceMaker()
