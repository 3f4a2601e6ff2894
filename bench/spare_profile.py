#!/usr/bin/env python3
"""One warm-spare adoption, end to end, on a timeline.

    .venv/bin/python bench/spare_profile.py [--strace | --sched] [-n 20] [--program perl/ForkServer.pm] [--master-false]

A heavy base with `early-warmup = /` and one spare; each adoption passes a
socket bound here (as `emperor run` does), and one client connection is
made right after the pid reply and waits in its backlog: no polling, the
first 200 is what a real client sees. With `--master-false` the vassal
has no master (the warm worker is the vassal itself). Without `--strace`: n adoptions,
the client's phases (request sent, pid reply, connect, first 200) p50.
With `--strace`: one adoption with `strace -ttt -f` attached to the base,
the spare and its warm worker; the steps of the adoption are picked out of
the trace and printed on one clock (the client's marks with them).
With `--sched`: n adoptions, each recorded by the kernel's own tracer
(tracefs: the scheduler's switches and wake-ups, the system calls of the
base, the spare, its worker and the client; a few microseconds each, where
strace costs tens), and each step's time after the request was sent, p50
and minimum; then, step by step along the first 200's path, how long the
process on it ran, waited for a CPU (woken or preempted, and who had the
CPU meanwhile) or slept.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import psutil  # noqa: E402

import basevassal  # noqa: E402
from adoptions import bound_listener  # noqa: E402
from basevassal import Base, stop_adopted  # noqa: E402
from benchlib import Ports, Procs, rmtree, set_child_subreaper, tempdir  # noqa: E402
from settings import APPS  # noqa: E402
from sched_trace import Event, SchedTrace  # noqa: E402


def cpu_faults(pid: int) -> tuple[float, int]:
    """CPU seconds (the scheduler's nanoseconds) and minor faults of a process so far."""
    with open(f"/proc/{pid}/schedstat") as f:
        ns = int(f.read().split()[0])
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return ns / 1e9, int(rest[7])


VASSAL_ARGS: list[str] = []  # --master-false: ["--master=false"]


def one_adoption(base: Base, port: int, costs: dict | None = None, second: bool = False,
                 clock=time.time) -> dict[str, float]:
    """Client marks (time.time(), to line up with strace -ttt, or `clock`) of
    one adoption; with `costs`, each process's CPU and faults over the adoption too."""
    marks: dict[str, float] = {}
    roles: dict[str, int] = {}
    before: dict[str, tuple[float, int]] = {}
    if costs is not None:
        spare = next(iter(base.warm_spares()))
        roles = {"base": base.proc.pid, "spare (master)": spare,
                 "warm worker": psutil.Process(spare).children()[0].pid}
        before = {k: cpu_faults(p) for k, p in roles.items()}
    listener = bound_listener(port)
    try:
        marks["request sent"] = clock()
        pid, pipe, _, _ = base.adopt(["--http-socket", f"127.0.0.1:{port}", "--processes", "1", *VASSAL_ARGS],
                                     listener)
        marks["pid reply read"] = clock()
    finally:
        listener.close()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        marks["client connected (backlog)"] = clock()
        s.sendall(f"GET / HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        first = s.recv(65536)
        marks["first response bytes"] = clock()
        while s.recv(65536):
            pass
        marks["response read"] = clock()
        s.close()
        if second:  # the steady state, for comparison
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(f"GET / HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            while s.recv(65536):
                pass
            s.close()
            marks["second response read"] = clock()
        if not first.startswith(b"HTTP/1.") or b" 200 " not in first.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"not a 200: {first[:80]!r}")
        if costs is not None:
            for k, p in roles.items():
                try:
                    c1, f1 = cpu_faults(p)
                except OSError:  # it left (a warm worker that did not fit)
                    print(f"note: the {k} (pid {p}) is gone", file=sys.stderr)
                    continue
                c0, f0 = before[k]
                costs.setdefault(k, []).append(((c1 - c0) * 1000, f1 - f0))
    finally:
        stop_adopted(base.procs, pid, pipe)
    marks["pid"] = pid
    return marks


# what each traced line means for the adoption, in order of appearance
STEPS = [
    ("base", r"accept4?\(", "base accepts the requester"),
    ("base", r"recvmsg\(", "base reads the request"),
    ("base", r"(sendto|write)\(\d+, \"#", "base writes the pid reply"),
    ("base", r"sendmsg\(", "base sends the warm worker the request"),
    ("base", r"sendmsg\(", "base sends the spare the request"),
    ("spare", r"recvmsg\((?!.*MSG_PEEK).*\"D#", "spare receives the request"),
    ("worker", r"recvmsg\((?!.*MSG_PEEK).*\"#", "worker receives the request"),
    ("worker", r"sendmsg\(\d+, .*\"S\"", "worker says it fits"),
    ("spare", r"recvmsg\(.*\"S\"", "spare reads its worker's answer"),
    ("worker", r"accept4?\(\d+, .*= \d+$", "worker accepts the client"),
    ("worker", r"read\(\d+, \"GET ", "worker reads the request"),
    ("worker", r"write\(\d+, \"HTTP/1", "worker writes the response"),
    ("spare", r"write\(\d+, \"\\1\"", "master: byte 1 to the Emperor pipe"),
    ("spare", r"clone|fork", "master forks (a fresh worker)"),
]


def traced(base: Base, procs: Procs, tmp: Path, port: int) -> None:
    spares = base.wait_spares(1)
    spare = next(iter(spares))
    worker = psutil.Process(spare).children()[0].pid
    who = {base.proc.pid: "base", spare: "spare", worker: "worker"}
    out = tmp / "strace.out"
    st = subprocess.Popen(["strace", "-ttt", "-f", "-s", "24", "-o", str(out),
                           *sum((["-p", str(p)] for p in who), [])],
                          stderr=subprocess.PIPE, text=True)
    attached = 0
    deadline = time.monotonic() + 10
    while attached < 3 and time.monotonic() < deadline:  # strace says so on stderr
        line = st.stderr.readline()
        attached += "attached" in line
    time.sleep(0.2)  # noqa: the trace's own start-up off the measured adoption (a tool, not a test)
    marks = one_adoption(base, port)
    time.sleep(0.2)
    st.terminate()
    st.wait(10)
    t0 = marks["request sent"]
    events = [(marks[k], "client", k) for k in marks if k != "pid"]
    seen = set()
    for line in out.read_text().splitlines():
        m = re.match(r"(\d+) (\d+\.\d+) (.*)", line)
        if not m:
            continue
        pid, t, call = int(m.group(1)), float(m.group(2)), m.group(3)
        if t < t0:
            continue
        role = who.get(pid, f"pid {pid}")
        for step_role, pat, what in STEPS:
            if role == step_role and what not in seen and re.search(pat, call):
                seen.add(what)
                events.append((t, role, what))
                break
    print(f"strace -ttt -f of one adoption (t = 0: the client sends the request); trace: {out}")
    for t, role, what in sorted(events):
        print(f"  {(t - t0) * 1000:8.3f} ms  {role:7} {what}")


class Timeline:
    """One process's kernel events in one adoption: its system calls in
    order, and what it did (ran, waited for a CPU, slept) in any interval."""

    def __init__(self, pid: int, events: list[Event]) -> None:
        self.pid = pid
        self.events = [e for e in events if e.pid == pid]

    def first(self, kind: str, what: str = "", after: float | None = 0.0, test=lambda e: True) -> float | None:
        if after is None:
            return None
        for e in self.events:
            if e.t >= after and e.kind == kind and (not what or e.what == what) and test(e):
                return e.t
        return None

    def split(self, t0: float, t1: float) -> dict:
        """Seconds spent running, runnable but waiting, asleep between t0 and
        t1, and who had its CPU while it waited."""
        out = {"run": 0.0, "wait": 0.0, "sleep": 0.0}
        by: dict[int, float] = {}
        state, owner, since = "sleep", None, t0
        for e in self.events:
            if e.t >= t1:
                break
            if e.kind == "in":
                new = "run"
            elif e.kind == "out":
                new, owner = ("wait" if e.what.startswith("R") else "sleep"), e.other
            elif e.kind == "wakeup":
                new, owner = ("wait" if state == "sleep" else state), None
            else:
                new = "run"  # a system call: it runs
            if e.t > t0 and new != state:
                a = max(since, t0)
                out[state] += e.t - a
                if state == "wait" and owner:
                    by[owner] = by.get(owner, 0.0) + e.t - a
            if new != state:
                state, since = new, e.t
        a = max(since, t0)
        out[state] += t1 - a
        if state == "wait" and owner:
            by[owner] = by.get(owner, 0.0) + t1 - a
        out["by"] = by
        return out


def sched_adoptions(base: Base, ports: Ports, n: int, verbose: bool = False) -> None:
    """n adoptions, each under the kernel's tracer: the steps, and where the
    first 200's path ran, waited or slept."""
    steps: dict[str, list[float]] = {}
    phases: dict[str, dict[str, list[float]]] = {}
    thieves: dict[str, float] = {}
    loads = []
    for _ in range(n):
        spare = next(iter(base.wait_spares(1)))
        worker = psutil.Process(spare).children()[0].pid
        pids = {"base": base.proc.pid, "spare": spare, "worker": worker, "client": os.getpid()}
        loads.append(os.getloadavg()[0])
        with SchedTrace(list(pids.values())) as tr:
            m = one_adoption(base, ports.get(), clock=time.perf_counter)
        t0 = m["request sent"]
        ev = [e for e in tr.events() if e.t >= t0 - 0.002]
        b, w, sp = (Timeline(pids[k], ev) for k in ("base", "worker", "spare"))
        comms = {e.other: e.comm for e in ev if e.kind == "out"}
        if verbose:
            print(f"adoption {len(loads)}:")
            for e in ev:
                role = next((k for k, p in pids.items() if p == e.pid), None)
                if role in ("worker", "base", "spare") and e.kind in ("in", "out", "wakeup") or \
                        role == "worker" and e.what in ("accept4", "pselect6", "sendmsg", "recvmsg", "write"):
                    print(f"  {(e.t - t0) * 1000:8.3f} cpu{e.cpu} {role:6} {e.kind:6} {e.what:9} {e.other} {e.comm}")
        at: dict[str, float | None] = {}
        at["base runs"] = b.first("in", after=t0)
        # the worker first, then the reply, then the spare (ForkServer::Spares::take)
        at["base: request read"] = b.first("exit", "recvmsg", after=t0, test=lambda e: e.other > 0)
        sent_w = b.first("exit", "sendmsg", after=at["base: request read"])
        at["base: request sent to the worker"] = sent_w
        at["base: pid reply written"] = b.first("enter", "write", after=at["base: request read"])
        at["base: request sent to the spare"] = b.first("exit", "sendmsg", after=sent_w and sent_w + 1e-9)
        at["base sleeps again"] = b.first("out", after=at["base: request sent to the spare"],
                                          test=lambda e: not e.what.startswith("R"))
        at["worker woken"] = w.first("wakeup", after=t0)
        at["worker runs"] = w.first("in", after=at["worker woken"])
        at["worker: request received"] = w.first("exit", "recvmsg", after=t0, test=lambda e: e.other > 4)
        at["worker: says it fits"] = w.first("enter", "sendmsg", after=at["worker: request received"])
        at["worker: waits for a connection"] = w.first("enter", "pselect6", after=at["worker: says it fits"])
        at["client connected"] = m["client connected (backlog)"]
        acc = w.first("exit", "accept4", after=t0, test=lambda e: e.other >= 0)
        at["worker: connection accepted"] = acc
        head = w.first("exit", "recvfrom", after=acc, test=lambda e: e.other > 0) \
            or w.first("exit", "read", after=acc, test=lambda e: e.other > 0)
        at["worker: request head read"] = head
        at["worker: response written"] = w.first("enter", "write", after=head)
        at["client: first response bytes"] = m["first response bytes"]
        at["spare runs"] = sp.first("in", after=t0)
        at["spare: its worker's answer read"] = sp.first("exit", "recvmsg", after=t0, test=lambda e: e.other == 1)
        for k, t in at.items():
            if t is not None:
                steps.setdefault(k, []).append((t - t0) * 1000)
        path = [("base: request -> last hand-over", b, t0, at["base: request sent to the spare"]),
                ("worker: woken -> request received", w, at["worker woken"], at["worker: request received"]),
                ("worker: request -> says it fits", w, at["worker: request received"], at["worker: says it fits"]),
                ("worker: fits -> waits for a connection", w, at["worker: says it fits"],
                 at["worker: waits for a connection"]),
                ("worker: waits -> connection accepted", w, at["worker: waits for a connection"], acc),
                ("worker: accepted -> response written", w, acc, at["worker: response written"])]
        for name, tl, a, z in path:
            if a is None or z is None or z < a:
                continue
            parts = tl.split(a, z)
            ph = phases.setdefault(name, {"total": [], "run": [], "wait": [], "sleep": []})
            ph["total"].append((z - a) * 1000)
            for k in ("run", "wait", "sleep"):
                ph[k].append(parts[k] * 1000)
            for who, s in parts["by"].items():
                who = next((k for k, p in pids.items() if p == who), comms.get(who, str(who)))
                thieves[who] = thieves.get(who, 0.0) + s * 1000
    print(f"{n} adoptions by a warm spare under the kernel's tracer (load average "
          f"{min(loads):.1f}-{max(loads):.1f}); ms after the request was sent:")
    print(f"  {'p50':>7} {'min':>7} {'max':>7}  step")
    for k, xs in steps.items():
        print(f"  {statistics.median(xs):7.3f} {min(xs):7.3f} {max(xs):7.3f}  {k}"
              + (f" ({len(xs)} of {n})" if len(xs) < n else ""))
    print("the first 200's path, ms, p50 (min): total, running, waiting for a CPU, asleep:")
    for name, ph in phases.items():
        cols = "  ".join(f"{k} {statistics.median(ph[k]):6.3f} ({min(ph[k]):5.3f})"
                         for k in ("total", "run", "wait", "sleep"))
        print(f"  {name:40} {cols}")
    top = sorted(thieves.items(), key=lambda kv: -kv[1])[:8]
    print("who had the CPU while the path waited for one (ms, all adoptions): "
          + ", ".join(f"{who} {ms:.1f}" for who, ms in top))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strace", action="store_true")
    ap.add_argument("--sched", action="store_true", help="n adoptions under the kernel's tracer (tracefs)")
    ap.add_argument("-v", "--verbose", action="store_true", help="with --sched: each adoption's switches")
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--program", default=basevassal.PROGRAM)
    ap.add_argument("--second", action="store_true", help="a second request after the first 200")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (the trace)")
    ap.add_argument("--master-false", action="store_true", help="the vassal without a master (one process)")
    args = ap.parse_args()
    if args.master_false:
        VASSAL_ARGS.append("--master=false")
    basevassal.PROGRAM = os.path.abspath(args.program)
    set_child_subreaper()
    tmp = tempdir()
    procs, ports = Procs(tmp), Ports()
    try:
        base = Base(procs, APPS["heavy"], tmp / "fs.sock", "base",
                    ("--early-warmup", "/", "--fork-server-spares", "1"))
        try:
            if args.strace:
                traced(base, procs, tmp, ports.get())
                return 0
            if args.sched:
                sched_adoptions(base, ports, args.n, args.verbose)
                return 0
            rows = []
            costs: dict[str, list[tuple[float, int]]] = {}
            for _ in range(args.n):
                base.wait_spares(1)
                m = one_adoption(base, ports.get(), costs, args.second)
                t0 = m["request sent"]
                rows.append({k: (v - t0) * 1000 for k, v in m.items() if k != "pid"})
            print(f"{args.n} adoptions by a warm spare, client's marks after the request was sent, p50 "
                  f"(load average {os.getloadavg()[0]:.1f}):")
            for k in rows[0]:
                print(f"  {statistics.median(r[k] for r in rows):7.3f} ms  {k}")
            print("CPU and minor faults of each process from the request to the first 200, p50:")
            for k, xs in costs.items():
                print(f"  {statistics.median(c for c, _ in xs):7.3f} ms  {statistics.median(f for _, f in xs):6.0f} "
                      f"faults  {k}")
        finally:
            base.stop()
    finally:
        procs.cleanup()
        if not args.keep:
            rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
