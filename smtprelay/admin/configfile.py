"""Writing a new configuration back to relay.toml: comments kept, atomically.

:func:`render` is pure: it parses the current file with tomlkit and updates
that document in place (a value equal to the old one is not touched, a
changed one keeps its trailing comment, keys gone from the new document are
removed, new keys are appended), so the administrator's comments and layout
survive.  :func:`prepare` (blocking: run it in a thread) writes the result to
a temporary file in the same folder and fsyncs it; :meth:`PendingWrite.commit`
renames it over the file and fsyncs the folder, so that a crash leaves either
the old file or the new one, never half of one.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from typing import Any

import tomlkit
from tomlkit.container import Container
from tomlkit.items import AoT, InlineTable, Item, Table

# values that TOML has a type for but JSON has not: written back as that type
_DATE_KEYS = ("provider.client_secret_expires",)


def _toml_value(key: str, value: Any) -> Any:
    if key in _DATE_KEYS and isinstance(value, str):
        try:
            return datetime.date.fromisoformat(value)
        except ValueError:
            return value
    return value


def _plain(item: Any) -> Any:
    return item.unwrap() if hasattr(item, "unwrap") else item


def _new_item(key: str, value: Any, depth: int) -> Item:
    """A tomlkit item for a value not in the file: dicts below [smtp.auth] inline."""
    if isinstance(value, dict):
        t: Table | InlineTable
        t = tomlkit.table() if depth <= 1 or key == "smtp.auth" else tomlkit.inline_table()
        for k, v in value.items():
            t[k] = _new_item(f"{key}.{k}", v, depth + 1)
        return t
    return tomlkit.item(_toml_value(key, value))


def _replace(container: Container | Table, name: str, key: str, value: Any,
             depth: int) -> None:
    old = container[name]
    new = _new_item(key, value, depth)
    if isinstance(old, InlineTable) and isinstance(new, Table):
        inline = tomlkit.inline_table()
        inline.update(new)
        new = inline
    trivia = getattr(old, "trivia", None)
    if trivia is not None and hasattr(new, "trivia") and not isinstance(new, Table):
        new.trivia.indent = trivia.indent
        new.trivia.comment = trivia.comment
        new.trivia.comment_ws = trivia.comment_ws
        if trivia.comment:
            # keep the comment in its column when the value's width changed
            column = len(old.as_string()) + len(trivia.comment_ws)
            new.trivia.comment_ws = " " * max(1, column - len(new.as_string()))
    container[name] = new


def _update(container: Container | Table, new: dict[str, Any], prefix: str,
            depth: int) -> None:
    for name in [k for k in container.keys() if k not in new]:
        del container[name]
    for name, value in new.items():
        key = f"{prefix}.{name}" if prefix else name
        value = _toml_value(key, value)
        if name not in container:
            container[name] = _new_item(key, value, depth)
            continue
        old = container[name]
        if _plain(old) == value:
            continue
        if isinstance(value, dict) and isinstance(old, Table) and not isinstance(old, AoT):
            _update(old, value, key, depth + 1)
        else:
            _replace(container, name, key, value, depth)


def render(current_text: str, document: dict[str, Any]) -> str:
    """The text of ``current_text`` (a TOML file) changed to hold ``document``."""
    doc = tomlkit.parse(current_text)
    _update(doc, document, "", 1)
    text = tomlkit.dumps(doc)
    if not text.endswith("\n"):
        text += "\n"
    return text


class PendingWrite:
    """A new version of the file, written and fsynced beside it, not yet in place."""

    def __init__(self, path: str, temp_path: str) -> None:
        self.path = path
        self.temp_path: str | None = temp_path

    def commit(self) -> None:
        """Blocking: the new file replaces the old one (atomic rename, folder fsynced)."""
        assert self.temp_path is not None, "committed or aborted already"
        os.replace(self.temp_path, self.path)
        self.temp_path = None
        folder = os.path.dirname(self.path) or "."
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        if self.temp_path is not None:
            try:
                os.unlink(self.temp_path)
            except OSError:
                pass
            self.temp_path = None


def prepare(path: str, document: dict[str, Any]) -> PendingWrite:
    """Blocking: render ``document`` over the file at ``path`` into a temporary file
    in the same folder (same owner-only permissions as the file) -> PendingWrite."""
    with open(path, encoding="utf-8") as f:
        current = f.read()
    text = render(current, document)
    folder = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=".relay.toml.", suffix=".tmp", dir=folder)
    try:
        try:
            st = os.stat(path)
            os.fchmod(fd, st.st_mode & 0o7777)
        except OSError:
            pass
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    return PendingWrite(os.path.abspath(path), temp)
