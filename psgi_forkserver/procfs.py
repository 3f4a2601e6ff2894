"""What /proc says about processes: children and sessions, a spare's base, a name.

Read by the Emperor's orphan sweep (emperor/orphans.py), the status (which
process is a base's warm spare) and the benchmarks; no signal is sent here.
"""

from __future__ import annotations

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
