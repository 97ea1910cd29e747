"""The ``twistd smtprelay`` drop-in: ``twistd -n smtprelay --config PATH``."""

from smtprelay.tap import serviceMaker  # noqa: F401  (found by twisted.plugin)
