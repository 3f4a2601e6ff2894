"""The memory of the vassals' process trees: each process's children
(from the kernel, only the trees asked for), and PSS/USS per process
(psutil's memory_full_info), reused for MEASURE_INTERVAL whatever the
number of documents asking."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import psutil

MEASURE_INTERVAL = 1.0  # seconds a process's memory figures are reused


@dataclass
class _Measured:
    """What was measured lately, shared by the collections of one process
    (the Emperor): pid -> (when, pss, uss, counted)."""

    memory: dict[int, tuple[float, int, int, int]] = field(default_factory=dict)
    pruned_at: float = 0.0

    def tree_map(self, now: float) -> "dict[int, list[int]] | _Children":
        """The process trees, read now: each process's children as asked
        (/proc/PID/task/TID/children), else one pass over all of /proc."""
        if now - self.pruned_at >= MEASURE_INTERVAL:
            # what is older than the interval will be measured again anyway
            self.memory = {p: m for p, m in self.memory.items() if now - m[0] < MEASURE_INTERVAL}
            self.pruned_at = now
        return _Children() if _HAS_CHILDREN_FILES else _ppid_map()

    def process(self, pid: int, now: float) -> tuple[int, int, int, bool]:
        """(pss, uss, counted, measured now)."""
        m = self.memory.get(pid)
        if m is not None and now - m[0] < MEASURE_INTERVAL:
            return m[1], m[2], m[3], False
        pss, uss, n = _memory([pid])
        self.memory[pid] = (now, pss, uss, n)
        return pss, uss, n, True


_measured = _Measured()


def tree_map(now: float) -> "dict[int, list[int]] | _Children":
    """The process trees, read now (the Emperor's measures' shared state)."""
    return _measured.tree_map(now)


def measure(pid: int, now: float) -> tuple[int, int, int, bool]:
    """A process's (pss, uss, counted, measured now): measured again only
    after MEASURE_INTERVAL."""
    return _measured.process(pid, now)


_HAS_CHILDREN_FILES = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


class _Children(dict):
    """pid -> its children, read from the kernel when first asked: only the
    Emperor's own trees are read, not every process of the machine (a
    busy machine has thousands)."""

    def get(self, pid: int, default: Any = None) -> list[int]:  # type: ignore[override]
        if pid not in self:
            self[pid] = _children_of(pid)
        return self[pid]


def _children_of(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return out


def _ppid_map() -> dict[int, list[int]]:
    """ppid -> children pids, from one pass over /proc (cheaper than psutil's
    children() per vassal, which rescans /proc every time)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for e in entries:
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat", "rb") as f:
                data = f.read()
            ppid = int(data[data.rindex(b")") + 2 :].split(None, 2)[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(e))
    return children


def process_tree(pid: int, children: dict[int, list[int]]) -> list[int]:
    out, todo, seen = [], [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def _memory(pids: list[int]) -> tuple[int, int, int]:
    """(pss, uss, processes counted) over `pids`; vanished ones are skipped."""
    pss = uss = n = 0
    for pid in pids:
        try:
            m = psutil.Process(pid).memory_full_info()
        except (psutil.Error, OSError):
            continue
        pss += getattr(m, "pss", 0)
        uss += m.uss
        n += 1
    return pss, uss, n
