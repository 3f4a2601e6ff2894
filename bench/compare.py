#!/usr/bin/env python3
"""Two (or more) versions of the vassal program side by side, in one run,
rounds alternating, so that a shared machine's drifting load falls on all
alike.

    .venv/bin/python bench/compare.py floor  [--rounds 3] [-n 20] [--master-false] [--huge-heap] NAME=PROGRAM ...
    .venv/bin/python bench/compare.py spares|spares-polled [--rounds 3] [-n 10] [--uwsgi21] NAME=PROGRAM ...

PROGRAM is a `perl/ForkServer.pm`, e.g. of an older commit exported with
`git archive REV perl | tar -x -C DIR` (then DIR/perl/ForkServer.pm).

- `floor`: the floor's single adoptions (fleet_floor.floor: no spares, the
  socket bound by the requester, to the first 200 on /hello): CPU of the
  base's clone, the vassal master and its worker, and their page faults;
  with `--master-false` (floor and spares), each program also as
  `NAME/master=false` (the vassal's one process serves), in the same rounds;
- `spares`: adoption -> first 200 on the heavy app's `/` from a base with
  `early-warmup = /` and 2 warm spares, the socket bound by the requester
  (the spares bench's row);
- `spares-polled`: the same, the vassal binding its own http-socket and
  the client polling it (the uwsgi21 bench's way).

With `--uwsgi21` (and $UWSGI21, bench/uwsgi21.py), each round also takes n
adoptions -> first 200 from uWSGI 2.1's fork server (its vassal binds its
own socket, the client polls it: the uwsgi21 bench's row), and each
program's p50 is given as a ratio of uWSGI 2.1's.

Prints each round and the medians over the rounds (floor) or over every
sample (spares), with the load average at each round's start.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import adoptions  # noqa: E402
import basevassal  # noqa: E402
import fleet_floor  # noqa: E402
import uwsgi21  # noqa: E402
from benchlib import Ports, Procs, rmtree, set_child_subreaper, tempdir  # noqa: E402
from settings import APPS  # noqa: E402


def floor_round(procs: Procs, ports: Ports, tmp: Path, n: int,
                vassal_args: tuple[str, ...] = ()) -> dict[str, float]:
    fl = fleet_floor.floor(procs, ports, tmp, basevassal.Base, APPS["heavy"], basevassal.PROGRAM, n,
                           lambda m: None, vassal_args)
    c = fl["mean_cpu_ms"]
    a = fl["anatomy"]
    row = {"clone_ms": c["base_cpu_ms"], "master_ms": c["master_cpu_ms"], "worker_ms": c["worker_cpu_ms"],
           "total_ms": fl["cpu_per_vassal_ms"], "clone_faults": fl["base_faults"]["p50"],
           "master_faults": fl["master_faults"]["p50"], "worker_faults": fl["worker_faults"]["p50"]}
    # the last vassal's own pages (fleet_floor.own_pages) and the base's
    # memory left in 2 MB pages after serving, where readable
    for k in ("master_own_pages", "worker_own_pages"):
        if a.get(k) is not None:
            row[k.replace("_own_pages", "_own")] = float(sum(a[k].values()))
    if a.get("base_huge_mb_after") is not None:
        row["base_huge_mb"] = a["base_huge_mb_after"]
    return row


def spares_round(procs: Procs, ports: Ports, tmp: Path, n: int, bound: bool = True,
                 vassal_args: tuple[str, ...] = ()) -> list[float]:
    x = adoptions.adoption_latency(procs, ports, tmp, "heavy", n, "/",
                                   ("--early-warmup", "/", "--fork-server-spares", "2"), bound=bound,
                                   vassal_extra=vassal_args)
    return x["samples_first_200_ms"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("floor", "spares", "spares-polled"))
    ap.add_argument("programs", nargs="+", metavar="NAME=PROGRAM")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", type=int, default=None, help="adoptions per round (floor 20, spares 10)")
    ap.add_argument("--uwsgi21", action="store_true", help="spares: uWSGI 2.1's fork server too, each round")
    ap.add_argument("--master-false", action="store_true",
                    help="each program also with master = false (NAME/master=false)")
    ap.add_argument("--huge-heap", action="store_true",
                    help="each program also with its base's heap in 2 MB pages from the start "
                         "(NAME/huge-heap: GLIBC_TUNABLES=glibc.malloc.hugetlb=1, an operator's opt-in)")
    args = ap.parse_args()
    confs = []
    for a in args.programs:
        name, _, prog = a.partition("=")
        if not prog or not os.path.isfile(prog):
            ap.error(f"{a}: not NAME=PATH of a ForkServer.pm")
        confs.append((name, os.path.abspath(prog), ()))
        if args.master_false:
            confs.append((f"{name}/master=false", os.path.abspath(prog), fleet_floor.SOLO_ARGS))
        if args.huge_heap:
            confs.append((f"{name}/huge-heap", os.path.abspath(prog), ()))
    n = args.n or (20 if args.what == "floor" else 10)
    binary = None
    if args.uwsgi21:
        binary, why = uwsgi21.uwsgi21_binary()
        if args.what == "floor" or binary is None:
            ap.error(f"--uwsgi21: {why if binary is None else 'for spares and spares-polled only'}")
    set_child_subreaper()
    tmp = tempdir()
    procs, ports = Procs(tmp), Ports()
    floors: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in confs}
    samples: dict[str, list[float]] = {name: [] for name, _, _ in confs}
    loads = []
    uw = None
    uw_samples: list[float] = []
    try:
        if binary:
            uw = uwsgi21.Uwsgi21(procs, tmp, binary)
        for r in range(args.rounds):
            if uw is not None:
                load = os.getloadavg()[0]
                loads.append(load)
                got = [uw.adopt(ports)[1] * 1000 for _ in range(n)]
                uw_samples += got
                print(f"round {r + 1} uWSGI 2.1: adoption -> first 200 p50 {statistics.median(got):.2f} ms "
                      f"(load {load:.1f})", flush=True)
            for name, prog, vassal_args in confs:
                basevassal.PROGRAM = prog
                basevassal.HUGE_HEAP = name.endswith("/huge-heap")
                load = os.getloadavg()[0]
                loads.append(load)
                if args.what == "floor":
                    row = floor_round(procs, ports, tmp, n, vassal_args)
                    floors[name].append(row)
                    print(f"round {r + 1} {name}: " + " ".join(f"{k} {v:.2f}" for k, v in row.items())
                          + f" (load {load:.1f})", flush=True)
                else:
                    got = spares_round(procs, ports, tmp, n, bound=args.what == "spares", vassal_args=vassal_args)
                    samples[name] += got
                    print(f"round {r + 1} {name}: adoption -> first 200 p50 {statistics.median(got):.2f} ms "
                          f"(load {load:.1f})", flush=True)
    finally:
        if uw is not None:
            uw.stop()
        procs.cleanup()
        rmtree(tmp)
    print(f"medians ({args.rounds} rounds, load average {min(loads):.1f}-{max(loads):.1f} at their starts):")
    for name, _, _ in confs:
        if args.what == "floor":
            rows = floors[name]
            print(f"  {name}: " + " ".join(f"{k} {statistics.median(x[k] for x in rows if k in x):.2f}" for k in rows[0]))
        else:
            xs = sorted(samples[name])
            ratio = f", {statistics.median(xs) / statistics.median(uw_samples):.3f}x uWSGI 2.1" if uw_samples else ""
            print(f"  {name}: adoption -> first 200 p50 {statistics.median(xs):.2f} ms "
                  f"(min {xs[0]:.2f}, p25 {xs[len(xs) // 4]:.2f}, p75 {xs[3 * len(xs) // 4]:.2f}) over {len(xs)}{ratio}")
    if uw_samples:
        xs = sorted(uw_samples)
        print(f"  uWSGI 2.1: adoption -> first 200 p50 {statistics.median(xs):.2f} ms (min {xs[0]:.2f}) over {len(xs)}"
              f" (its vassal binds its socket, the client polls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
