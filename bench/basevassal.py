"""A base vassal of our own, no Emperor: `ForkServer.pm --early-psgi APP
--fork-server SOCK` with an Emperor pipe, and what adopts from it."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import psutil

from psgi_forkserver import adoption
from psgi_forkserver.procfs import spare_of
from benchlib import BenchError, Procs
from settings import PROGRAM, say


# malloc's heap in 2 MB pages from the start (the operator's opt-in,
# GLIBC_TUNABLES=glibc.malloc.hugetlb=1, perl/ForkServer/Base/HugePages.pm;
# bench/compare.py --huge-heap). Not the Emperor's default: side by side,
# 1,000 heavy vassals answered in 20.91 s with it against 11.42 s without.
HUGE_HEAP = False


def huge_heap_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with the huge-page heap tunable among its GLIBC_TUNABLES (a
    hugetlb setting of the caller's own is kept)."""
    env = dict(env)
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.startswith("glibc.malloc.hugetlb=") for t in tunables):
        env["GLIBC_TUNABLES"] = ":".join([*tunables, "glibc.malloc.hugetlb=1"])
    return env


class Base:
    """`ForkServer.pm --early-psgi APP --fork-server SOCK` with an Emperor pipe."""

    def __init__(self, procs: Procs, app: str, sock: Path, log: str, extra: tuple[str, ...] = ()) -> None:
        self.procs, self.sock, self.extra = procs, sock, extra
        self.pipe, theirs = socket.socketpair()
        env = {**os.environ, "UWSGI_EMPEROR_FD": str(theirs.fileno())}
        env.pop("UWSGI_EMPEROR_FD_CONFIG", None)
        if HUGE_HEAP:
            env = huge_heap_env(env)
        t0 = time.perf_counter()
        self.proc = procs.spawn(
            ["perl", PROGRAM, "--early-psgi", app, "--fork-server", str(sock), *extra],
            log=log, env=env, pass_fds=[theirs.fileno()],
        )
        theirs.close()
        self.pipe.settimeout(120)
        byte = self.pipe.recv(1)
        if byte != b"\x01":
            raise BenchError(f"base vassal for {app}: expected byte 1, got {byte!r} (see {log}.log)")
        self.ready_s = time.perf_counter() - t0

    def adopt(self, args: list[str], listener: socket.socket | None = None) -> tuple[int, socket.socket, float, float]:
        """One adoption (with `listener` as its descriptor 0, as `emperor run`
        passes the socket it bound); returns (pid, our end of its pipe, t0,
        t_pid) (perf_counter)."""
        ours, theirs = socket.socketpair()
        t0 = time.perf_counter()
        try:
            pid = adoption.adopt(self.sock, [PROGRAM, *args], theirs.fileno(),
                                 on_demand_fd=listener.fileno() if listener is not None else None)
        finally:
            theirs.close()
        t_pid = time.perf_counter()
        self.procs.adopted(pid)
        return pid, ours, t0, t_pid

    def spares(self) -> int:
        """fork-server-spares as given to this base (the option's default otherwise)."""
        a = self.extra
        return int(a[a.index("--fork-server-spares") + 1]) if "--fork-server-spares" in a else 2

    def warm_spares(self) -> set[int]:
        """The base's spares that an adoption can take now (their title says
        warm; procfs.spare_of): our children, since we are the base's parent."""
        return {p.pid for p in psutil.Process().children() if spare_of(p.pid, ready=True) == self.proc.pid}

    def wait_spares(self, k: int, timeout: float = 60) -> set[int]:
        deadline = time.perf_counter() + timeout
        while len(warm := self.warm_spares()) < k:
            if time.perf_counter() > deadline:
                raise BenchError(f"only {len(warm)} of {k} spares warm after {timeout:g} s")
            self.procs.reap()
            time.sleep(0.002)
        return warm

    def stop(self) -> None:
        self.pipe.close()  # end of file: the base closes its socket and exits
        if not self.procs.wait(self.proc.pid, 20):
            self.procs.stop_tree(self.proc.pid, signal.SIGKILL, 5)
        if self.sock.exists():
            say(f"  note: base left its socket {self.sock} behind")


def stop_adopted(procs: Procs, pid: int, pipe: socket.socket) -> None:
    pipe.close()  # end of file on its Emperor pipe: graceful stop
    if not procs.wait(pid, 15):
        procs.stop_tree(pid, signal.SIGKILL, 5)
    procs.reap()


def wait_loyal(pipe: socket.socket, timeout: float) -> bool:
    """Read the vassal's bytes until 17 (all workers accept)."""
    pipe.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            data = pipe.recv(64)
            if not data:
                return False
            if 17 in data:
                return True
    except OSError:
        return False
    return False
