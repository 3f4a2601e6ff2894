"""The guard: a fork of the Emperor, outside the vassals' cgroup subtree,
that kills the subtree when the Emperor dies without saying goodbye
(kill -9). Its whole life is reading a pipe whose other end only the
Emperor holds (why and when: cgroups.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from .cgroup_tree import kill_tree, populated

#: the guard lets a dead Emperor's vassals stop on their own this long (a
#: vassal stops what is left in its session 2 s after its pipe's end)
GUARD_GRACE = 3.0
_GOODBYE = b"q"


def _guard(read_fd: int, root: Path, record: Path | None) -> None:
    """The guard's whole life (in a fork of the Emperor): wait for the end
    of the pipe; without the goodbye byte, kill the subtree."""
    # a session of its own: no signal to the Emperor's terminal or process
    # group reaches it, and nothing counts it among the Emperor's session
    with contextlib.suppress(OSError):
        os.setsid()
    try:
        signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        pass
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.closerange(0, read_fd)
    os.closerange(read_fd + 1, 1 << 20)
    devnull = os.open(os.devnull, os.O_RDWR)  # 0, 1, 2: nothing of the Emperor's
    for fd in (1, 2):
        if devnull != fd:
            os.dup2(devnull, fd)
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, b"pfs-cgroup-guard", 0, 0, 0)  # PR_SET_NAME
    except Exception:  # noqa: BLE001 - a name is a nicety
        pass
    last = b""
    while True:
        try:
            data = os.read(read_fd, 64)
        except InterruptedError:
            continue
        except OSError:
            break
        if not data:
            break
        last = data[-1:]
    if last != _GOODBYE:  # the Emperor died without a word
        # its vassals see end of file on their pipes too and stop on their
        # own (a base removes its socket, a vassal stops its session): they
        # get that long before the kill takes what is left (setsid helpers)
        deadline = time.monotonic() + GUARD_GRACE
        while populated(root) and time.monotonic() < deadline:
            time.sleep(0.05)
        kill_tree(root)
        if record is not None:
            with contextlib.suppress(OSError):
                os.unlink(record)


def start_guard(root: Path, record: Path | None) -> tuple[int | None, int]:
    """The guard started: its pid, and the pipe's end the Emperor keeps.
    Forked twice, before the Emperor becomes a subreaper: the guard is no
    child of the Emperor (its children are vassals, and a count of them
    stays one), and outlives it in a session of its own."""
    r, w = os.pipe()  # both O_CLOEXEC: no vassal inherits them
    told_r, told_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(w)
            os.close(told_r)
            guard = os.fork()
            if guard == 0:
                os.close(told_w)
                _guard(r, root, record)
            else:
                os.write(told_w, str(guard).encode())
        finally:
            os._exit(0)
    os.close(r)
    os.close(told_w)
    with os.fdopen(told_r, "rb") as told:
        said = told.read()
    os.waitpid(pid, 0)
    return (int(said) if said.strip().isdigit() else None), w


def say_goodbye(fd: int) -> None:
    """The goodbye byte, and the pipe closed: the guard exits without a kill."""
    with contextlib.suppress(OSError):
        os.write(fd, _GOODBYE)
    os.close(fd)
