#!/usr/bin/env python3
"""What a request costs nginx, counted rather than timed: its instructions
(valgrind's callgrind) and its system calls (strace), for the front door's
generated configuration and edits of it.

usage: bench/front_nginx_instr.py [-n 400] [VARIANT=EDIT ...]

On a machine shared with others' benchmarks, nginx's CPU time a request
moves by more (10 us between rounds of the same configuration) than the
changes worth trying (a few us), and this machine has no hardware counters
for `perf stat -e instructions`. Counts do not depend on the load: one
Emperor (hello world, a vassal on the UNIX socket of a vassal with
`domain`, 2 workers), and for each VARIANT a copy of the configuration its
nginx runs, with EDIT applied (`OLD->NEW`, `;;` between several, as in
bench/front_nginx_ab.py; `base` is the copy unedited), run as one process
(`master_process off`) under callgrind, then under strace, each loaded
with N and then 2N keep-alive GETs (4 connections, in turn): the
difference of the two runs is N requests, without start-up and exit.
Printed: user-space instructions a request (nginx and the libraries it
calls: PCRE, libc) and system calls a request, by call.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from benchlib import Ports, Procs, rmtree, set_child_subreaper, wait_200  # noqa: E402
from emperor_run import EmperorRun, base_ini  # noqa: E402
from front_load import vassal_ini, write_vassal  # noqa: E402
from front_nginx_ab import edited  # noqa: E402

HOST = "unix.localhost"
CONNECTIONS = 4


def load(port: int, n: int) -> None:
    """n GETs with `Host: HOST` over CONNECTIONS kept connections, in turn."""
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=60) for _ in range(CONNECTIONS)]
    try:
        for i in range(n):
            c = conns[i % CONNECTIONS]
            c.request("GET", "/", headers={"Host": HOST})
            r = c.getresponse()
            r.read()
            if r.status != 200:
                raise SystemExit(f"front_nginx_instr: status {r.status}")
    finally:
        for c in conns:
            c.close()


def one_run(procs: Procs, wrapper: list[str], d: Path, conf: str, port: int, n: int) -> Path:
    """nginx under `wrapper` (its output file in `d`), n requests, a
    graceful stop; the wrapper's output file."""
    (d / "tmp").mkdir(parents=True, exist_ok=True)
    (d / "nginx.conf").write_text(conf)
    out = d / "out"
    out.unlink(missing_ok=True)
    argv = [a.replace("OUT", str(out)) for a in wrapper] + ["nginx", "-p", str(d), "-c", str(d / "nginx.conf")]
    p = procs.spawn(argv, log=f"instr-{d.name}")
    try:
        wait_200(port, 120, "/", lambda: p.poll() is None, host=HOST)
        load(port, n)
    finally:
        # nginx's own pid (strace's child; valgrind runs in nginx's process):
        # a graceful stop, after which callgrind and strace write their counts
        try:
            os.kill(int((d / "nginx.pid").read_text()), signal.SIGQUIT)
        except (OSError, ValueError):
            os.kill(p.pid, signal.SIGQUIT)
        deadline = time.monotonic() + 120
        while p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if p.poll() is None:
            procs.stop_tree(p.pid, signal.SIGKILL)
    return out


def instructions(path: Path) -> int:
    m = re.search(r"^(?:summary|totals):\s*(\d+)", path.read_text(), re.M)
    if not m:
        raise SystemExit(f"front_nginx_instr: no totals in {path}")
    return int(m.group(1))


def syscalls(path: Path) -> Counter:
    """strace -c's table: calls by name."""
    out: Counter = Counter()
    for line in path.read_text().splitlines():
        f = line.split()  # % time, seconds, usecs/call, calls, [errors], syscall
        if len(f) >= 5 and re.fullmatch(r"[\d.]+", f[0]) and f[3].isdigit() and f[-1] != "total":
            out[f[-1]] += int(f[3])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=400, help="requests of the shorter run (the longer: 2n)")
    ap.add_argument("variants", nargs="*", metavar="NAME=EDIT")
    args = ap.parse_args()
    set_child_subreaper()
    tmp = Path(tempfile.mkdtemp(prefix="front-instr-"))
    tmp.chmod(0o755)  # nginx's workers (www-data under root) reach the sockets
    procs, ports = Procs(tmp), Ports()
    vdir = tmp / "v"
    vdir.mkdir()
    (vdir / "base.ini").write_text(base_ini("hello", tmp / "base.sock"))
    write_vassal(vdir, "unix", vassal_ini("unix", "domain = unix.localhost", "processes = 2",
                                          "disable-logging = true"))
    front = ports.get()
    em = EmperorRun(procs, vdir, "emperor", ["--http", f"127.0.0.1:{front}", "--run-dir", str(tmp / "run"),
                                             "--nginx-workers", "1"])
    try:
        wait_200(front, 60, "/", em.alive, host=HOST)
        conf = (tmp / "run" / "nginx" / "nginx.conf").read_text()
        print(f"{args.n} and {2 * args.n} requests, {CONNECTIONS} kept connections; "
              f"load {open('/proc/loadavg').read().strip()}")
        for spec in ["base=", *args.variants]:
            name, _, edit = spec.partition("=")
            d = tmp / f"nginx-{name}"
            port = ports.get()
            text = edited(conf, edit) if edit else conf
            text = text.replace(f"127.0.0.1:{front}", f"127.0.0.1:{port}")
            text = text.replace("master_process on;", "master_process off;")
            text = text.replace(str(tmp / "run" / "nginx" / "nginx.pid"), str(d / "nginx.pid"))
            text = text.replace(str(tmp / "run" / "nginx" / "tmp"), str(d / "tmp"))
            text = text.replace("access_log /dev/stdout", f"access_log {d / 'access.log'}")
            ir, calls = [], []
            for n in (args.n, 2 * args.n):
                out = one_run(procs, ["valgrind", "--tool=callgrind", "--callgrind-out-file=OUT"], d, text, port, n)
                ir.append(instructions(out))
                out = one_run(procs, ["strace", "-c", "-o", "OUT"], d, text, port, n)
                calls.append(syscalls(out))
            per = (ir[1] - ir[0]) / args.n
            diff = {k: (calls[1][k] - calls[0][k]) / args.n for k in calls[1]}
            total = sum(diff.values())
            top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(diff.items(), key=lambda kv: -kv[1]) if v >= 0.01)
            print(f"{name:10s} {per:9.0f} instructions a request; {total:.2f} system calls a request: {top}",
                  flush=True)
        return 0
    finally:
        em.stop()
        procs.cleanup()
        rmtree(tmp)


if __name__ == "__main__":
    sys.exit(main())
