"""twistd glue: ``twistd -n smtprelay --config PATH``.

Configuration problems end start-up here, before the reactor runs, with one
line per problem naming the key and a non-zero exit.
"""

import sys

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer

from smtprelay import config as configuration


class Options(usage.Options):
    synopsis = "--config PATH"
    optParameters = [["config", "c", "etc/relay.toml", "the configuration file (relay.toml)"]]
    longdesc = "Run the smtprelay SMTP relay with the configuration in --config."


@implementer(IServiceMaker, IPlugin)
class RelayServiceMaker:
    tapname = "smtprelay"
    description = "SMTP relay to Microsoft Graph, the Gmail API or an upstream SMTP server"
    options = Options

    def makeService(self, options):
        from twisted.internet import reactor

        from smtprelay.service import RelayService

        try:
            config = configuration.load(options["config"])
        except configuration.ConfigError as e:
            sys.stderr.write("\n".join(e.lines()) + "\n")
            raise SystemExit(2)
        return RelayService(config, reactor)


serviceMaker = RelayServiceMaker()
