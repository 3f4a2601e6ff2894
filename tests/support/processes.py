"""Waiting with a deadline, ports, and the processes a test starts or
inherits: alive or not, descendants, zombies, reaping as a subreaper."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

import psutil

T = TypeVar("T")


#: wait_for's default polling: every 20 ms at first, each pause a quarter
#: longer than the last up to a tenth of a second. Most conditions hold
#: within a few polls; a long wait (a fleet starting, a deploy) then asks
#: five times less often: each poll costs CPU on both sides (a status
#: document built, a log read whole, a request served), and the tests'
#: polls were a large part of a run's.
POLL_FIRST, POLL_GROWTH, POLL_MAX = 0.02, 1.25, 0.1


def wait_for(cond: Callable[[], T], timeout: float = 15.0, what: str = "condition",
             interval: float | None = None) -> T:
    """Poll `cond` until it returns something truthy; fail after `timeout`.
    `interval`: a fixed pause between polls instead of the growing one."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    pause = POLL_FIRST if interval is None else interval
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - reported on timeout
            last_exc = e
        now = time.monotonic()
        if now >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}"
                                 + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(min(pause, deadline - now))
        if interval is None:
            pause = min(pause * POLL_GROWTH, POLL_MAX)


# Ports a test writes into a vassal file are bound later, by another
# process: a port the kernel handed out free (bind to 0) could be handed to
# a test of another pytest-xdist worker meanwhile, and one vassal then
# answered on the other's port. So each worker takes its own range, below
# the ephemeral one (no client connection holds them as its local port),
# never one twice.
_PORT_LOW, _PORT_RANGE = 20000, 3000
_ports_given: set[int] = set()


def free_port() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    low = _PORT_LOW + (int(worker) if worker.isdigit() else 0) % 4 * _PORT_RANGE
    start = (os.getpid() * 7919 + len(_ports_given)) % _PORT_RANGE
    for i in range(_PORT_RANGE):
        port = low + (start + i) % _PORT_RANGE
        if port in _ports_given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ports_given.add(port)
        return port
    raise RuntimeError(f"no free port left in {low}-{low + _PORT_RANGE - 1}")


def alive(proc: psutil.Process) -> bool:
    """True while the process (same pid, same start time) exists and is not a zombie."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            if p.is_running():
                p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def spare_pids(emperor: int) -> set[int]:
    """The warm spares of the Emperor's bases and their workers (they come
    and go as adoptions take them: perl/ForkServer/Spares.pm)."""
    from psgi_forkserver.procfs import spare_of

    out: set[int] = set()
    try:
        for p in psutil.Process(emperor).children():
            if spare_of(p.pid) is not None:
                out.add(p.pid)
                out.update(c.pid for c in p.children())
    except psutil.Error:
        pass
    return out


def set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    assert libc.prctl(36, 1 if on else 0, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER


def reap_reparented() -> bool:
    """As subreaper, reap whatever came to us and exited, including
    processes born after a snapshot of the tree (a base's new spare).
    True once no vassal process (base, spare, vassal, worker) is our child."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    left = []
    for p in psutil.Process().children():
        try:
            if p.cmdline()[:1] and p.cmdline()[0].startswith("psgi-vassal"):
                left.append(p)
        except psutil.Error:
            pass
    return not left


def zombies_under(pid: int) -> list[psutil.Process]:
    """Zombies among the children of `pid` (the Emperor, the test)."""
    try:
        kids = psutil.Process(pid).children(recursive=pid == os.getpid())
    except psutil.NoSuchProcess:
        return []
    out = []
    for k in kids:
        try:
            if k.status() == psutil.STATUS_ZOMBIE:
                out.append(k)
        except psutil.NoSuchProcess:
            pass
    return out


def assert_no_zombies(e, timeout: float = 5.0) -> None:
    """A child of the Emperor `e` (anything with a .pid) may be a zombie for
    the moment between its exit and the Emperor's SIGCHLD turn; none may
    stay one."""
    try:
        since = psutil.Process(e.pid).create_time()
    except psutil.NoSuchProcess:
        since = 0.0

    def ours(z: psutil.Process) -> bool:
        # a zombie of the test process older than this Emperor is an earlier
        # test file's (pytest-xdist runs several files in one process)
        try:
            return z.pid != e.pid and z.create_time() >= since
        except psutil.NoSuchProcess:
            return False

    def none_left():
        return not zombies_under(e.pid) and not [z for z in zombies_under(os.getpid()) if ours(z)]
    try:
        wait_for(none_left, timeout, "no zombie left")
    except AssertionError:
        zs = zombies_under(e.pid) + [z for z in zombies_under(os.getpid()) if ours(z)]
        info = []
        for z in zs:
            try:
                info.append((z.pid, z.ppid(), open(f"/proc/{z.ppid()}/cmdline", "rb").read()))
            except Exception as ex:  # noqa: BLE001
                info.append((z.pid, repr(ex)))
        raise AssertionError(f"zombies: {info}") from None


def unix_peers() -> dict[int, int]:
    """inode -> peer inode of every connected UNIX socket (from `ss`)."""
    out = subprocess.run(["ss", "-xanH"], capture_output=True, text=True, check=True).stdout
    peers = {}
    for line in out.splitlines():
        f = line.split()
        # Netid State Recv-Q Send-Q Local Port Peer Port
        if len(f) >= 8 and f[5].isdigit() and f[7].isdigit():
            peers[int(f[5])] = int(f[7])
    return peers
