"""Shared by the tests that need this machine's addresses beyond loopback."""

import socket

import pytest


def non_loopback_address():
    """An address of this machine that is not loopback (skip when there is none)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))
        address = s.getsockname()[0]
    except OSError:
        address = None
    finally:
        s.close()
    if not address or address.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address")
    return address
