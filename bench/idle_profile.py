#!/usr/bin/env python3
"""Why an idle Emperor wakes: counted, not sampled.

    .venv/bin/python bench/idle_profile.py N [heavy|hello] [--windows K] [--seconds S]
                                             [--strace S] [--hold FILE] [-- EMPEROR ARGS...]
    .venv/bin/python bench/idle_profile.py --pids PID,PID... [--windows K] [--seconds S]

`emperor run` (soft RLIMIT_NOFILE 1,024) on N vassals of the app, each
answering `/hello`; once all answer and 2 s have passed, K windows of S
seconds each (default 3 x 10 s): the Emperor's CPU (user / system, from
/proc/PID/stat), its wake-ups (voluntary context switches, per thread),
and what all the processes under it did meanwhile (CPU, wake-ups: do the
vassals or the base wake up while idle?). With `--strace S`, then `strace
-c -f` of the Emperor for S seconds (its system calls by count) and
`strace -f -tt` for S seconds more (each wake-up: which descriptors were
ready, summarised). With `--hold FILE`, the fleet is kept until FILE is
removed (its first line: the Emperor's pid), to look at by hand. With
`--pids`, Emperors already running (held fleets, the code before and after
side by side) are measured over the same windows, one line each.

A sampling profiler sees an idle process in `epoll_wait` and nothing else;
the wake-ups and the CPU between them are what cost. Loads the two cores
for half a minute to start 1,000 heavy vassals: run it rarely. With
`PYTHONPATH=OLD` (`git archive REV psgi_forkserver | tar -x -C OLD`) the
Emperor runs the Python code of another commit.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from benchlib import Procs, read_or_none as _read, rmtree, set_child_subreaper, tempdir, wait_all_200  # noqa: E402
from emperor_run import start_fleet, wait_fork_server  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid: int) -> tuple[float, float] | None:
    """(user, system) seconds of a process, all its threads."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    f = stat[stat.rindex(")") + 2:].split()
    return int(f[11]) / TICK, int(f[12]) / TICK


def on_cpu(pid: int) -> float:
    """Seconds on a core of all its threads (/proc/PID/task/*/schedstat: in
    nanoseconds, where /proc/PID/stat counts 10 ms ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        sched = _read(f"/proc/{pid}/task/{tid}/schedstat")
        if sched:
            total += int(sched.split()[0])
    return total / 1e9


def switches(path: str) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of /proc/PID or /proc/PID/task/TID."""
    text = _read(f"{path}/status") or ""
    v = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", text, re.M)
    nv = re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", text, re.M)
    return (int(v.group(1)) if v else 0, int(nv.group(1)) if nv else 0)


def threads(pid: int) -> dict[str, tuple[str, int, int]]:
    """tid -> (name, voluntary, involuntary) switches."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        path = f"/proc/{pid}/task/{tid}"
        name = (_read(f"{path}/comm") or "?").strip()
        out[tid] = (name, *switches(path))
    return out


def descendants(pid: int) -> list[int]:
    """Every process under pid (its children's children too)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for t in os.listdir(f"/proc/{p}/task") if os.path.isdir(f"/proc/{p}/task") else ():
            for k in (_read(f"/proc/{p}/task/{t}/children") or "").split():
                out.append(int(k))
                todo.append(int(k))
    return out


def under(pids: list[int]) -> tuple[float, int, int]:
    """(CPU seconds, voluntary, involuntary switches) summed over pids."""
    c = v = nv = 0
    for p in pids:
        t = cpu(p)
        if t:
            c += t[0] + t[1]
        a, b = switches(f"/proc/{p}")
        v, nv = v + a, nv + b
    return c, v, nv


def window(pid: int, seconds: float) -> dict:
    kids = descendants(pid)
    c0, r0, th0, u0, t0 = cpu(pid), on_cpu(pid), threads(pid), under(kids), time.perf_counter()
    time.sleep(seconds)
    c1, r1, th1, u1, t1 = cpu(pid), on_cpu(pid), threads(pid), under(kids), time.perf_counter()
    dt = t1 - t0
    per_thread = {tid: (th1[tid][0], th1[tid][1] - th0[tid][1], th1[tid][2] - th0[tid][2])
                  for tid in th1 if tid in th0}
    return {"seconds": dt, "on_cpu": r1 - r0, "user": c1[0] - c0[0], "system": c1[1] - c0[1],
            "threads": per_thread, "under_n": len(kids), "under_cpu": u1[0] - u0[0],
            "under_wakeups": u1[1] - u0[1], "load": os.getloadavg()}


def show(w: dict) -> None:
    dt = w["seconds"]
    ths = " ".join(f"{name}[{tid}] {v / dt:.1f}/s (+{nv} inv)" for tid, (name, v, nv) in sorted(w["threads"].items()))
    print(f"  {dt:5.1f} s: Emperor CPU {100 * w['on_cpu'] / dt:.3f} % (in ticks: user {100 * w['user'] / dt:.2f}, "
          f"system {100 * w['system'] / dt:.2f}); wake-ups {ths}; the {w['under_n']} processes under it: "
          f"CPU {100 * w['under_cpu'] / dt:.2f} %, {w['under_wakeups'] / dt:.1f} wake-ups/s; "
          f"load {w['load'][0]:.2f}", flush=True)


def strace_counts(pid: int, seconds: float) -> None:
    p = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(seconds)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    print(f"strace -c -f -p {pid} over {seconds:g} s:")
    print("\n".join("    " + line for line in err.splitlines() if not line.startswith("strace: Process")))


def strace_trace(pid: int, seconds: float, out: Path) -> None:
    p = subprocess.Popen(["strace", "-f", "-tt", "-o", str(out), "-p", str(pid)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(seconds)
    p.send_signal(signal.SIGINT)
    p.wait(timeout=30)
    waits = collections.Counter()
    calls = collections.Counter()
    n_waits = 0
    for line in out.read_text().splitlines():
        m = re.match(r"\d+\s+[\d:.]+\s+(\w+)\((.*)", line)
        if not m:
            continue
        call, rest = m.groups()
        calls[call] += 1
        if call == "epoll_wait" and "= " in rest:
            n_waits += 1
            ready = re.findall(r"data=\{u32=(\d+)", rest)
            waits[" ".join(sorted(ready)) or "timeout"] += 1
    print(f"strace -f -tt over {seconds:g} s ({out}): {n_waits} epoll_wait returns, "
          f"{n_waits / seconds:.1f}/s; ready descriptors of each: " +
          ", ".join(f"{k}: {v}" for k, v in waits.most_common(10)))
    print("  calls: " + ", ".join(f"{k} {v}" for k, v in calls.most_common(15)), flush=True)


def side_by_side(pids: list[int], windows: int, seconds: float) -> int:
    """The same windows for every Emperor: each one's CPU on a core and
    wake-ups, measured over the same seconds (same load)."""
    got: dict[int, list[float]] = {p: [] for p in pids}
    for i in range(windows):
        before = {p: (on_cpu(p), switches(f"/proc/{p}"), cpu(p)) for p in pids}
        t0 = time.perf_counter()
        time.sleep(seconds)
        dt = time.perf_counter() - t0
        load = os.getloadavg()
        for p in pids:
            r, sw, c = on_cpu(p), switches(f"/proc/{p}"), cpu(p)
            pct = 100 * (r - before[p][0]) / dt
            got[p].append(pct)
            print(f"  window {i + 1}, {dt:.1f} s, load {load[0]:.2f}: Emperor {p}: CPU {pct:.3f} % "
                  f"(ticks: user {100 * (c[0] - before[p][2][0]) / dt:.2f}, system "
                  f"{100 * (c[1] - before[p][2][1]) / dt:.2f}), {(sw[0] - before[p][1][0]) / dt:.2f} "
                  f"wake-ups/s, {sw[1] - before[p][1][1]} preempted", flush=True)
    for p, xs in got.items():
        xs = sorted(xs)
        print(f"Emperor {p}: median {xs[len(xs) // 2]:.3f} % ({', '.join(f'{x:.3f}' for x in xs)})")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int, nargs="?", default=0)
    ap.add_argument("app", nargs="?", default="heavy")
    ap.add_argument("--pids", help="measure these running Emperors side by side instead")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--strace", type=float, default=0.0)
    ap.add_argument("--hold", type=Path)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    extra = argv[cut + 1:]
    if a.pids:
        return side_by_side([int(p) for p in a.pids.split(",")], a.windows, a.seconds)
    set_child_subreaper()
    tmp = tempdir()
    procs = Procs(tmp)
    try:
        print(f"{a.n} {a.app} vassals, load average {os.getloadavg()[0]:.2f} at start "
              f"(PYTHONPATH={os.environ.get('PYTHONPATH', '')})", flush=True)
        em, vports = start_fleet(procs, tmp, a.app, a.n, extra)
        try:
            listening = wait_fork_server(tmp / "base.sock", em, 60)
            first = wait_all_200(vports, 120 + a.n // 10, em.t0, "/hello")
            print(f"  base listening {listening:.2f} s, all answering {max(first.values()):.2f} s", flush=True)
            time.sleep(2.0)  # start-up settles (every vassal's bytes 5, 17)
            pid = em.proc.pid
            wins = []
            for _ in range(a.windows):
                wins.append(window(pid, a.seconds))
                show(wins[-1])
            if wins:
                pct = sorted(100 * w["on_cpu"] / w["seconds"] for w in wins)
                print(f"  idle Emperor CPU, median of {len(wins)}: {pct[len(pct) // 2]:.3f} % "
                      f"(each: {', '.join(f'{x:.3f}' for x in pct)})", flush=True)
            if a.strace:
                strace_counts(pid, a.strace)
                strace_trace(pid, a.strace, tmp / "strace.txt")
            if a.hold:
                a.hold.write_text(f"{pid}\n{tmp}\n")
                print(f"  holding until {a.hold} is removed (Emperor pid {pid})", flush=True)
                while a.hold.exists() and em.alive():
                    time.sleep(0.5)
        except Exception:
            print((tmp / "emperor.log").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            em.stop()
    finally:
        procs.cleanup()
        rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
