"""What a vassal reports about its requests (docs/CONTRACT.md): the
requests file of its master process in the run directory, read for the
status document, removed when the process is reaped or found gone."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import psutil

from ..rundir import run_dir


#: what a vassal reports about its requests (docs/CONTRACT.md): the file
#: RUNDIR/requests-PID of its master process, one slot per worker, each two
#: little-endian u64: requests served, their latency summed in microseconds
REQUESTS_SLOT = struct.Struct("<QQ")


def requests_path(pid: int) -> Path:
    return run_dir() / f"requests-{pid}"


def read_requests(pid: int) -> tuple[int, float | None, float] | None:
    """(requests served, average latency in ms, their latency summed in
    seconds) that process reported; None when it reports nothing."""
    try:
        with open(requests_path(pid), "rb") as f:
            data = f.read(REQUESTS_SLOT.size * 4096)
    except OSError:
        return None
    n = total_us = 0
    for off in range(0, len(data) - len(data) % REQUESTS_SLOT.size, REQUESTS_SLOT.size):
        r, us = REQUESTS_SLOT.unpack_from(data, off)
        n += r
        total_us += us
    return n, (round(total_us / n / 1000, 3) if n else None), total_us / 1e6


def forget_requests(pid: int) -> None:
    """The process was reaped: its file goes (it may have been SIGKILLed)."""
    try:
        os.unlink(requests_path(pid))
    except OSError:
        pass


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped yet."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def sweep_requests() -> int:
    """At start: the files of processes gone, which no Emperor reaped (one
    killed with -9; its vassals then die without a word). A live process's
    file stays: another Emperor's vassal, or ours from before a restart."""
    swept = 0
    try:
        names = os.listdir(run_dir())
    except OSError:
        return 0
    for name in names:
        pid = name.removeprefix("requests-")
        if name.startswith("requests-") and pid.isdigit() and _gone(int(pid)):
            try:
                os.unlink(run_dir() / name)
                swept += 1
            except OSError:
                pass
    return swept
