#!/usr/bin/env python3
"""nginx configurations of the front door side by side, in one command.

usage: bench/front_nginx_ab.py [--rounds N] [--duration 2s] [VARIANT=EDIT ...]

One Emperor (hello world, two vassals of 2 workers: one on a TCP
http-socket, one on a UNIX socket routed by name), its own nginx, and one
more nginx per VARIANT, each a copy of the configuration the Emperor wrote
with EDIT applied: `OLD->NEW` replaces text (`worker_processes 2->
worker_processes 1`; `;;` separates several), so every variant differs
from the base by what it says and nothing else. Each round loads the
vassal's own port, the Emperor's nginx and every variant with `wrk -t2
-c16` (the next round in the reverse order); printed are the medians of
the rate, p50, p99 and of the CPU a request of wrk, nginx and the vassal
(bench/front_cpu.py), beside the load average and the cores others used.

Example:
  bench/front_nginx_ab.py --rounds 6 'w1=worker_processes 2->worker_processes 1' \\
      'nobuf=proxy_redirect off;->proxy_redirect off; proxy_buffering off;'
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from benchlib import Ports, Procs, rmtree, set_child_subreaper, wait_200  # noqa: E402
from emperor_run import EmperorRun, base_ini  # noqa: E402
from front_cpu import Groups, wrk_measured  # noqa: E402
from front_load import vassal_ini, write_vassal  # noqa: E402

import psutil  # noqa: E402


def edited(conf: str, edit: str) -> str:
    for part in filter(None, (p.strip() for p in edit.split(";;"))):
        old, arrow, new = part.partition("->")
        if not arrow or old not in conf:
            raise SystemExit(f"front_nginx_ab: {part!r}: not `OLD->NEW` with OLD in the configuration")
        conf = conf.replace(old, new)
    return conf


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", default="2s")
    ap.add_argument("--workers", type=int, default=2, help="nginx workers of the base (default 2)")
    ap.add_argument("--control", metavar="NAME",
                    help="also print each variant's nginx CPU a request minus NAME's, round by round "
                         "(median and quartiles): NAME a variant with a no-op edit, so that both "
                         "write their access log alike")
    ap.add_argument("variants", nargs="*", metavar="NAME=EDIT")
    args = ap.parse_args()
    set_child_subreaper()
    tmp = Path(tempfile.mkdtemp(prefix="front-ab-"))
    tmp.chmod(0o755)  # nginx's workers (www-data under root) reach the sockets
    procs, ports = Procs(tmp), Ports()
    vdir = tmp / "v"
    vdir.mkdir()
    (vdir / "base.ini").write_text(base_ini("hello", tmp / "base.sock"))
    direct = ports.get()
    common = ["processes = 2", "disable-logging = true"]
    write_vassal(vdir, "tcp", vassal_ini("tcp", f"http-socket = 127.0.0.1:{direct}", "domain = tcp.localhost",
                                         *common))
    write_vassal(vdir, "unix", vassal_ini("unix", "domain = unix.localhost", *common))
    front = ports.get()
    em = EmperorRun(procs, vdir, "emperor", ["--http", f"127.0.0.1:{front}", "--run-dir", str(tmp / "run"),
                                             "--nginx-workers", str(args.workers)])
    nginxes = []
    try:
        wait_200(front, 60, "/", em.alive, host="unix.localhost")
        conf = (tmp / "run" / "nginx" / "nginx.conf").read_text()
        targets = {"direct": (f"http://127.0.0.1:{direct}/", None),
                   "base": (f"http://127.0.0.1:{front}/", "unix.localhost")}
        for spec in args.variants:
            name, _, edit = spec.partition("=")
            d = tmp / f"nginx-{name}"
            (d / "tmp").mkdir(parents=True)
            port = ports.get()
            text = edited(conf, edit).replace(f"127.0.0.1:{front}", f"127.0.0.1:{port}")
            text = text.replace(str(tmp / "run" / "nginx" / "nginx.pid"), str(d / "nginx.pid"))
            text = text.replace(str(tmp / "run" / "nginx" / "tmp"), str(d / "tmp"))
            text = text.replace("access_log /dev/stdout", f"access_log {d / 'access.log'}")
            (d / "nginx.conf").write_text(text)
            p = procs.spawn(["nginx", "-p", str(d), "-c", str(d / "nginx.conf")], log=f"nginx-{name}")
            nginxes.append(p)
            wait_200(port, 30, "/", lambda: p.poll() is None, host="unix.localhost")
            targets[name] = (f"http://127.0.0.1:{port}/", "unix.localhost")
        # each target's own processes: its nginx's workers and the vassal
        # (not every nginx: an idle one's timers would count for the others)
        emperor_groups = Groups.under_emperor(em.ps)
        vassal = sorted(emperor_groups.pids().get("vassal", ()))
        groups = {"direct": Groups({"vassal": vassal}), "base": emperor_groups}
        for name, p in zip(list(targets)[2:], nginxes):
            groups[name] = Groups({"nginx": [q.pid for q in psutil.Process(p.pid).children()], "vassal": vassal})
        for k, (url, host) in targets.items():  # warm-up
            wrk_measured(url, "1s", groups[k], host)
        runs: dict[str, list[dict]] = {k: [] for k in targets}
        names = list(targets)
        for i in range(args.rounds):
            for k in names if i % 2 == 0 else names[::-1]:
                runs[k].append(wrk_measured(targets[k][0], args.duration, groups[k], targets[k][1]))
        print(f"load {open('/proc/loadavg').read().strip()}; {args.rounds} rounds of {args.duration}")
        for k, rs in runs.items():
            rs = [r for r in rs if r.get("cpu_us")]
            med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
            cpu = {role: med(lambda r: r["cpu_us"].get(role, 0)) for role in ("wrk", "nginx", "vassal")}
            print(f"{k:10s} {med(lambda r: r['rps']):8.0f} req/s  p50 {med(lambda r: r['p50_ms']):6.2f} "
                  f"p99 {med(lambda r: r['p99_ms']):6.2f} ms  CPU us a request: "
                  + " ".join(f"{role} {v:5.1f}" for role, v in cpu.items())
                  + f"  others' cores {med(lambda r: r['cores_others']):.2f}")
        if args.control in runs:
            # round by round: the two ran seconds apart, under about the same load
            print(f"nginx CPU a request minus {args.control}'s in the same round (us): median (quartiles), "
                  "rounds lower")
            for k, rs in runs.items():
                if k in ("direct", args.control):
                    continue
                diffs = [a["cpu_us"]["nginx"] - b["cpu_us"]["nginx"] for a, b in zip(rs, runs[args.control])
                         if a.get("cpu_us") and b.get("cpu_us")]
                if len(diffs) < 2:
                    continue
                q = statistics.quantiles(diffs, n=4)
                print(f"{k:10s} {statistics.median(diffs):+6.1f} ({q[0]:+.1f} to {q[2]:+.1f}), "
                      f"{sum(d < 0 for d in diffs)} of {len(diffs)}")
        return 0
    finally:
        for p in nginxes:
            procs.stop_tree(p.pid)
        em.stop()
        procs.cleanup()
        rmtree(tmp)


if __name__ == "__main__":
    sys.exit(main())
