"""Plumbing for bench/run.py: processes, reaping, ports, HTTP polling,
memory, machine facts. No scenario logic here.

The bench process is a child subreaper (prctl 36), like the Emperor: an
adopted vassal, forked twice by the base, is reparented to us, and so is any
worker whose master died first. `Procs` therefore reaps with waitpid(-1) in
one place and remembers every status, and its `cleanup()` stops every
process this run started, by pid, whatever happened before.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from psgi_forkserver.launch import set_child_subreaper  # noqa: E402,F401  (the product's)

POLL = 0.0002  # the connect/GET retry interval: a tight loop


class BenchError(RuntimeError):
    pass


# -- processes -------------------------------------------------------------------


class Procs:
    """Every process this run starts, and the one place that reaps."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.popens: dict[int, subprocess.Popen] = {}
        self.status: dict[int, int] = {}  # reaped pid -> wait status
        self.known: set[int] = set()  # pids we started or were handed (adopted)
        self._logs: list = []

    def log_file(self, name: str):
        f = open(self.logdir / f"{name}.log", "ab")
        self._logs.append(f)
        return f

    def spawn(
        self,
        argv: Sequence[str],
        *,
        log: str,
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        cwd: str | os.PathLike[str] | None = None,
        preexec_fn=None,
    ) -> subprocess.Popen:
        out = self.log_file(log)
        p = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=tuple(pass_fds),
            cwd=cwd,
            preexec_fn=preexec_fn,
        )
        self.popens[p.pid] = p
        self.known.add(p.pid)
        return p

    def adopted(self, pid: int) -> None:
        self.known.add(pid)

    def reap(self) -> None:
        """Reap every child that has exited (ours, adopted, orphaned workers)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            self.status[pid] = status
            p = self.popens.pop(pid, None)
            if p is not None and p.returncode is None:
                p.returncode = os.waitstatus_to_exitcode(status)

    def wait(self, pid: int, timeout: float) -> bool:
        """Wait until `pid` is reaped (it must be our child). True if it was."""
        deadline = time.monotonic() + timeout
        while True:
            self.reap()
            if pid in self.status:
                return True
            if not psutil.pid_exists(pid):
                return True  # not our child after all (reaped by someone else)
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process().children(recursive=True)
        except psutil.Error:
            return []

    def tree(self, pid: int) -> list[psutil.Process]:
        try:
            p = psutil.Process(pid)
            return [p, *p.children(recursive=True)]
        except psutil.Error:
            return []

    def stop_tree(self, pid: int, sig: int = signal.SIGTERM, timeout: float = 10.0) -> bool:
        """Signal `pid`, wait for it; SIGKILL it and whatever of its tree is
        left after `timeout`. True if it stopped on the first signal."""
        tree = [p.pid for p in self.tree(pid)]
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        clean = self.wait(pid, timeout)
        left = []
        for q in tree:
            if q == pid and clean:
                continue
            try:
                if psutil.Process(q).status() != psutil.STATUS_ZOMBIE:
                    left.append(q)
            except psutil.Error:
                pass
        if left:
            # workers outliving their master get a moment, then SIGKILL
            deadline = time.monotonic() + (1.0 if clean else 0.0)
            while left and time.monotonic() < deadline:
                self.reap()
                left = [q for q in left if psutil.pid_exists(q) and q not in self.status]
                time.sleep(0.005)
            for q in left:
                try:
                    os.kill(q, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.wait(pid, 5)
        self.reap()
        return clean

    def cleanup(self) -> list[int]:
        """Stop everything this run started, by pid. Returns what had to be killed."""
        killed: list[int] = []
        for _ in range(3):
            self.reap()
            victims = [p.pid for p in self.descendants()]
            victims += [pid for pid, p in self.popens.items() if p.poll() is None]
            victims = sorted(set(victims))
            if not victims:
                break
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                self.reap()
                if not self.descendants():
                    break
                time.sleep(0.01)
        self.reap()
        for f in self._logs:
            f.close()
        return sorted(set(killed))


# -- ports and HTTP ------------------------------------------------------------------


class Ports:
    """Free 127.0.0.1 ports below the ephemeral range (so that no client
    connection of this machine holds them as its local port), never one
    twice in a run."""

    def __init__(self, low: int = 20000, high: int = 32000) -> None:
        self.low, self.high = low, high
        self.used: set[int] = set()
        self.rng = random.Random()

    def get(self) -> int:
        for _ in range(10000):
            port = self.rng.randrange(self.low, self.high)
            if port in self.used:
                continue
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            finally:
                s.close()
            self.used.add(port)
            return port
        raise BenchError("no free port")


def http_get(port: int, path: str = "/", timeout: float = 5.0, host: str | None = None) -> int | None:
    """One HTTP/1.0 GET to loopback `port` (with `Host: host` when given,
    as through the front door). The status code, or None if nothing listens
    yet (connection refused) or the connection broke."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host or f'127.0.0.1:{port}'}\r\n\r\n".encode())
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except OSError:
        return None
    finally:
        s.close()
    try:
        return int(buf.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def wait_200(port: int, timeout: float, path: str = "/", alive=None,
             host: str | None = None) -> float:
    """Poll-connect `port` and GET until 200 (with `Host: host` when given:
    through the front door); returns time.perf_counter() of the 200.
    `alive()` returning False aborts (the server died)."""
    deadline = time.perf_counter() + timeout
    what = f"{host} on port {port}" if host else f"port {port}"
    n = 0
    while True:
        if http_get(port, path, 10.0 if host else 5.0, host=host) == 200:
            return time.perf_counter()
        n += 1
        if time.perf_counter() >= deadline:
            raise BenchError(f"no HTTP 200 for {what} within {timeout:g} s")
        if alive is not None and n % 200 == 0 and not alive():
            raise BenchError(f"the server for {what} died before answering")
        time.sleep(POLL)


def wait_all_200(ports: Sequence[int], timeout: float, t0: float, path: str = "/") -> dict[int, float]:
    """Poll many ports round-robin until each answered 200 once; returns
    port -> seconds after t0 (perf_counter) of its first 200."""
    left = list(ports)
    first: dict[int, float] = {}
    deadline = t0 + timeout
    while left:
        still = []
        for port in left:
            if http_get(port, path) == 200:
                first[port] = time.perf_counter() - t0
            else:
                still.append(port)
        left = still
        if left:
            if time.perf_counter() >= deadline:
                raise BenchError(f"{len(left)} of {len(ports)} vassals not answering after {timeout:g} s")
            time.sleep(0.001)
    return first


# -- memory ----------------------------------------------------------------------------


def pss_of(procs: Sequence[psutil.Process]) -> tuple[int, int, int]:
    """(total PSS, total USS, process count) in bytes, of processes still alive."""
    pss = uss = n = 0
    for p in procs:
        try:
            m = p.memory_full_info()
        except psutil.Error:
            continue
        pss += m.pss
        uss += m.uss
        n += 1
    return pss, uss, n


# -- statistics -------------------------------------------------------------------------


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100), the usual definition for p99."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(1, -(-len(s) * q // 100))  # ceil(n*q/100), at least 1
    return s[int(k) - 1]


def summary(xs: Sequence[float]) -> dict:
    if not xs:
        return {"n": 0}
    return {
        "n": len(xs),
        "p50": statistics.median(xs),
        "p99": percentile(xs, 99),
        "min": min(xs),
        "max": max(xs),
        "mean": statistics.fmean(xs),
    }


# -- machine -------------------------------------------------------------------------------


def _cmd(argv: Sequence[str]) -> str:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    return (r.stdout.strip() or r.stderr.strip()).splitlines()[0] if (r.stdout or r.stderr) else ""


def machine_info() -> dict:
    import platform
    import sys

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "uname": " ".join(os.uname()),
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "loadavg_at_start": os.getloadavg(),
        "versions": {
            "python": sys.version.split()[0],
            "psutil": psutil.__version__,
            "perl": _cmd(["perl", "-e", "print $^V"]),
            "plack": _cmd(["perl", "-MPlack", "-e", "print $Plack::VERSION"]),
            "starman": _cmd(["perl", "-MStarman", "-e", "print $Starman::VERSION"]),
            "uwsgi": _cmd(["uwsgi", "--version"]),
            "wrk": _cmd(["wrk", "-v"]),
            "platform": platform.platform(),
        },
    }


def read_or_none(path: str) -> str | None:
    """A /proc file's text, None once the process is gone."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def tempdir() -> Path:
    # short: UNIX socket paths are limited to 108 bytes
    return Path(tempfile.mkdtemp(prefix="psgi-fs-bench-", dir="/tmp"))


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """`sig` to a process this bench started, then SIGKILL if it has not
    exited within `timeout`; reaped either way."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
