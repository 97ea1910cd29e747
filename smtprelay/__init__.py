"""smtprelay: an SMTP-to-API email relay on Twisted."""

__version__ = "0.1.0"
