"""One measured run of each benchmark scenario; :mod:`bench.run` repeats and tabulates.

Every function here starts what it needs (sink, Postfix, relay, Graph fake),
measures, and stops it again in a ``finally``; each returns a dict of figures.
"""

import json
import os
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import mta
from bench.procs import PROCESSES, PeakSampler, cpu_seconds, pss_bytes, rss_bytes, tree
from bench.relay import REPO, BenchRelay

MB = 1_000_000
MIB = 1 << 20


def load_client(port, messages, sessions, size, senders=None, timeout=600):
    """Run :mod:`bench.loadclient` in its own process -> its JSON figures."""
    args = [sys.executable, "-m", "bench.loadclient", "--port", str(port),
            "--messages", str(messages), "--sessions", str(sessions), "--size", str(size)]
    if senders:
        args += ["--senders", ",".join(senders)]
    proc = PROCESSES.spawn(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        PROCESSES.stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"load client failed: {err.decode(errors='replace')[-800:]}")
    return json.loads(out)


def _drive(load, port, messages, sessions, size):
    if load == "smtp-source":
        mta.smtp_source(port, messages, sessions, size)
        return {}
    return load_client(port, messages, sessions, size)


# ---------------------------------------------------------------------------
# throughput: one system, one load, one run


def throughput(system, load, messages, sessions, size, workdir, relay_config=None):
    """Messages/s end to end (first connect to the last message at the sink, or
    in the outbox), CPU seconds per 1,000 messages and peak PSS of the
    system's process tree, and the load client's accept latencies."""
    sink = mta.Sink() if system != "smtprelay-outbox" else None
    server = None
    try:
        if system == "postfix":
            server = mta.PrivatePostfix(sink.port).__enter__()
            port, root = server.port, server.master_pid
        elif system.startswith("smtprelay"):
            if system == "smtprelay-smtp":
                provider = {"type": "smtp", "host": "127.0.0.1", "port": sink.port,
                            "security": "none"}
            else:
                provider = {"type": "outbox", "directory": str(Path(workdir) / "outbox")}
            config = mta_like(relay_config)
            server = BenchRelay(Path(workdir) / "relay", provider, config).start()
            port, root = server.port, server.pid
        else:  # the ceiling: smtp-source straight into smtp-sink
            port, root = sink.port, None
        time.sleep(0.5)  # let start-up work (Postfix's daemons, the relay's recovery) settle
        cpu_before = cpu_seconds(tree(root)) if root else 0.0
        with PeakSampler(lambda: pss_bytes(tree(root)) if root else 0, 0.1) as pss:
            start = time.monotonic()
            figures = _drive(load, port, messages, sessions, size)
            if sink is not None:
                end = sink.wait_for(messages, timeout=600)
            else:
                end = _wait_outbox(Path(workdir) / "outbox" / "new", messages, timeout=600)
        cpu = (cpu_seconds(tree(root)) - cpu_before) if root else 0.0
        figures.update({
            "rate": messages / (end - start),
            "cpu_per_1000": cpu / messages * 1000 if root else None,
            "pss_mb": pss.peak / MIB if root else None,
        })
        return figures
    finally:
        if server is not None:
            server.__exit__(None, None, None) if system == "postfix" else server.stop()
        if sink is not None:
            sink.stop()


def mta_like(extra=None):
    """The relay's settings for the like-for-like runs: as many upstream
    connections as Postfix's default destination concurrency (20)."""
    from bench.relay import merge

    return merge({"delivery": {"concurrency": 20}}, extra)


def _wait_outbox(folder, count, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if folder.is_dir() and len(os.listdir(folder)) >= count:
            return time.monotonic()
        time.sleep(0.01)
    raise RuntimeError(f"the outbox did not get {count} messages in {timeout}s")


# ---------------------------------------------------------------------------
# memory


def idle_sessions(count, workdir, relay_config=None):
    """PSS of the relay holding ``count`` idle sessions (after EHLO)."""
    relay = BenchRelay(Path(workdir) / "relay",
                       {"type": "outbox", "directory": str(Path(workdir) / "outbox")},
                       relay_config).start()
    holder = None
    try:
        time.sleep(0.5)
        before = pss_bytes(tree(relay.pid))
        holder = PROCESSES.spawn(
            [sys.executable, "-m", "bench.loadclient", "--port", str(relay.port),
             "--idle", str(count)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO)
        line = holder.stdout.readline()
        if not line or json.loads(line).get("open") != count:
            raise RuntimeError(f"could not open {count} sessions: {line!r}")
        time.sleep(1.0)
        held = max(pss_bytes(tree(relay.pid)) for _ in range(3) if not time.sleep(0.2))
        return {"idle_pss_mb": held / MIB, "idle_before_mb": before / MIB,
                "per_session_kb": (held - before) / count / 1024}
    finally:
        if holder is not None:
            holder.stdin.close()
            PROCESSES.stop(holder)
        relay.stop()


def graph_fake(ca_dir, *args):
    """``python -m tests.fakes.graph`` (tests.graph_support), stopped at cleanup too."""
    sys.path.insert(0, str(REPO))
    from tests import graph_support

    fake = graph_support.FakeGraphProcess(ca_dir, *args)
    PROCESSES.on_cleanup(fake.stop)
    return fake, graph_support


def big_message(workdir, megabytes=100):
    """A message of ``megabytes`` MB (attachments) through the m365 upload path:
    the relay's peak RSS growth (VmHWM after less VmRSS before), and seconds."""
    graph, gs = graph_fake(Path(workdir) / "ca", "--no-content")
    relay = None
    try:
        graph.setup(permissions=gs.ALL_PERMISSIONS, max_send_size=150 * MIB)
        provider = gs.relay_provider(graph)
        provider["save_to_sent_items"] = True
        relay = BenchRelay(Path(workdir) / "relay", provider,
                           {"sender": {"default": gs.MAILBOX}}).start()
        parts = 4
        each = megabytes * MB // parts // 1000 * 1000
        raw = gs.build_message(attachments=[(f"part{i}.bin", os.urandom(each),
                                             "application/octet-stream")
                                            for i in range(parts)])
        time.sleep(0.5)
        before = rss_bytes(relay.pid)
        start = time.monotonic()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=300) as s:
            s.sendmail(gs.MAILBOX, ["ann@example.com"], raw)
        accepted = time.monotonic() - start
        graph.messages(wait=1, timeout=600, content=False)
        deadline = time.monotonic() + 120
        while relay.count("sent") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        elapsed = time.monotonic() - start
        peak = _vm(relay.pid, "VmHWM")
        return {"big_size_mb": len(raw) / MB, "big_growth_mb": (peak - before) / MIB,
                "big_accept_s": accepted, "big_total_s": elapsed}
    finally:
        if relay is not None:
            relay.stop()
        graph.stop()


def _vm(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------
# the provider's pipeline


def pipeline(workdir, mailboxes=4, concurrency=4, latency=0.05, messages=800):
    """m365 sends per second against a fake Graph answering in ``latency``
    seconds, against the theoretical mailboxes x concurrency / latency."""
    graph, gs = graph_fake(Path(workdir) / "ca", "--no-content", "--latency", str(latency))
    relay = None
    try:
        senders = [gs.MAILBOX] + [f"relay{i}@contoso.com" for i in range(1, mailboxes)]
        graph.setup(permissions=gs.ALL_PERMISSIONS)
        for address in senders[1:]:
            graph.control("POST", "mailboxes", {"address": address, "tenant": gs.TENANT})
        provider = gs.relay_provider(graph)
        provider["save_to_sent_items"] = True  # one sendMail request per message
        relay = BenchRelay(Path(workdir) / "relay", provider,
                           {"sender": {"default": gs.MAILBOX},
                            "delivery": {"concurrency": concurrency}}).start()
        load_client(relay.port, messages, 20, 2048, senders=senders)
        # from here on every message is stored: the queue drains through the
        # provider alone, which is what the theoretical rate describes
        accepted = time.time()
        deadline = time.monotonic() + 300
        while relay.count("sent") < messages and time.monotonic() < deadline:
            time.sleep(0.1)
        rows = sorted(r[0] for r in relay.query(
            "SELECT at FROM attempts WHERE outcome = 'sent'"))
        if len(rows) < messages:
            raise RuntimeError(f"only {len(rows)} of {messages} sent")
        drained = [at for at in rows if at >= accepted]
        if len(drained) < messages // 10:
            raise RuntimeError("the queue drained during acceptance: send more messages")
        rate = len(drained) / (drained[-1] - accepted)
        theory = mailboxes * concurrency / latency
        return {"pipe_rate": rate, "pipe_theory": theory, "pipe_ratio": rate / theory,
                "pipe_drained": len(drained)}
    finally:
        if relay is not None:
            relay.stop()
        graph.stop()


# ---------------------------------------------------------------------------
# how the cost grows


def scaling_sizes(workdir, sizes, budget_mb=20):
    """Seconds per message and per MB, end to end (client to sink), by size."""
    sink = mta.Sink()
    relay = BenchRelay(Path(workdir) / "relay",
                       {"type": "smtp", "host": "127.0.0.1", "port": sink.port,
                        "security": "none"}, mta_like()).start()
    try:
        out = {}
        done = 0
        for size in sizes:
            count = max(1, min(200, budget_mb * MB // size))
            start = time.monotonic()
            load_client(relay.port, count, 1, size)
            done += count
            end = sink.wait_for(done, timeout=600)
            out[size] = {"s_per_msg": (end - start) / count,
                         "s_per_mb": (end - start) / (count * size / MB)}
        return out
    finally:
        relay.stop()
        sink.stop()


def scaling_sessions(workdir, session_counts, messages=1000):
    """Milliseconds per message end to end, and accept p99, by concurrent sessions."""
    sink = mta.Sink()
    relay = BenchRelay(Path(workdir) / "relay",
                       {"type": "smtp", "host": "127.0.0.1", "port": sink.port,
                        "security": "none"}, mta_like()).start()
    try:
        out = {}
        done = 0
        for n in session_counts:
            count = max(messages, n * 5)
            start = time.monotonic()
            figures = load_client(relay.port, count, n, 2048)
            done += count
            end = sink.wait_for(done, timeout=600)
            out[n] = {"ms_per_msg": (end - start) / count * 1000, "p99_ms": figures["p99_ms"]}
        return out
    finally:
        relay.stop()
        sink.stop()


def workdir(name):
    return tempfile.mkdtemp(prefix=f"smtprelay-bench-{name.replace('/', '-')}-")
