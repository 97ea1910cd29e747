"""Postfix's pieces as anchors: ``smtp-sink``, ``smtp-source``, and a private Postfix.

:class:`Sink` runs ``smtp-sink -c`` and follows its running counter, so the
benchmark knows when the N-th message arrived (the end of an end-to-end
run).  :class:`PrivatePostfix` runs Debian's Postfix as an instance of its
own: its own ``config_directory``, ``queue_directory`` and ``data_directory``
under a temporary folder, listening on a loopback port and relaying
everything to the sink.  It refuses to run where a system Postfix is
configured (``/etc/postfix/main.cf`` exists) or running: this is for a
benchmark machine only, and nothing under ``/etc/postfix`` is ever written.
It is stopped and its folder removed however the run ends.
"""

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time

from bench.procs import PROCESSES, free_port, wait_port

SBIN = "/usr/sbin"
SYSTEM_MAIN_CF = "/etc/postfix/main.cf"


def tool(name):
    path = shutil.which(name) or os.path.join(SBIN, name)
    if not os.path.exists(path):
        raise RuntimeError(f"{name} is not installed (apt-get install postfix)")
    return path


class Sink:
    """``smtp-sink`` on a loopback port, counting messages as they arrive."""

    def __init__(self, backlog=1024):
        self.port = free_port()
        self.proc = PROCESSES.spawn(
            [tool("smtp-sink"), "-c", "-u", "nobody", f"127.0.0.1:{self.port}", str(backlog)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.count = 0
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_port(self.port)

    def _read(self):
        pending = b""
        while True:
            chunk = self.proc.stdout.read1(4096)
            if not chunk:
                return
            pending += chunk
            *records, pending = re.split(rb"[\r\n]", pending)
            for record in records:
                m = re.search(rb"mesg=(\d+)", record)
                if m:
                    with self._cond:
                        self.count = int(m.group(1))
                        self.last_at = time.monotonic()
                        self._cond.notify_all()

    def wait_for(self, count, timeout):
        """Block until ``count`` messages arrived in all -> the monotonic time it
        happened (the counter's update); RuntimeError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"the sink got {self.count} of {count} messages "
                                       f"in {timeout:.0f}s")
                self._cond.wait(left)
            return self.last_at

    def stop(self):
        PROCESSES.stop(self.proc)


def smtp_source(port, messages, sessions, size, keep_open=False, timeout=300):
    """Run ``smtp-source`` -> elapsed seconds.  Without ``keep_open`` every
    message has a connection of its own (as many legacy clients do)."""
    args = [tool("smtp-source"), "-s", str(sessions), "-m", str(messages), "-l", str(size),
            "-f", "app@example.com", "-t", "user@example.org", "-M", "bench.example"]
    if keep_open:
        args.append("-d")
    args.append(f"127.0.0.1:{port}")
    start = time.monotonic()
    proc = PROCESSES.spawn(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        PROCESSES.stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {out.decode(errors='replace')[-500:]}")
    return time.monotonic() - start


_MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

# Debian's defaults otherwise (queue files fsynced before 250, as always);
# nothing local: every recipient is relayed to the sink.
_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/spool
data_directory = {base}/data
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
myhostname = postfix.bench.example
mydomain = bench.example
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject
alias_maps =
alias_database =
local_recipient_maps =
biff = no
smtputf8_enable = no
"""


def system_postfix_problem():
    """Why a private Postfix must not run here, or None."""
    if os.geteuid() != 0:
        return "running Postfix needs root"
    if os.path.exists(SYSTEM_MAIN_CF):
        return (f"{SYSTEM_MAIN_CF} exists: this machine has a configured Postfix; "
                "the benchmark runs Postfix only on a benchmark machine")
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"postfix/sbin/master"):
                return f"a Postfix master is running (pid {pid}): not a benchmark machine"
    try:
        tool("postfix")
    except RuntimeError as e:
        return str(e)
    return None


class PrivatePostfix:
    """A Postfix instance of our own, relaying to ``sink_port``; a context manager."""

    def __init__(self, sink_port):
        problem = system_postfix_problem()
        if problem:
            raise RuntimeError(problem)
        self.sink_port = sink_port
        self.port = free_port()
        self.base = tempfile.mkdtemp(prefix="smtprelay-bench-postfix-")
        self.config_dir = os.path.join(self.base, "etc")
        self.proc = None

    def __enter__(self):
        PROCESSES.on_cleanup(self.close)
        try:
            os.chmod(self.base, 0o755)  # Postfix's daemons run as "postfix"
            os.makedirs(self.config_dir)
            os.makedirs(os.path.join(self.base, "spool"))
            data = os.path.join(self.base, "data")
            os.makedirs(data)
            shutil.chown(data, "postfix", "postfix")
            with open(os.path.join(self.config_dir, "main.cf"), "w") as f:
                f.write(_MAIN_CF.format(base=self.base, sink_port=self.sink_port))
            with open(os.path.join(self.config_dir, "master.cf"), "w") as f:
                f.write(_MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
            # start-fg: the master stays our child (its own session), so that
            # stopping it cannot miss
            self.proc = PROCESSES.spawn([tool("postfix"), "-c", self.config_dir, "start-fg"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_port(self.port)
            except RuntimeError as e:
                raise RuntimeError(f"{e}; Postfix's log says:\n{self.log()[-2000:]}") from None
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def master_pid(self):
        try:
            with open(os.path.join(self.base, "spool", "pid", "master.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return self.proc.pid if self.proc else None

    def log(self):
        try:
            with open(os.path.join(self.base, "maillog"), errors="replace") as f:
                return f.read()
        except OSError:
            return "(no log)"

    def queue_empty(self):
        """No message waits in the instance's queue (incoming, active, deferred)."""
        for sub in ("incoming", "active", "deferred", "maildrop"):
            for _, _, files in os.walk(os.path.join(self.base, "spool", sub)):
                if files:
                    return False
        return True

    def close(self):
        if self.proc is not None:
            subprocess.run([tool("postfix"), "-c", self.config_dir, "stop"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
            PROCESSES.stop(self.proc, timeout=10)
            self.proc = None
        if os.path.isdir(self.base):
            shutil.rmtree(self.base, ignore_errors=True)
