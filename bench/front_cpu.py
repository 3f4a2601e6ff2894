"""Where the CPU of a request goes, for the front door's serving rows: one
wrk run with the CPU time consumed meanwhile by wrk itself, by nginx, by
the vassal's processes, by the Emperor and by everything else on the
machine, each per request.

On a machine whose cores are all busy (wrk is a closed loop: it sends
the next request when the last one is answered), requests per second are
about cores / (CPU a request costs, all processes together), so the ratio
through nginx / direct is about (wrk + vassal) / (wrk + nginx + vassal),
each per request; these figures say which part a change moved, where the
rates alone, on a shared machine, move by more than the change.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field

import psutil

TICK = os.sysconf("SC_CLK_TCK")


def _runtime_ns(pid: int) -> int | None:
    """Nanoseconds one process has run on a CPU, summed over its threads
    (/proc/PID/task/TID/schedstat; None if gone). Not utime + stime of
    /proc/PID/stat: those are clock ticks (10 ms), and 2 s of nginx at a
    few thousand requests a second is only some 20 of them, so a tick more
    or less moved a request's CPU by 5%."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return total


def _sched(pid: int) -> tuple[int, int]:
    """(ns spent runnable but waiting for a CPU, times preempted) of a
    process, summed over its threads: how much the kernel kept it off
    the CPU while it had work (/proc/PID/task/TID/schedstat, status)."""
    wait = preempted = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                wait += int(f.read().split()[1])
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("nonvoluntary_ctxt_switches:"):
                        preempted += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return wait, preempted


def _machine_busy() -> tuple[int, int]:
    """(busy, total) ticks of every CPU since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    idle = cpu[3] + cpu[4]  # idle + iowait
    total = sum(cpu[:8])  # guest time is counted in user already
    return total - idle, total


@dataclass
class Groups:
    """Processes of interest by role: fixed pids, plus, when `emperor` is
    given, every nginx and psgi-vassal process under it, listed again at
    each sample (a vassal's second worker, a restarted one, come later)."""

    roles: dict[str, list[int]] = field(default_factory=dict)
    emperor: psutil.Process | None = None

    @classmethod
    def under_emperor(cls, emperor: psutil.Process) -> "Groups":
        return cls({"nginx": [], "vassal": [], "emperor": [emperor.pid]}, emperor)

    def pids(self) -> dict[str, set[int]]:
        out = {role: set(pids) for role, pids in self.roles.items()}
        if self.emperor is None:
            return out
        try:
            kids = self.emperor.children(recursive=True)
        except psutil.Error:
            kids = []
        for p in kids:
            try:
                name = p.name()
            except psutil.Error:
                continue
            if name == "nginx":
                out.setdefault("nginx", set()).add(p.pid)
            elif name.startswith("psgi-vassal"):
                out.setdefault("vassal", set()).add(p.pid)
        return out

    def sample(self) -> dict[str, dict[int, int]]:
        """Per role, each process's CPU nanoseconds so far."""
        return {role: {pid: t for pid in pids if (t := _runtime_ns(pid)) is not None}
                for role, pids in self.pids().items()}

    def waits(self) -> dict[str, dict[int, tuple[int, int]]]:
        """Per role, each process's (ns waiting for a CPU while runnable,
        preemptions) so far."""
        return {role: {pid: _sched(pid) for pid in pids} for role, pids in self.pids().items()}


def _grown(before: dict[int, int], after: dict[int, int]) -> int:
    """What the processes consumed between two samples: a process that
    came meanwhile counts whole, one that went is lost (its last ticks
    unknown)."""
    return sum(t - before.get(pid, 0) for pid, t in after.items())


def _latency_ms(out: str, q: str) -> float | None:
    m = re.search(rf"^\s*{q}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else None


def wrk_measured(url: str, duration: str, groups: Groups, host: str | None = None,
                 threads: int = 2, conns: int = 16) -> dict:
    """One `wrk --latency` run: requests/s, p50/p99, and CPU microseconds
    per request of wrk (its own rusage), of each role in `groups`, and of
    the rest of the machine (busy time nobody of ours consumed: other
    people's work, which takes cores from all of ours)."""
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}", "--latency"]
    if host:
        argv += ["-H", f"Host: {host}"]
    argv.append(url)
    load = os.getloadavg()[0]
    before, (busy0, total0), waits0 = groups.sample(), _machine_busy(), groups.waits()
    t0 = time.perf_counter()
    out, wrk_cpu, wrk_preempted = _run_with_rusage(argv)
    wall = time.perf_counter() - t0
    after, (busy1, total1), waits1 = groups.sample(), _machine_busy(), groups.waits()
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    n = int(total.group(1)) if total else 0
    res: dict = {"rps": float(m.group(1)) if m else None, "requests": n,
                 "p50_ms": _latency_ms(out, "50"), "p99_ms": _latency_ms(out, "99"),
                 "errors": sum(map(int, errors.groups())) if errors else 0,
                 "non_2xx": int(non2xx.group(1)) if non2xx else 0,
                 "load": round(load, 1), "wall_s": round(wall, 2), "command": shlex.join(argv),
                 "output": None if m else out}
    if not n:
        return res
    grown = {role: _grown(before.get(role, {}), after[role]) for role in after}
    us = {role: grown[role] / 1e3 / n for role in after}
    if wrk_cpu is not None:
        us["wrk"] = wrk_cpu * 1e6 / n
    ours = sum(grown.values()) / 1e9 + (wrk_cpu or 0)
    machine = (busy1 - busy0) / TICK
    us["others"] = max(0.0, machine - ours) * 1e6 / n
    res["cpu_us"] = {k: round(v, 1) for k, v in us.items()}
    # the kernel's part of the latency: time each role's processes were
    # ready to run but had no CPU, and how often they were preempted,
    # per request (wrk: preemptions only, from its rusage)
    for i, key, scale in ((0, "wait_us", 1e-3), (1, "preempted_per_1k", 1000)):
        res[key] = {r: round(sum(v[i] - waits0.get(r, {}).get(pid, (0, 0))[i]
                                 for pid, v in waits1[r].items()) * scale / n, 1) for r in waits1}
    res["preempted_per_1k"]["wrk"] = round(wrk_preempted * 1000 / n, 1)
    # cores busy meanwhile: ours, and everyone else's
    res["cores_ours"] = round(ours / wall, 2)
    res["cores_others"] = round(max(0.0, machine - ours) / wall, 2)
    res["cores"] = round((total1 - total0) / TICK / wall, 2)
    return res


def _run_with_rusage(argv: list[str]) -> tuple[str, float, int]:
    """Run argv to its end: (its output, the CPU seconds it consumed, the
    times it was preempted),
    reaped by wait4 here rather than by Popen, which drops the rusage
    (RUSAGE_CHILDREN would mix in every other child reaped meanwhile)."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert p.stdout is not None
    out = p.stdout.read().decode(errors="replace")
    p.stdout.close()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return out, ru.ru_utime + ru.ru_stime, ru.ru_nivcsw
