#!/usr/bin/env python3
"""One warm-spare adoption, end to end, on a timeline.

    .venv/bin/python bench/spare_profile.py [--strace] [-n 20] [--program perl/ForkServer.pm]

A heavy base with `early-warmup = /` and one spare; each adoption passes a
socket bound here (as `emperor run` does), and one client connection is
made right after the pid reply and waits in its backlog: no polling, the
first 200 is what a real client sees. Without `--strace`: n adoptions,
the client's phases (request sent, pid reply, connect, first 200) p50.
With `--strace`: one adoption with `strace -ttt -f` attached to the base,
the spare and its warm worker; the steps of the adoption are picked out of
the trace and printed on one clock (the client's marks with them).
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


def cpu_faults(pid: int) -> tuple[float, int]:
    """CPU seconds (the scheduler's nanoseconds) and minor faults of a process so far."""
    with open(f"/proc/{pid}/schedstat") as f:
        ns = int(f.read().split()[0])
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return ns / 1e9, int(rest[7])


def one_adoption(base: Base, port: int, costs: dict | None = None, second: bool = False) -> dict[str, float]:
    """Client marks (time.time(), to line up with strace -ttt) of one adoption;
    with `costs`, each process's CPU and faults over the adoption too."""
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
        marks["request sent"] = time.time()
        pid, pipe, _, _ = base.adopt(["--http-socket", f"127.0.0.1:{port}", "--processes", "1"], listener)
        marks["pid reply read"] = time.time()
    finally:
        listener.close()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        marks["client connected (backlog)"] = time.time()
        s.sendall(f"GET / HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        first = s.recv(65536)
        marks["first response bytes"] = time.time()
        while s.recv(65536):
            pass
        marks["response read"] = time.time()
        s.close()
        if second:  # the steady state, for comparison
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(f"GET / HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            while s.recv(65536):
                pass
            s.close()
            marks["second response read"] = time.time()
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strace", action="store_true")
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--program", default=basevassal.PROGRAM)
    ap.add_argument("--second", action="store_true", help="a second request after the first 200")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (the trace)")
    args = ap.parse_args()
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
