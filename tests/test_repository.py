"""The repository keeps its promises: the README's commands are what CI runs, test
files share helpers only through support modules, and the code is typed."""

import ast
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


def imported_modules(tree, package):
    """The dotted names ``tree`` imports, relative imports resolved within ``package``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([package, base] if base else [package])
            yield base
            # ``from tests import test_x`` imports a module, not a name
            yield from (f"{base}.{alias.name}" for alias in node.names)


def test_no_test_file_imports_another_test_file():
    offenders = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for name in imported_modules(tree, "tests"):
            parts = name.split(".")
            if parts[0] == "tests" and len(parts) > 1 and parts[1].startswith("test_"):
                offenders.append(f"{path.name} imports {name}")
    assert offenders == [], "shared test helpers belong in a tests/ support module:\n" + \
        "\n".join(offenders)


def unannotated_functions(tree):
    """(line, name) of each function or method that lacks a return annotation or
    an annotation on a parameter (a method's ``self`` or ``cls`` excepted)."""
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        args = node.args
        positional = [*args.posonlyargs, *args.args]
        if positional and positional[0].arg in ("self", "cls"):
            positional = positional[1:]
        params = [*positional, *args.kwonlyargs]
        params += [a for a in (args.vararg, args.kwarg) if a is not None]
        if node.returns is None or any(a.annotation is None for a in params):
            yield node.lineno, node.name


def test_at_least_nine_functions_in_ten_are_annotated():
    total, missing = 0, []
    for path in sorted((REPO / "smtprelay").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        total += sum(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                     for n in ast.walk(tree))
        missing += [f"{path.relative_to(REPO)}:{line} {name}"
                    for line, name in unannotated_functions(tree)]
    assert total > 0
    annotated = (total - len(missing)) / total
    assert annotated >= 0.9, (f"{annotated:.0%} of {total} functions are annotated, "
                              f"{len(missing)} are not, e.g.:\n" + "\n".join(missing[:40]))
