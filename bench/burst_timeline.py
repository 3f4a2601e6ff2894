#!/usr/bin/env python3
"""A mass start's timeline: which serial step waits (`--only floor` in one run).

    .venv/bin/python bench/burst_timeline.py N [heavy|hello] [--vassal-line 'KEY = VALUE' ...] [EMPEROR ARGS...]

`emperor run` (soft RLIMIT_NOFILE 1,024) on N vassals of the app, each
answering `/hello`; every 10 ms a sample of the machine's idle time
(/proc/stat), the Emperor's and the base's time on a core and time
runnable but waiting for one (/proc/PID/schedstat), the Emperor's state
and, when it sleeps or blocks, where (/proc/PID/wchan), and how many
children the Emperor has. Prints a row per 0.25 s (0.5 s above 300) of
the burst, from the base listening to the last answer, then the totals,
and who used the cores over the burst (schedstat): the Emperor, the base,
the vassals' first processes and their workers, the bench itself, and
everything else on the machine.
EMPEROR ARGS go to `emperor run`: `--vassal-binary OLD/perl/ForkServer.pm`
runs the Perl code of another commit (`git archive REV perl | tar -x -C
OLD`) under this Emperor, to put two side by side; `--vassal-line 'master =
false'` adds that line to every vassal file. Loads the two cores for
a few seconds (200) to half a minute (1,000): run it rarely.
"""

from __future__ import annotations

import collections
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from benchlib import BenchError, Procs, read_or_none as _read, rmtree, set_child_subreaper, tempdir, wait_all_200  # noqa: E402
from fleetcpu import fleet_cpu  # noqa: E402
from emperor_run import start_fleet, wait_fork_server  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def proc(pid: int | None) -> tuple[str, float, float] | None:
    """(state, seconds on a core, seconds waiting for one) of a live process."""
    if pid is None:
        return None
    stat, sched = _read(f"/proc/{pid}/stat"), _read(f"/proc/{pid}/schedstat")
    if not stat or not sched:
        return None
    run, wait = sched.split()[:2]
    return stat[stat.rindex(")") + 2:].split()[0], int(run) / 1e9, int(wait) / 1e9


def huge_mb(pid: int | None) -> float | None:
    """The process's anonymous memory in 2 MB pages, MB."""
    text = _read(f"/proc/{pid}/smaps_rollup") if pid else None
    for line in (text or "").splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) / 1024
    return None


def machine() -> tuple[float, float]:
    """(idle, total) seconds of every CPU since boot."""
    c = [int(x) for x in (_read("/proc/stat") or "cpu 0").splitlines()[0].split()[1:]]
    return (c[3] + c[4]) / TICK, sum(c[:8]) / TICK


class Sampler(threading.Thread):
    def __init__(self, emperor: int) -> None:
        super().__init__(daemon=True)
        self.emperor, self.base = emperor, None
        self.samples: list[tuple] = []
        self.states: collections.Counter[str] = collections.Counter()
        self.base_states: collections.Counter[str] = collections.Counter()  # once it listens
        self.stop = threading.Event()
        self.listening = False  # the base listens: its states are counted from then on

    def _find_base(self, kids: list[str]) -> None:
        # the base's title says fork server; a spare has it only briefly, and is younger
        if self.base is None or "(fork server)" not in (_read(f"/proc/{self.base}/cmdline") or ""):
            found = [int(k) for k in kids if "(fork server)" in (_read(f"/proc/{k}/cmdline") or "")]
            self.base = min(found) if found else None

    def run(self) -> None:
        e = self.emperor
        while not self.stop.is_set():
            kids = (_read(f"/proc/{e}/task/{e}/children") or "").split()
            self._find_base(kids)
            em = proc(e)
            where = (_read(f"/proc/{e}/wchan") or "?") if em and em[0] in "DS" else ""
            self.states[f"{em[0] if em else '?'} {where}".strip()] += 1
            b = proc(self.base)
            if b is not None and self.listening:
                at = (_read(f"/proc/{self.base}/wchan") or "?") if b[0] in "DS" else ""
                self.base_states[f"{b[0]} {at}".strip()] += 1
            self.samples.append((time.perf_counter(), machine(), em, proc(self.base), len(kids)))
            time.sleep(0.01)


def main() -> int:
    n = int(sys.argv[1])
    app = sys.argv[2] if len(sys.argv) > 2 else "heavy"
    extra, lines = [], []
    rest = iter(sys.argv[3:])
    for arg in rest:
        if arg == "--vassal-line":
            lines.append(next(rest))
        else:
            extra.append(arg)
    set_child_subreaper()
    tmp = tempdir()
    procs = Procs(tmp)
    try:
        load = os.getloadavg()[0]
        em, vports = start_fleet(procs, tmp, app, n, extra, tuple(lines))
        sampler = Sampler(em.proc.pid)
        sampler.start()
        try:
            listening = wait_fork_server(tmp / "base.sock", em, 60)
            sampler.listening = True
            t_base = time.perf_counter()
            until = time.perf_counter() + 1
            while sampler.base is None and time.perf_counter() < until:  # its next sample finds it
                time.sleep(0.005)
            huge = [huge_mb(sampler.base)]
            cpu_start = fleet_cpu(em.proc.pid, sampler.base)
            bench_start = sum(os.times()[:2])
            try:
                first = wait_all_200(vports, 120 + n // 10, em.t0, "/hello")
            except BenchError:
                # the Emperor's log says why (it goes with the run's directory)
                kept = Path(tempfile.mkdtemp(prefix="burst-timeline-")) / "emperor.log"
                shutil.copy(tmp / "emperor.log", kept)
                print(f"the Emperor's log kept in {kept}", file=sys.stderr)
                raise
            t_end = time.perf_counter()
            cpu_end = fleet_cpu(em.proc.pid, sampler.base)
            bench_end = sum(os.times()[:2])
            huge.append(huge_mb(sampler.base))
        finally:
            sampler.stop.set()
            sampler.join()
            em.stop()
    finally:
        procs.cleanup()
        rmtree(tmp)
    took = sorted(first.values())
    answered = sorted(em.t0 + x for x in took)
    print(f"{n} {app} vassals" + "".join(f", {line}" for line in lines) + f", load average {load:.1f} at start: base listening {listening:.2f} s, all answering "
          f"{took[-1]:.2f} s; 25/50/75 %: " + " ".join(f"{took[int(len(took) * q) - 1]:.2f}" for q in (.25, .5, .75)))
    step = 0.25 if n <= 300 else 0.5
    print("  t (s)  idle %  Emperor on a core / waiting %  base on a core / waiting %  children  answering")
    t = t_base
    samples = sampler.samples
    while t < t_end:
        win = [s for s in samples if t <= s[0] < t + step]
        if len(win) >= 2:
            a, b = win[0], win[-1]
            dt = b[0] - a[0]
            idle = 100 * (b[1][0] - a[1][0]) / max(1e-9, b[1][1] - a[1][1])

            def share(i: int, k: int) -> float:
                return 100 * (b[i][k] - a[i][k]) / dt if a[i] and b[i] else 0.0
            done = sum(1 for x in answered if x < t + step)
            print(f"  {t + step - em.t0:5.2f}  {idle:6.0f}  {share(2, 1):14.0f} / {share(2, 2):3.0f}"
                  f"  {share(3, 1):19.0f} / {share(3, 2):3.0f}  {b[4]:8d}  {done:9d}")
        t += step
    burst = [s for s in samples if s[0] >= t_base]
    for name, i in (("Emperor", 2), ("base", 3)):
        w = [s for s in burst if s[i]]
        if len(w) >= 2:
            dt = w[-1][0] - w[0][0]
            run, wait = w[-1][i][1] - w[0][i][1], w[-1][i][2] - w[0][i][2]
            print(f"{name}: over {dt:.2f} s on a core {run:.2f} s ({100 * run / dt:.0f} %), waiting for one "
                  f"{wait:.2f} s ({100 * wait / dt:.0f} %)")
    if len(burst) >= 2:
        print(f"the machine idle over the burst: "
              f"{100 * (burst[-1][1][0] - burst[0][1][0]) / (burst[-1][1][1] - burst[0][1][1]):.0f} %")
    # the CPU of the burst, by part (the vassals' from their births, all in it)
    busy = (burst[-1][1][1] - burst[0][1][1]) - (burst[-1][1][0] - burst[0][1][0]) if len(burst) >= 2 else 0.0
    parts = {k: (n, c - cpu_start.get(k, (0, 0.0))[1]) for k, (n, c) in cpu_end.items()}
    parts["the bench (its poller and sampler)"] = (1, bench_end - bench_start)
    ours = sum(c for _, c in parts.values())
    print(f"CPU over the burst: the machine busy {busy:.2f} CPU-s; "
          + ", ".join(f"{k} {c:.2f} s" + (f" ({n} processes, {1000 * c / n:.2f} ms each)" if n > 1 else "")
                      for k, (n, c) in parts.items())
          + f"; everything else {busy - ours:.2f} s; per vassal, ours: {1000 * ours / n:.2f} ms")
    # each 2 MB page the base writes after a clone is split into 512 entries
    # for good: every later clone copies them
    print("the base's memory in 2 MB pages: " + " MB when it listened, ".join(
        f"{h:.0f}" if h is not None else "?" for h in huge) + " MB after the burst")
    print("the Emperor's state, sampled every 10 ms over the run:",
          ", ".join(f"{k or '?'} {v}" for k, v in sampler.states.most_common(8)))
    print("the base's state, sampled every 10 ms from its listening on:",
          ", ".join(f"{k or '?'} {v}" for k, v in sampler.base_states.most_common(8)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
