"""The repository keeps its promises: the README's commands are what CI runs."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readme_commands():
    text = (REPO / "README.rst").read_text()
    return re.findall(r"^    (python3 -m venv .+)$", text, re.M)[:2]


def test_readme_starts_with_the_run_and_test_commands():
    run, test = readme_commands()
    assert "twistd -n smtprelay --config etc/relay.toml" in run
    assert "pytest" in test


def test_ci_runs_the_readme_test_command_verbatim():
    _, test = readme_commands()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test in ci


def test_the_plugin_dropin_has_no_package_init():
    # an __init__.py there would shadow Twisted's own twisted.plugins package
    assert not (REPO / "twisted" / "__init__.py").exists()
    assert not (REPO / "twisted" / "plugins" / "__init__.py").exists()


def test_readme_is_valid_restructuredtext():
    import io

    import pytest

    docutils_core = pytest.importorskip("docutils.core")
    errors = io.StringIO()
    docutils_core.publish_doctree((REPO / "README.rst").read_text(),
                                  settings_overrides={"warning_stream": errors,
                                                      "report_level": 2})
    assert errors.getvalue() == ""
