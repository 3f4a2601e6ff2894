"""Shared helpers for tests that start real processes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil
from xprocess import ProcessStarter

T = TypeVar("T")


def wait_for(cond: Callable[[], T], timeout: float = 15.0, what: str = "condition",
              interval: float = 0.02) -> T:
    """Poll `cond` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - reported on timeout
            last_exc = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}"
                                 + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


EMPEROR = str(Path(sys.executable).parent / "emperor")


class EmperorLog:
    """What an Emperor started by `start_emperor` logged (needs `.log`)."""

    log: Path
    _PID = r"emperor: \[{name}\] (?:adopted (?:successor )?pid|started \w+ vassal, pid) (\d+)"

    def text(self) -> str:
        # xprocess appends every run of the same name to one file
        return Path(self.log).read_text(errors="replace").split("@@__xproc_block_delimiter__@@")[-1]

    def lines(self, needle: str) -> list[str]:
        return [line for line in self.text().splitlines() if needle in line]

    def vpids(self, name: str) -> list[int]:
        """Every pid the Emperor logged for this vassal, oldest first."""
        pat = re.compile(self._PID.format(name=re.escape(name)))
        return [int(m) for m in pat.findall(self.text())]

    def vpid(self, name: str, timeout: float = 15.0) -> int:
        """The vassal's latest pid. Waits for it: a vassal may answer HTTP
        before the Emperor has read its adoption reply and logged it."""
        try:
            return wait_for(lambda: self.vpids(name), timeout, f"a pid logged for {name}")[-1]
        except AssertionError as e:
            raise AssertionError(f"{e}:\n{self.text()}") from None


@dataclass
class RunningEmperor(EmperorLog):
    pid: int
    popen: subprocess.Popen
    log: Path


def start_emperor(xprocess, name: str, args: list, env: dict | None = None,
                  nofile: tuple[int, int] | None = None,
                  groups: list[int] | None = None) -> RunningEmperor:
    """`emperor run ARGS...` under pytest-xprocess, once it logs that it watches.

    `nofile`: the (soft, hard) RLIMIT_NOFILE the Emperor starts with;
    `groups`: its supplementary groups (as root). Both are set by a Python
    that then execs it (xprocess owns the Popen's preexec_fn)."""

    # one xprocess directory per name: pytest-xdist's workers each get their own
    name = f"{name}-{os.environ.get('PYTEST_XDIST_WORKER', 'solo')}"
    argv = [EMPEROR, "run", *map(str, args)]
    if nofile is not None or groups is not None:
        argv = [sys.executable, "-c",
                "import os, resource, sys; "
                + (f"resource.setrlimit(resource.RLIMIT_NOFILE, {tuple(nofile)!r}); " if nofile else "")
                + (f"os.setgroups({list(groups)!r}); " if groups is not None else "")
                + "os.execv(sys.argv[1], sys.argv[1:])", *argv]
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}

    class Starter(ProcessStarter):
        pattern = 'emperor: watching|"message": "watching'  # --log-format text or json
        timeout = 20
        terminate_on_interrupt = True
        args = argv
        env = environ
    pid, log = xprocess.ensure(name, Starter, restart=True)
    popen = next(r.popen for r in reversed(xprocess.resources) if r.popen and r.popen.pid == pid)
    return RunningEmperor(pid, popen, Path(log))


def stop_emperor(e: RunningEmperor) -> None:  # or anything with .pid and .popen
    """SIGTERM, wait for its exit (SIGKILL after 20 s), then SIGKILL any
    descendant that outlived it (there should be none; tests check that)."""
    left = descendants(e.pid)
    if e.popen.poll() is None:
        os.kill(e.pid, signal.SIGTERM)
        try:
            e.popen.wait(20)
        except subprocess.TimeoutExpired:
            e.popen.kill()
            e.popen.wait()
    kill_all([p for p in left if alive(p)])
