"""Processes the benchmark starts, and what they cost: CPU seconds and PSS.

Every process is started through :class:`Processes` in a session of its own,
so that stopping it stops everything it forked (Postfix's daemons, twistd's
workers).  :func:`install_cleanup` makes SIGINT and SIGTERM unwind through the
``finally`` blocks and stops whatever is left at exit, so that a failed or
interrupted run leaves nothing behind.

Costs are read from ``/proc``: a process tree's CPU time is the sum of
``utime + stime + cutime + cstime`` of its live members (a parent that reaped
a child carries the child's time), so the difference between two readings is
the CPU the tree used in between, children that came and went included.  Its
memory is the sum of the PSS of its members (``smaps_rollup``): shared pages
are counted once across the tree, as they should be for a server of many
processes.
"""

import atexit
import os
import signal
import subprocess
import threading
import time

_TICK = os.sysconf("SC_CLK_TCK")


class Processes:
    """Started processes, each the leader of its own session."""

    def __init__(self):
        self._procs = []
        self._cleanups = []

    def spawn(self, args, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(args, start_new_session=True, **kw)
        self._procs.append(proc)
        return proc

    def on_cleanup(self, fn):
        """``fn()`` runs at :meth:`stop_all` (before the processes are signalled)."""
        self._cleanups.append(fn)

    def stop(self, proc, timeout=15.0, sig=signal.SIGTERM):
        """Signal ``proc``'s session, wait, then kill what is left of it."""
        if proc.poll() is None:
            _signal_group(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self):
        cleanups, self._cleanups = self._cleanups, []
        for fn in reversed(cleanups):
            try:
                fn()
            except Exception as e:  # cleaning up must go on
                print(f"bench: cleanup failed: {e}")
        for proc in list(self._procs):
            self.stop(proc, timeout=5.0)


def _signal_group(pid, sig):
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


PROCESSES = Processes()


def install_cleanup():
    """SIGINT/SIGTERM unwind as KeyboardInterrupt; everything is stopped at exit."""

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    atexit.register(PROCESSES.stop_all)


# ---------------------------------------------------------------------------
# /proc


def children_map():
    """{pid: [child pids]} of every process now."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(name))
    return out


def tree(pid):
    """``pid`` and all its descendants alive now."""
    kids = children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def cpu_seconds(pids):
    """utime + stime + cutime + cstime of ``pids``, in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])
        except (OSError, IndexError, ValueError):
            pass
    return total / _TICK


def pss_bytes(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def rss_bytes(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakSampler:
    """Samples ``measure()`` every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, measure, interval=0.05):
        self._measure = measure
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak = 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._measure())
            self._stop.wait(self._interval)

    def __enter__(self):
        self.peak = self._measure()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._measure())


def tree_pss(root_pid):
    """A function measuring the PSS of ``root_pid``'s tree (for PeakSampler)."""
    return lambda: pss_bytes(tree(root_pid))


def wait_port(port, host="127.0.0.1", timeout=30.0):
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
