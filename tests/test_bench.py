"""The benchmark runs in its reduced form and cleans up after itself.

Nothing here looks at a figure: speed is what ``bench/run.py`` prints, never a
test's verdict.  Needs root and Debian's postfix package (the benchmark runs a
private Postfix instance); skipped otherwise.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.relay import require_tool

REPO = Path(__file__).resolve().parent.parent


def processes_mentioning(text):
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            for what in ("cmdline", "environ"):  # Postfix's daemons: MAIL_CONFIG=...
                try:
                    with open(f"/proc/{pid}/{what}", "rb") as f:
                        if text.encode() in f.read():
                            out.append(int(pid))
                            break
                except OSError:
                    pass
    return out


@pytest.mark.slow
def test_the_quick_benchmark_prints_its_table_and_leaves_nothing_running():
    require_tool("smtp-sink")
    require_tool("smtp-source")
    if os.geteuid() != 0 or os.path.exists("/etc/postfix/main.cf"):
        pytest.skip("the benchmark runs Postfix only as root on a benchmark machine")
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("smtprelay-bench-*"))
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--messages", "60", "--only",
         "throughput,memory"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Postfix -> smtp-sink" in done.stdout
    assert "targets:" in done.stdout
    # every relay, sink, Postfix instance and fake was stopped, its folder removed
    left = set(tmp.glob("smtprelay-bench-*")) - before
    assert left == set()
    assert processes_mentioning("smtprelay-bench-") == []
