"""smtprelay against Postfix on this machine: one command, one table.

    .venv/bin/python bench/run.py            # everything, each figure the median of 3 runs
    .venv/bin/python bench/run.py --quick    # a reduced form (a smoke test; figures are rough)
    tox -e bench

Needs root and Debian's ``postfix`` package (smtp-source, smtp-sink, and a
private Postfix instance the script configures under a temporary folder; it
refuses to run Postfix where a system Postfix is configured).  Prints the
table, and writes it with every run's raw figures to ``bench/results/``.
See ``bench/README.md`` for what each figure means.  Nothing here asserts on
speed.
"""

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import scenarios
from bench.procs import PROCESSES, install_cleanup

SYSTEMS = ["direct", "postfix", "smtprelay-smtp", "smtprelay-outbox"]
LOADS = ["smtp-source", "loadclient"]
LABEL = {
    "direct": "smtp-source -> smtp-sink (ceiling)",
    "postfix": "Postfix -> smtp-sink",
    "smtprelay-smtp": "smtprelay smtp -> smtp-sink",
    "smtprelay-outbox": "smtprelay outbox",
}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, spec=".0f", none="-"):
    return none if value is None else format(value, spec)


def ratio(a, b):
    return None if a is None or not b else a / b


class Bench:
    def __init__(self, args):
        self.args = args
        self.raw = {}
        self.table = {}

    def repeat(self, name, fn, *a, **kw):
        """Run ``fn`` ``runs`` times, each in a fresh folder -> median of each figure."""
        runs = []
        for i in range(self.args.runs):
            folder = scenarios.workdir(name)
            try:
                runs.append(fn(*a, workdir=folder, **kw))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            print(f"  {name} run {i + 1}: {_brief(runs[-1])}", flush=True)
        self.raw[name] = runs
        keys = runs[0].keys()
        return {k: median([r.get(k) for r in runs]) for k in keys}

    def throughput(self):
        a = self.args
        for load in LOADS:
            for system in SYSTEMS:
                if system == "direct" and load == "loadclient":
                    continue  # the ceiling is smtp-source's
                name = f"{system}/{load}"
                print(f"{name}: {a.messages} messages of {a.size} B over {a.sessions} sessions",
                      flush=True)
                self.table[name] = self.repeat(
                    name, scenarios.throughput, system, load, a.messages, a.sessions, a.size,
                    relay_config=self.relay_config())

    def relay_config(self):
        return {"smtp": {"processes": self.args.processes}} if self.args.processes > 1 else None

    def memory(self):
        a = self.args
        print(f"idle sessions: {a.idle}", flush=True)
        self.table["idle"] = self.repeat("idle", scenarios.idle_sessions, a.idle,
                                         relay_config=self.relay_config())
        print(f"big message: {a.big} MB through the m365 upload path", flush=True)
        self.table["big"] = self.repeat("big", scenarios.big_message, megabytes=a.big)

    def pipeline(self):
        print("provider pipeline: m365 against a fake Graph answering in 50 ms", flush=True)
        self.table["pipeline"] = self.repeat("pipeline", scenarios.pipeline,
                                             messages=self.args.pipeline_messages)

    def scaling(self):
        a = self.args
        print(f"cost by size: {', '.join(_size(s) for s in a.sizes)}", flush=True)
        runs = []
        for _i in range(a.runs):
            folder = scenarios.workdir("sizes")
            try:
                runs.append(scenarios.scaling_sizes(folder, a.sizes))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        self.table["sizes"] = {s: {k: median([r[s][k] for r in runs]) for k in runs[0][s]}
                               for s in a.sizes}
        print(f"cost by sessions: {', '.join(map(str, a.session_counts))}", flush=True)
        runs = []
        for _i in range(a.runs):
            folder = scenarios.workdir("sessions")
            try:
                runs.append(scenarios.scaling_sessions(folder, a.session_counts,
                                                       messages=a.scale_messages))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        self.table["sessions"] = {n: {k: median([r[n][k] for r in runs]) for k in runs[0][n]}
                                  for n in a.session_counts}

    # -- the report -------------------------------------------------------------------

    def report(self):
        t, a = self.table, self.args
        lines = [f"smtprelay benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}, "
                 f"{os.cpu_count()} cores, median of {a.runs} run(s); "
                 f"{a.messages} messages of {a.size} B over {a.sessions} sessions"
                 + (f"; relay with smtp.processes = {a.processes}" if a.processes > 1 else ""),
                 ""]
        for load in LOADS:
            pf = t.get(f"postfix/{load}", {})
            lines.append(f"load: {load}" + (" (a new connection per message)"
                                            if load == "smtp-source" else
                                            " (20 sessions kept open; latency = final dot to 250)"))
            head = (f"  {'system':<36} {'msg/s':>7} {'x Postfix':>9} {'CPU s/1k':>9} "
                    f"{'peak PSS MB':>11}")
            if load == "loadclient":
                head += f" {'p50 ms':>7} {'p99 ms':>7} {'p99 / Postfix':>13}"
            lines.append(head)
            for system in SYSTEMS:
                row = t.get(f"{system}/{load}")
                if row is None:
                    continue
                line = (f"  {LABEL[system]:<36} {fmt(row['rate']):>7} "
                        f"{fmt(ratio(row['rate'], pf.get('rate')), '.2f'):>9} "
                        f"{fmt(row['cpu_per_1000'], '.2f'):>9} {fmt(row['pss_mb']):>11}")
                if load == "loadclient":
                    line += (f" {fmt(row.get('p50_ms'), '.1f'):>7}"
                             f" {fmt(row.get('p99_ms'), '.1f'):>7}"
                             f" {fmt(ratio(row.get('p99_ms'), pf.get('p99_ms')), '.2f'):>13}")
                lines.append(line)
            lines.append("")
        if "idle" in t:
            i = t["idle"]
            lines.append(f"{a.idle} idle sessions: relay PSS {i['idle_pss_mb']:.0f} MB "
                         f"({i['idle_before_mb']:.0f} MB before; {i['per_session_kb']:.1f} KB "
                         f"per session)")
        if "big" in t:
            b = t["big"]
            lines.append(f"{b['big_size_mb']:.0f} MB message via m365 upload sessions: RSS growth "
                         f"{b['big_growth_mb']:.1f} MB; accepted in {b['big_accept_s']:.1f} s, "
                         f"sent after {b['big_total_s']:.1f} s")
        if "pipeline" in t:
            p = t["pipeline"]
            lines.append(f"provider pipeline (4 mailboxes x concurrency 4 / 50 ms): "
                         f"{p['pipe_rate']:.0f} sends/s of {p['pipe_theory']:.0f} theoretical "
                         f"({p['pipe_ratio'] * 100:.0f} %)")
        if "sizes" in t:
            lines.append("")
            lines.append("cost by message size (end to end, 1 session):  "
                         + "  ".join(f"{_size(s)}: {v['s_per_mb'] * 1000:.0f} ms/MB"
                                     f" ({v['s_per_msg'] * 1000:.1f} ms/msg)"
                                     for s, v in t["sizes"].items()))
        if "sessions" in t:
            lines.append("cost by sessions (2 KB, end to end):  "
                         + "  ".join(f"{n}: {v['ms_per_msg']:.2f} ms/msg (p99 {v['p99_ms']:.0f})"
                                     for n, v in t["sessions"].items()))
        lines += ["", *self.targets()]
        return "\n".join(lines)

    def targets(self):
        t = self.table
        out = ["targets:"]

        def line(name, value, ok):
            out.append(f"  [{'met' if ok else 'NOT met'}] {name}: {value}")

        pf, rs = t.get("postfix/smtp-source"), t.get("smtprelay-smtp/smtp-source")
        if pf and rs:
            r = rs["rate"] / pf["rate"]
            line("throughput >= 1.5 x Postfix (smtp provider, smtp-source)", f"{r:.2f} x", r >= 1.5)
        pf, rs = t.get("postfix/loadclient"), t.get("smtprelay-smtp/loadclient")
        if pf and rs:
            r = rs["rate"] / pf["rate"]
            line("throughput >= 1.5 x Postfix (smtp provider, load client)", f"{r:.2f} x", r >= 1.5)
            r = rs["p99_ms"] / pf["p99_ms"]
            line("accept p99 <= 0.5 x Postfix", f"{r:.2f} x", r <= 0.5)
        peaks = [t[k]["pss_mb"] for k in t if k.startswith("smtprelay") and "pss_mb" in t[k]]
        if peaks:
            line("relay peak PSS < 100 MB in the throughput runs", f"{max(peaks):.0f} MB",
                 max(peaks) < 100)
        if "big" in t:
            g = t["big"]["big_growth_mb"]
            line("100 MB message: RSS growth < 40 MB", f"{g:.1f} MB", g < 40)
        if "idle" in t:
            m = t["idle"]["idle_pss_mb"]
            line(f"{self.args.idle} idle sessions < 150 MB", f"{m:.0f} MB", m < 150)
        if "pipeline" in t:
            r = t["pipeline"]["pipe_ratio"]
            line("provider pipeline >= 90 % of theory", f"{r * 100:.0f} %", r >= 0.9)
        return out


def _size(n):
    return f"{n // 1_000_000} MB" if n >= 1_000_000 else f"{n // 1000} KB"


def _brief(figures):
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in figures.items() if v is not None)


def parse(argv):
    p = argparse.ArgumentParser(description="smtprelay against Postfix: one table")
    p.add_argument("--quick", action="store_true", help="a reduced run: 1 run, small counts")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--processes", type=int, default=1,
                   help="smtp.processes for the relay in the throughput and idle runs")
    p.add_argument("--idle", type=int, default=1000)
    p.add_argument("--big", type=int, default=100, help="MB of the big message")
    p.add_argument("--pipeline-messages", type=int, default=2000)
    p.add_argument("--scale-messages", type=int, default=1000)
    p.add_argument("--only", default="throughput,memory,pipeline,scaling",
                   help="comma-separated parts to run")
    a = p.parse_args(argv)
    a.sizes = [1000, 10_000, 100_000, 1_000_000, 10_000_000, 50_000_000]
    a.session_counts = [1, 10, 50, 100, 200]
    if a.quick:
        # smaller counts, unless given on the command line
        for key, value in dict(runs=1, messages=300, idle=100, big=5, pipeline_messages=400,
                               scale_messages=100).items():
            if getattr(a, key) == p.get_default(key):
                setattr(a, key, value)
        a.sizes = [1000, 100_000, 1_000_000]
        a.session_counts = [1, 10]
    return a


def main(argv=None):
    args = parse(argv)
    install_cleanup()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,000 sessions need fds
    bench = Bench(args)
    parts = args.only.split(",")
    try:
        for part in ("throughput", "memory", "pipeline", "scaling"):
            if part in parts:
                getattr(bench, part)()
    finally:
        PROCESSES.stop_all()
    text = bench.report()
    print()
    print(text)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / f"{stamp}.txt").write_text(text + "\n")
    (out / f"{stamp}.json").write_text(json.dumps(
        {"args": {k: v for k, v in vars(args).items()}, "table": bench.table,
         "runs": bench.raw}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
