"""The SMTP side of the relay: the server session, its hardening, and the DATA codecs."""
