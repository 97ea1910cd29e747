"""Throughput of the DATA codecs (smtprelay.smtp.data, smtprelay.dotstuff), in MB/s.

    .venv/bin/python bench/data_reader.py

Prints one line per case; best of a few runs. Nothing here asserts on timing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smtprelay.dotstuff import OutboundEncoder
from smtprelay.smtp.data import DataReader

MB = 1_000_000
CHUNK = 65536


def _lines(total: int, line_end: bytes = b"\r\n", width: int = 76) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopq"[:width]
    line = line.ljust(width, b"x") + line_end
    count = total // len(line)
    # A dot-stuffed line now and then, as real mail has.
    return (line * count).replace(line_end + b"The", line_end + b"..The", count // 40)


def _best(fn: Callable[[], None], runs: int) -> float:
    best: float | None = None
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    assert best is not None
    return best


def _report(name: str, nbytes: int, seconds: float) -> None:
    print(f"{name:<58} {nbytes / MB / seconds:9.1f} MB/s")


def small_messages() -> None:
    header = b"From: app@example.com\r\nTo: someone@example.org\r\nSubject: report\r\n\r\n"
    message = header + _lines(2048 - len(header) - 3) + b".\r\n"
    count = 20_000

    def run() -> None:
        for _ in range(count):
            reader = DataReader()
            result = reader.feed(message)
            assert result.done

    _report(f"reader: {count} clean messages of {len(message)} B, one feed each",
            count * len(message), _best(run, 3))


def big_message(name: str, body: bytes, **kw: int | str) -> None:
    data = body + (b".\r\n" if body.endswith(b"\r\n") else b"\r\n.\r\n")
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]

    def run() -> None:
        reader = DataReader(**kw)  # type: ignore[arg-type]
        for chunk in chunks:
            result = reader.feed(chunk)
        assert result.done

    _report(name, len(data), _best(run, 3))


def encoder(name: str, body: bytes, chunk_size: int, **kw: int) -> None:
    chunks = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]

    def run() -> None:
        enc = OutboundEncoder(**kw)
        for chunk in chunks:
            enc.feed(chunk)
        enc.finish()

    _report(name, len(body), _best(run, 3))


def main() -> None:
    small_messages()
    clean = _lines(50 * MB)
    big_message("reader: 50 MB clean CRLF message, 64 KiB chunks", clean)
    big_message("reader: 50 MB bare-LF message (normalize), 64 KiB chunks", _lines(50 * MB, b"\n"))
    big_message("reader: 50 MB one-line message (refused, read to the end)",
                b"A" * (50 * MB) + b"\r\n")
    html = (b"<td>" + b"h" * 4000 + b"</td>\r\n") * (50 * MB // 4011)
    big_message("reader: 50 MB of 4 KB lines, 64 KiB chunks", html)
    encoder("encoder: 50 MB clean CRLF message, 16 KiB chunks", clean, 16384)
    encoder("encoder: 50 MB of 4 KB lines (folded), 64 KiB chunks", html, CHUNK)


if __name__ == "__main__":
    main()
