"""The fleet's floor and where a mass start's time goes (`--only floor`).

Two measurements, both of `bench/heavy.psgi` vassals answering `/hello`
(the server's readiness, as in the mass-start rows):

- `floor()`: adoptions one at a time from a base without spares, the
  socket bound by the requester as `emperor run` does. For each: the CPU
  the base spends to clone (its page tables), the vassal master's CPU from
  birth to answering (start-up, worker fork), the worker's, and their
  minor page faults. The floor of a mass start of N is then the base's
  start-up plus N times that CPU over the machine's cores: no scheduler,
  no Emperor, no waiting can beat it.
- `burst()`: `emperor run` on a directory of N such vassals (soft
  RLIMIT_NOFILE 1,024), as the thousand rows; then, before the idle
  phase, every process's CPU and faults from /proc split by role
  (Emperor, base, vassal masters, workers), the machine's busy fraction
  over the burst (/proc/stat), and the answering curve. With
  `PYSPY=/path/to/py-spy`, the Emperor is sampled for the burst and its
  hottest functions are kept (py-spy is not a dependency of the project).
"""

from __future__ import annotations

import os
import resource
import shlex
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil

from anatomy import anatomy_line, frames_by_page, huge_mb, mapping_count, own_pages
from benchlib import BenchError, Ports, Procs, http_get, rmtree, stop_process, summary, wait_all_200
from emperor_run import write_fleet
from pyspy import hot_functions, py_spy

TICK = os.sysconf("SC_CLK_TCK")
# the vassal without a master (docs/CONTRACT.md, "master = false"): its
# argv for a single adoption, its lines in a vassal file
SOLO_ARGS = ("--master=false",)
SOLO_LINES = ("master = false",)


def proc_stat(pid: int) -> tuple[float, int, int] | None:
    """(CPU seconds, minor faults, ppid) of a live process. The CPU is the
    scheduler's nanoseconds (/proc/PID/schedstat): utime and stime count
    10 ms ticks, coarser than a whole adoption."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
        with open(f"/proc/{pid}/schedstat") as f:
            ns = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    rest = text[text.rindex(")") + 2:].split()
    # fields after the name: state(0) ppid(1) ... minflt(7)
    return ns / 1e9, int(rest[7]), int(rest[1])


def sched_times(pid: int) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable but waiting for one) of a live
    process, from /proc/PID/schedstat."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            run, wait = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    return int(run) / 1e9, int(wait) / 1e9


def fork_server_of(emperor_pid: int) -> int | None:
    """The Emperor's base (its process title says fork server; a spare
    keeps that title only until it is set up, and is younger)."""
    found = []
    for q in psutil.Process(emperor_pid).children():
        try:
            if "(fork server)" in " ".join(q.cmdline()):
                found.append((q.create_time(), q.pid))
        except psutil.Error:
            continue
    return min(found)[1] if found else None


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    idle = cpu[3] + cpu[4]
    return (sum(cpu[:8]) - idle) / TICK, sum(cpu[:8]) / TICK


def cpu_by_process() -> dict[int, tuple[float, int, str, int]]:
    """Every process on the machine: pid -> (CPU seconds, its own and its
    reaped children's, ppid, name, start time), from /proc/PID/stat (clock
    ticks: coarse for one process, fine summed)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                text = f.read()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        rest = text[text.rindex(")") + 2:].split()
        # state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14) ... starttime(19)
        out[int(name)] = (sum(int(x) for x in rest[11:15]) / TICK, int(rest[1]), comm, int(rest[19]))
    return out


def elsewhere(before: dict[int, tuple[float, int, str, int]], after: dict[int, tuple[float, int, str, int]],
              ours: set[int]) -> dict:
    """The CPU of the burst that was not ours, by who took it: kernel threads
    (children of kthreadd, pid 2), this client, and other processes by name
    (the five largest), each with the children it reaped meanwhile (all of
    such a child's CPU, some of it maybe from before the burst); what ended
    unreaped, or with its parent, is not seen."""
    kernel = client = 0.0
    others: Counter[str] = Counter()
    me = os.getpid()
    for pid, (cpu, ppid, comm, started) in after.items():
        if pid in ours:
            continue
        was = before.get(pid)
        used = cpu - (was[0] if was and was[3] == started else 0.0)
        if used <= 0:
            continue
        if pid == 2 or ppid == 2:
            kernel += used
        elif pid == me:
            client += used
        else:
            others[comm] += used
    return {"kernel_threads_cpu_s": round(kernel, 2), "bench_client_cpu_s": round(client, 2),
            "other_processes_cpu_s": round(sum(others.values()), 2),
            "other_processes_top": [(c, round(s, 2)) for c, s in others.most_common(5)]}


def floor(procs: Procs, ports: Ports, tmp: Path, base_cls, app: str, program: str, n: int,
          say: Callable[[str], None], vassal_args: tuple[str, ...] = ()) -> dict:
    """n adoptions one at a time (no spares): CPU per stage, summed over the
    processes that do the work. Also what the last vassal owns of its own
    (its pages no longer the base's, by mapping) and how much of the base's
    memory is in 2 MB pages before and after the adoptions."""
    say(f"floor: {n} adoptions, one at a time, CPU per stage from /proc" + (f" ({' '.join(vassal_args)})" if vassal_args else ""))
    before: dict | None = None
    base = base_cls(procs, app, tmp / "floor.sock", "base-floor", ("--fork-server-spares", "0"))
    rows = []
    anatomy: dict = {}
    try:
        time.sleep(0.5)  # the base's own start-up CPU settles
        anatomy["base_huge_mb_ready"] = huge_mb(base.proc.pid)
        for i in range(n):
            port = ports.get()
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(128)
            # the base's pages as the last vassal will start with them: what
            # it owns later is what it copied (the base's own writes after
            # the clone give the base new frames, not the vassal)
            before = frames_by_page(base.proc.pid) if i == n - 1 else None
            b0 = proc_stat(base.proc.pid)
            try:
                pid, pipe, t0, t_pid = base.adopt(["--http-socket", f"127.0.0.1:{port}", "--processes", "1",
                                                   *vassal_args], s)
            finally:
                s.close()
            if http_get(port, "/hello", timeout=30) != 200:
                raise BenchError(f"no 200 from the vassal on port {port}")
            t200 = time.perf_counter()
            b1 = proc_stat(base.proc.pid)
            m = proc_stat(pid)
            workers = [q.pid for q in psutil.Process(pid).children()]
            w = [proc_stat(q) for q in workers]
            w = [x for x in w if x]
            rows.append({
                "wall_ms": (t200 - t0) * 1000, "pid_reply_ms": (t_pid - t0) * 1000,
                "base_cpu_ms": (b1[0] - b0[0]) * 1000, "base_faults": b1[1] - b0[1],
                "master_cpu_ms": m[0] * 1000 if m else 0.0, "master_faults": m[1] if m else 0,
                "worker_cpu_ms": sum(x[0] for x in w) * 1000, "worker_faults": sum(x[1] for x in w),
            })
            if i == n - 1:
                # the pages the last vassal's processes made their own, as
                # it answers: the master's against the base's, the worker's
                # against the master's (what its own fork copied); without a
                # master (master = false) the one process is counted as one
                master = frames_by_page(pid)
                anatomy["master_own_pages"] = own_pages(master, before)
                anatomy["master_huge_mb"] = huge_mb(pid)
                anatomy["mappings"] = mapping_count(pid)
            if i == n - 1 and workers:
                worker = frames_by_page(workers[0])
                # the worker's own: neither the base's nor its master's now
                # (so it also counts pages the master copied again after the
                # fork, leaving the worker the master's earlier copy)
                anatomy["worker_own_pages"] = own_pages(worker, before, master)
                anatomy["worker_huge_mb"] = huge_mb(workers[0])
            pipe.close()
            if not procs.wait(pid, 15):
                procs.stop_tree(pid, signal.SIGKILL, 5)
            procs.reap()
        anatomy["base_huge_mb_after"] = huge_mb(base.proc.pid)
    finally:
        base.stop()
    out = {k: summary([r[k] for r in rows]) for k in rows[0]}
    out["anatomy"] = anatomy
    cpu = {k: sum(r[k] for r in rows) / len(rows) for k in ("base_cpu_ms", "master_cpu_ms", "worker_cpu_ms")}
    out["mean_cpu_ms"] = cpu
    out["cpu_per_vassal_ms"] = sum(cpu.values())
    out["base_ready_s"] = base.ready_s
    out["cores"] = os.cpu_count()
    out["n"] = n
    say(f"  per adoption: base {cpu['base_cpu_ms']:.2f} + master {cpu['master_cpu_ms']:.2f} + worker "
        f"{cpu['worker_cpu_ms']:.2f} ms CPU; wall p50 {out['wall_ms']['p50']:.2f} ms")
    say(f"  {anatomy_line(anatomy)}")
    return out


def floor_for(fl: dict, n: int) -> float:
    """Seconds: base start-up + n adoptions' CPU over every core."""
    return fl["base_ready_s"] + n * fl["cpu_per_vassal_ms"] / 1000 / fl["cores"]


def burst(procs: Procs, ports: Ports, tmp: Path, emperor_cls, wait_fork_server,
          n: int, app: str, say: Callable[[str], None], extra: tuple[str, ...] = (),
          lines: tuple[str, ...] = ()) -> dict:
    """`emperor run` with n vassals of `app`: the answering curve and every
    process's CPU and faults by role, read just after the last answered."""
    say(f"burst profile: `emperor run` with {n} {app} vassals (soft RLIMIT_NOFILE 1024)"
        + (f" ({', '.join(lines)})" if lines else ""))
    vdir = tmp / f"burst-{app}-{n}" if not lines else tmp / f"burst-{app}-{n}-{len(lines)}"
    vdir.mkdir()
    sock = tmp / f"burst-{n}.sock"
    vports = write_fleet(vdir, app, sock, n, ports, digits=4, lines=lines)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    busy0 = machine_busy()
    everyone0 = cpu_by_process()
    em = emperor_cls(procs, vdir, f"emperor-burst-{n}", list(extra), nofile=(1024, hard))
    res: dict = {"command": shlex.join(em.argv), "n": n, "app": app}
    spy = None
    pyspy = os.environ.get("PYSPY")
    raw = tmp / "emperor.pyspy"
    try:
        if pyspy:
            spy = py_spy(pyspy, em.proc.pid, raw)
        res["base_listening_s"] = wait_fork_server(sock, em, 60)
        # over the burst: how long the Emperor and the base each ran, and how
        # long each was runnable but waited for a core (a serial step starved)
        fs_pid = fork_server_of(em.proc.pid)
        t_burst = time.perf_counter()
        sched0 = {"emperor": sched_times(em.proc.pid), "base": sched_times(fs_pid) if fs_pid else None}
        first = wait_all_200(vports, 120 + n // 10, em.t0, "/hello")
        sched1 = {"emperor": sched_times(em.proc.pid), "base": sched_times(fs_pid) if fs_pid else None}
        burst_s = time.perf_counter() - t_burst
        res["run_queue"] = {k: {"ran_s": round(sched1[k][0] - sched0[k][0], 3),
                                "waited_s": round(sched1[k][1] - sched0[k][1], 3),
                                "over_s": round(burst_s, 3)}
                            for k in sched0 if sched0[k] and sched1[k]}
        busy1 = machine_busy()
        everyone1 = cpu_by_process()
        took = sorted(first.values())
        res["all_200_s"] = took[-1]
        res["curve_s"] = {f"{q}%": round(took[max(0, int(len(took) * q / 100) - 1)], 3) for q in (10, 25, 50, 75, 90, 100)}
        res["machine_busy_fraction"] = (busy1[0] - busy0[0]) / max(1e-9, busy1[1] - busy0[1])
        # every CPU's busy time over the burst: what our processes used, the
        # rest went to others (other work on the machine, the kernel's threads,
        # processes that exited, this client)
        res["machine_cpu_s"] = round(busy1[0] - busy0[0], 2)
        # by role: the Emperor, its base, vassal masters (the Emperor's other
        # children), their workers; CPU since each process started
        roles: dict[str, list[float]] = {"emperor": [0.0, 0, 0], "base": [0.0, 0, 0],
                                         "masters": [0.0, 0, 0], "workers": [0.0, 0, 0]}
        emperor_pid = em.proc.pid
        pids = [p.pid for p in em.under()]
        # the base is the Emperor's first child (the vassals are adopted from it)
        kids = [q for q in em.under() if proc_stat(q.pid) and proc_stat(q.pid)[2] == emperor_pid]
        base_pid = min(kids, key=lambda q: q.create_time()).pid if kids else None
        for pid in [emperor_pid, *pids]:
            st = proc_stat(pid)
            if not st:
                continue
            role = ("emperor" if pid == emperor_pid else "base" if pid == base_pid
                    else "masters" if st[2] == emperor_pid else "workers")
            r = roles[role]
            r[0] += st[0]
            r[1] += st[1]
            r[2] += 1
        res["by_role"] = {k: {"cpu_s": round(v[0], 2), "minflt": v[1], "processes": v[2]} for k, v in roles.items()}
        res["cpu_total_s"] = round(sum(v[0] for v in roles.values()), 2)
        # the rest of the machine's busy time: who else took the cores
        res["elsewhere"] = elsewhere(everyone0, everyone1, {emperor_pid, *pids})
        cpu = sum(v[0] for v in roles.values())
        res["cpu_over_cores_s"] = round(cpu / (os.cpu_count() or 1), 2)
        say(f"  all {n} answering at {res['all_200_s']:.2f} s (base listening {res['base_listening_s']:.2f} s); "
            f"machine busy {100 * res['machine_busy_fraction']:.0f} % ({res['machine_cpu_s']:.1f} CPU-s); CPU "
            + ", ".join(f"{k} {v['cpu_s']:.2f} s" for k, v in res["by_role"].items()))
        for k, v in res["run_queue"].items():
            say(f"  {k}: over the {v['over_s']:.2f} s after the base listened, ran {v['ran_s']:.2f} s, "
                f"waited for a core {v['waited_s']:.2f} s")
        ew = res["elsewhere"]
        say(f"  elsewhere: kernel threads {ew['kernel_threads_cpu_s']:.2f} s, this client "
            f"{ew['bench_client_cpu_s']:.2f} s, other processes {ew['other_processes_cpu_s']:.2f} s "
            f"({', '.join(f'{c} {s:g}' for c, s in ew['other_processes_top'])})")
        if spy is not None:
            stop_process(spy, signal.SIGINT)
            spy = None
            if raw.exists():
                res["emperor_hot"] = hot_functions(raw)
                for fn, pct in res["emperor_hot"][:12]:
                    say(f"    {pct:5.1f} %  {fn}")
    finally:
        if spy is not None:
            spy.kill()
            spy.wait()
        res["stop_s"] = em.stop()
        rmtree(vdir)
    return res


def run(procs: Procs, ports: Ports, tmp: Path, quick: bool, step, say, emperor_cls, base_cls,
        wait_fork_server, apps: dict[str, str], program: str, with_burst: bool = True) -> dict:
    """`--only floor`: the floor from single adoptions, then (unless
    `with_burst` is false: `--floor-only`) a mass start of 200 (`--quick`)
    or 1,000 (`--full`) heavy vassals against it."""
    n = 200 if quick else 1000
    out: dict = {"load_average_at_start": os.getloadavg()}
    fl = step("floor", lambda: floor(procs, ports, tmp, base_cls, apps["heavy"], program, 20, say))
    if fl:
        out["floor"] = fl
    # the same without a master: the vassal's one process serves
    fs = step("floor master = false", lambda: floor(procs, ports, tmp, base_cls, apps["heavy"], program, 20, say,
                                                    SOLO_ARGS))
    if fs:
        out["floor_solo"] = fs
    if not with_burst:
        out["load_average_at_end"] = os.getloadavg()
        return out
    b = step(f"burst {n}", lambda: burst(procs, ports, tmp, emperor_cls,
                                         wait_fork_server, n, "heavy", say))
    if b:
        out["burst"] = b
        if fl:
            b["floor_s"] = floor_for(fl, n)
    bs = step(f"burst {n} master = false", lambda: burst(procs, ports, tmp, emperor_cls,
                                                          wait_fork_server, n, "heavy", say, lines=SOLO_LINES))
    if bs:
        out["burst_solo"] = bs
        if fs:
            bs["floor_s"] = floor_for(fs, n)
    out["load_average_at_end"] = os.getloadavg()
    return out
