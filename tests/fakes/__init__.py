"""Faithful fakes of the cloud services we cannot reach from tests.

Each fake is a twisted.web site served over HTTPS with a certificate from
:mod:`tests.fakes.tlsca`; each runs in-process (``make_site``) or as its own
process (``python -m tests.fakes.<name> --help``) with a control API under
``/_fake/`` for tests and benchmarks.
"""
