"""Holding one message while it arrives: memory first, a temporary file beyond.

The SMTP session writes content as the DataReader produces it; the spool
keeps the first bytes (the header block) aside for policy and the log, and
at end of data offers the message as an iterable of chunks, optionally with
a rewritten header block, for the store to consume on its own thread.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

from smtprelay.message import MAX_HEADER_BLOCK

IN_MEMORY = 1 << 20
READ_CHUNK = 1 << 20


class MessageSpool:
    def __init__(self, directory: str | None = None) -> None:
        self._file = tempfile.SpooledTemporaryFile(max_size=IN_MEMORY, dir=directory)
        self._head = bytearray()
        self.header_end: int | None = None  # offset just past the header block, once known
        self.size = 0

    def write(self, data: bytes) -> None:
        if self.header_end is None and len(self._head) < MAX_HEADER_BLOCK:
            old = len(self._head)
            self._head += data[: MAX_HEADER_BLOCK - old]
            if self._head.startswith(b"\r\n"):
                self.header_end = 2
            else:
                i = self._head.find(b"\r\n\r\n", max(0, old - 3))
                if i >= 0:
                    self.header_end = i + 4
            if self.header_end is not None:
                del self._head[self.header_end:]
        self._file.write(data)
        self.size += len(data)

    @property
    def header_block(self) -> bytes:
        """The header block (with its blank line), or what we kept of it."""
        if self.header_end is not None:
            return bytes(self._head[: self.header_end])
        return bytes(self._head)

    def chunks(self, prefix: bytes = b"", header_block: bytes | None = None) -> Iterator[bytes]:
        """Yield ``prefix``, then the message; with ``header_block``, that
        block replaces the original one.  Runs on the store's thread."""
        if prefix:
            yield prefix
        skip = 0
        if header_block is not None:
            yield header_block
            skip = self.header_end if self.header_end is not None else len(self._head)
        self._file.seek(skip)
        while True:
            chunk = self._file.read(READ_CHUNK)
            if not chunk:
                break
            yield chunk

    def close(self) -> None:
        self._file.close()
