"""What /proc says about processes: children and sessions, a spare's base, a
name, the CPUs this one may use.

Read by the Emperor's orphan sweep (emperor/orphans.py), the status (which
process is a base's warm spare) and the benchmarks; no signal is sent here.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass


_SPARE = re.compile(rb"\Apsgi-vassal .* \(spare of (\d+)(, warming)?\)\Z")


def spare_of(pid: int, proc: str = "/proc", ready: bool = False) -> int | None:
    """The pid of the base whose warm spare this process is (its title,
    set by perl/ForkServer/Spares.pm until an adoption makes it a vassal),
    or None (with `ready`: only once it is warm). A spare leads its own session, like any vassal process, so
    before its adoption its session is no vassal's: it is not a stranger."""
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            title = f.read().rstrip(b"\0 ")
    except OSError:
        return None
    m = _SPARE.match(title)
    return int(m.group(1)) if m and not (ready and m.group(2)) else None


@dataclass
class ProcScan:
    children: dict[int, int]  # the parent's children: pid -> session id
    sessions: set[int]  # every session id that has a process, system-wide


def scan_proc(parent: int, proc: str = "/proc") -> ProcScan:
    """One pass over /proc/PID/stat: the direct children of `parent` with
    their session ids, and every session that has a member.

    (Linux's /proc/PID/task/TID/children would list the children alone, but
    it needs CONFIG_PROC_CHILDREN, and the session set is needed anyway.)
    """
    children: dict[int, int] = {}
    sessions: set[int] = set()
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"{proc}/{entry.name}/stat", "rb") as f:
                data = f.read()
        except OSError:  # exited meanwhile; or out of descriptors: seen next time
            continue
        # comm, in parentheses, may hold spaces and ')': split after the last one
        fields = data.rpartition(b")")[2].split(None, 4)
        if len(fields) < 4:
            continue
        ppid, sid = int(fields[1]), int(fields[3])
        sessions.add(sid)
        if ppid == parent:
            children[int(entry.name)] = sid
    return ProcScan(children, sessions)


def comm(pid: int) -> str:
    """A process's command name, for a log line; '?' if it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def usable_cpus(proc: str = "/proc", affinity: int | None = None) -> int:
    """The CPUs this process may use: its affinity (`affinity` given: that
    many), lowered by the smallest CPU quota on its cgroup or an ancestor's
    (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`), rounded up: a container
    limited to 1.5 CPUs on a 64-CPU host counts 2. (Python's
    os.process_cpu_count, 3.13, counts the affinity alone.)"""
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            affinity = os.cpu_count() or 1
    quotas = [q for d in _cpu_cgroup_dirs(proc) if (q := _quota(d)) is not None]
    return max(1, min([affinity, *(math.ceil(q) for q in quotas)]))


def _cpu_cgroup_dirs(proc: str) -> list[str]:
    """The directories of this process's cgroup and of every ancestor up to
    the mount, in each hierarchy that may hold a CPU quota."""
    try:
        with open(f"{proc}/self/cgroup") as f:
            lines = f.read().splitlines()
        with open(f"{proc}/self/mountinfo") as f:
            mounts = f.read().splitlines()
    except OSError:
        return []
    paths = {}  # "" (v2) or a v1 controller list -> the process's cgroup path
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) == 3:
            paths[fields[1]] = fields[2]
    dirs: list[str] = []
    for m in mounts:
        left, _, right = m.partition(" - ")
        fields, kind = left.split(), right.split()
        if len(fields) < 5 or len(kind) < 3:
            continue
        root, point = fields[3], fields[4].replace("\\040", " ")
        if kind[0] == "cgroup2":
            path = paths.get("")
        elif kind[0] == "cgroup" and "cpu" in kind[2].split(","):
            path = next((p for c, p in paths.items() if "cpu" in c.split(",")), None)
        else:
            continue
        if path is None or not (path + "/").startswith(root.rstrip("/") + "/"):
            continue
        rel = path[len(root.rstrip("/")):].strip("/")
        parts = rel.split("/") if rel else []
        dirs += [os.path.join(point, *parts[:i]) for i in range(len(parts), -1, -1)]
    return dirs


def _quota(cgroup_dir: str) -> float | None:
    """The CPUs' worth a cgroup's quota allows, None for no quota."""
    try:
        with open(os.path.join(cgroup_dir, "cpu.max")) as f:
            quota, _, period = f.read().partition(" ")
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        pass
    try:
        with open(os.path.join(cgroup_dir, "cpu.cfs_quota_us")) as f:
            quota_us = int(f.read())
        with open(os.path.join(cgroup_dir, "cpu.cfs_period_us")) as f:
            period_us = int(f.read())
        return None if quota_us < 0 else quota_us / period_us
    except (OSError, ValueError, ZeroDivisionError):
        return None
