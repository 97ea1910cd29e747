"""Shared fixtures: a test CA, and relays run as real twistd processes."""

import os

import pytest

from tests.fakes.tlsca import TestCA
from tests.relay import RelayProcess

# a test that sets its own CA must not be overridden by the environment
os.environ.pop("REQUESTS_CA_BUNDLE", None)
os.environ.pop("CURL_CA_BUNDLE", None)


@pytest.fixture(scope="session")
def ca(tmp_path_factory):
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def start_relay(tmp_path):
    """start_relay(config_overrides, name=...) -> a running RelayProcess."""
    relays = []

    def start(config=None, name="relay", **kw):
        r = RelayProcess(tmp_path / name, config, **{k: v for k, v in kw.items()
                                                    if k in ("env", "logger")})
        relays.append(r)
        return r.start(**{k: v for k, v in kw.items() if k in ("timeout", "expect_ready")})

    yield start
    for r in relays:
        r.stop()


@pytest.fixture
def relay(start_relay):
    return start_relay()


@pytest.fixture
def tls_config(ca):
    return {"smtp": {"tls_certificate": str(ca.server_cert), "tls_key": str(ca.server_key)}}


def pytest_collection_modifyitems(items):
    # the hostile-world suite is what `tox -e torture` (-m torture) runs, in its long form
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1].startswith("test_hostile_"):
            item.add_marker(pytest.mark.torture)


def pytest_terminal_summary(terminalreporter):
    from tests import torture

    lines = torture.report_lines()
    if lines:
        terminalreporter.section("hostile world figures")
        for line in lines:
            terminalreporter.write_line(line)
