"""spawn.spawn, the one way a program is started: real processes, their
/proc entries and descriptors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from psgi_forkserver.spawn import spawn
from support import wait_for

SIG_MASK_LINES = ("SigIgn", "SigBlk")
STANDARD_SIGNALS = (1 << 31) - 1  # 1..31: the C library keeps some real-time ones for itself


def proc_masks(pid: int) -> dict[str, int]:
    """Its ignored and blocked standard signals, as bit masks."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in SIG_MASK_LINES:
                out[key] = int(value, 16) & STANDARD_SIGNALS
    return out


def reap(pid: int) -> int:
    return os.waitpid(pid, 0)[1]


def test_a_program_starts_with_default_signals_and_its_own_session(tmp_path):
    # the caller ignores SIGINT and SIGHUP and blocks SIGUSR1, as a shell's
    # `nohup cmd &` or Python itself (SIGPIPE) leaves a process: the program
    # gets none of it
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGHUP)}
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    try:
        pid = spawn(["sleep", "30"], os.environ, stdin=None, stdout=None, stderr=None)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])
        for s, h in old.items():
            signal.signal(s, h)
    try:
        wait_for(lambda: psutil.Process(pid).name() == "sleep", 10, "sleep to exec")
        assert proc_masks(pid) == {"SigIgn": 0, "SigBlk": 0}
        assert os.getsid(pid) == pid
    finally:
        os.kill(pid, signal.SIGKILL)
        reap(pid)


def test_stdio_is_what_the_caller_says(tmp_path):
    r, w = os.pipe()
    err = tmp_path / "err.log"
    err.write_text("old text, truncated\n")
    pid = spawn(["sh", "-c", "cat; echo out; echo err >&2"], os.environ,
                stdin=None, stdout=w, stderr=err)
    os.close(w)
    with os.fdopen(r) as out:
        assert out.read() == "out\n"  # stdin was /dev/null: cat ended at once
    assert os.waitstatus_to_exitcode(reap(pid)) == 0
    assert err.read_text() == "err\n"
    new = tmp_path / "new.log"  # created private
    pid = spawn(["true"], os.environ, stdin=None, stdout=new, stderr=None)
    assert os.waitstatus_to_exitcode(reap(pid)) == 0
    assert oct(new.stat().st_mode & 0o777) == "0o600"


def test_a_missing_program_is_an_oserror():
    with pytest.raises(FileNotFoundError):
        spawn(["no-such-program-here"], os.environ)


def test_die_with_parent_ends_the_program_with_its_parent(tmp_path):
    # a parent that starts `sleep` this way and is then killed: sleep gets
    # SIGTERM (nginx must not outlive a killed Emperor holding its port)
    pidfile = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, time
        from psgi_forkserver.spawn import spawn
        pid = spawn(["sleep", "60"], os.environ, stdin=None, stdout=None, stderr=None,
                    die_with_parent=True)
        open({str(pidfile)!r}, "w").write(str(pid))
        time.sleep(60)
    """)])
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text(), 20, "the child's pid")
        child = psutil.Process(int(pidfile.read_text()))
        wait_for(lambda: child.name() == "sleep", 10, "sleep to exec")
        assert proc_masks(child.pid) == {"SigIgn": 0, "SigBlk": 0}
    finally:
        parent.kill()
        parent.wait()
    # its parent gone, the child is re-parented (to a subreaper or init),
    # which reaps it: here it is enough that it ends
    wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 10,
             "the child to end with its parent")
