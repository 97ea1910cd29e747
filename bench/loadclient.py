"""A small SMTP load client that keeps its sessions open and times every message.

    python -m bench.loadclient --port P --sessions 20 --messages 5000 --size 2048
    python -m bench.loadclient --port P --idle 1000      # open, EHLO, hold until stdin closes

Each session connects once, says EHLO, then sends its share of the messages
one after the other (MAIL, RCPT, DATA, body, final dot), as a legacy
application that reuses its connection does.  The latency of a message is
from the final dot written to its ``250`` read: what the relay's durable
acceptance costs the client.  Prints one JSON line: elapsed seconds (first
connect to last 250), messages, latency percentiles in milliseconds.

``--idle N`` opens N sessions, greets on each, prints ``{"open": N}`` and
holds them until its standard input closes (the benchmark measures the
relay's memory meanwhile).
"""

import argparse
import asyncio
import json
import os
import resource
import sys
import time


def message_bytes(size, n, sender="app@example.com"):
    header = (f"From: {sender}\r\nTo: user@example.org\r\nSubject: load {n}\r\n"
              f"Message-ID: <{n}.{os.getpid()}@load.example>\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog 0123456789 abcdefghijklmnop\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(header) - 2)]
    if not body.endswith(b"\r\n"):
        body = body[: max(0, len(body) - 2)] + b"\r\n"
    return header + body


class Session:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port, host="127.0.0.1"):
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        s = cls(reader, writer)
        await s.expect(220)
        await s.command(b"EHLO load.example", 250)
        return s

    async def reply(self):
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("the server closed the connection")
            if line[3:4] != b"-":
                return int(line[:3]), line

    async def expect(self, code):
        got, line = await self.reply()
        if got != code:
            raise RuntimeError(f"expected {code}, got {line!r}")

    async def command(self, line, code):
        self.writer.write(line + b"\r\n")
        await self.expect(code)

    async def send(self, data, sender=b"app@example.com"):
        """One message -> seconds from the final dot to its 250."""
        await self.command(b"MAIL FROM:<" + sender + b">", 250)
        await self.command(b"RCPT TO:<user@example.org>", 250)
        await self.command(b"DATA", 354)
        self.writer.write(data.replace(b"\r\n.", b"\r\n.."))
        await self.writer.drain()
        start = time.perf_counter()
        self.writer.write(b".\r\n")
        await self.expect(250)
        return time.perf_counter() - start

    async def quit(self):
        try:
            await self.command(b"QUIT", 221)
        except (ConnectionError, RuntimeError):
            pass
        self.writer.close()


def percentile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100.0 * (len(ordered) - 1)))]


async def load(port, sessions, messages, size, senders=("app@example.com",)):
    latencies = []
    data = [(message_bytes(size, n, senders[n % len(senders)]),
             senders[n % len(senders)].encode())
            for n in range(len(senders) if size > 1_000_000 else max(len(senders), 64))]
    shares = [messages // sessions + (1 if i < messages % sessions else 0)
              for i in range(sessions)]

    async def run(share, offset):
        s = await Session.open(port)
        for n in range(share):
            body, sender = data[(offset * share + n) % len(data)]
            latencies.append(await s.send(body, sender))
        await s.quit()

    start = time.perf_counter()
    await asyncio.gather(*(run(share, i) for i, share in enumerate(shares)))
    elapsed = time.perf_counter() - start
    return {
        "elapsed": elapsed, "messages": len(latencies),
        "p50_ms": percentile(latencies, 50) * 1000, "p90_ms": percentile(latencies, 90) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000, "max_ms": max(latencies) * 1000,
    }


async def idle(port, count):
    opened = []
    for start in range(0, count, 100):
        opened += await asyncio.gather(*(Session.open(port)
                                         for _ in range(start, min(count, start + 100))))
    print(json.dumps({"open": len(opened)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for s in opened:
        s.writer.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--senders", default="app@example.com",
                        help="comma-separated envelope senders, used in turn")
    parser.add_argument("--idle", type=int, default=0, help="open N idle sessions and hold")
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.idle:
        asyncio.run(idle(args.port, args.idle))
    else:
        senders = tuple(args.senders.split(","))
        print(json.dumps(asyncio.run(load(args.port, args.sessions, args.messages, args.size,
                                          senders))))


if __name__ == "__main__":
    main()
