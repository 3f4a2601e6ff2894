"""Who used the cores in a mass start: the CPU of each part of an Emperor's
fleet (bench/burst_timeline.py, the `thousand` scenario's profile row)."""

from __future__ import annotations

from benchlib import read_or_none


def cpu_of(pid: int) -> float | None:
    """Seconds on a core the process spent so far, itself only (schedstat:
    nanoseconds, where stat's ticks round a vassal's few ms to 0 or 10)."""
    sched = read_or_none(f"/proc/{pid}/schedstat")
    return int(sched.split()[0]) / 1e9 if sched else None


def children_of(pid: int) -> list[int]:
    return [int(k) for k in (read_or_none(f"/proc/{pid}/task/{pid}/children") or "").split()]


def base_of(emperor: int) -> int | None:
    """The Emperor's base (its title says fork server; a spare has it only
    briefly, and is younger)."""
    found = [k for k in children_of(emperor)
             if "(fork server)" in (read_or_none(f"/proc/{k}/cmdline") or "")]
    return min(found) if found else None


def fleet_cpu(emperor: int, base: int | None) -> dict[str, tuple[int, float]]:
    """(processes, CPU seconds) of each part of the fleet: the Emperor, the
    base, the vassals' first processes (children of the Emperor: the base
    clones them as its siblings) and their children (the workers), the
    base's warm spares still waiting (their workers not counted)."""
    out = {"Emperor": (1, cpu_of(emperor) or 0.0)}
    tops, below, spares = [], [], []
    for k in children_of(emperor):
        if k == base:
            out["base"] = (1, cpu_of(k) or 0.0)
            continue
        if "(spare of" in (read_or_none(f"/proc/{k}/cmdline") or ""):  # waiting, not adopted
            spares.append(cpu_of(k))
            continue
        tops.append(cpu_of(k))
        below += [cpu_of(g) for g in children_of(k)]
    out["vassals' first processes"] = (len(tops), sum(t or 0.0 for t in tops))
    out["their children (workers)"] = (len(below), sum(t or 0.0 for t in below))
    out["waiting spares"] = (len(spares), sum(t or 0.0 for t in spares))
    return out
