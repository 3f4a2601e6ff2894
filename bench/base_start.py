#!/usr/bin/env python3
"""A base's start-up under `emperor run`: where the time to listening goes.

    .venv/bin/python bench/base_start.py N [heavy|hello] [--rounds R] [EMPEROR ARGS...]

`emperor run` (soft RLIMIT_NOFILE 1,024, as `--only thousand`) on a base
and N vassal files, stopped as soon as the base listens (the adoptions it
began by then are few). Printed per round, from the Emperor's log and
`/proc`: the Emperor's start to its watching the directory, to the base's
start, the base's load of its codebase (to its first line, which it logs
once loaded), its steps from there to listening, its CPU, minor faults and
time waiting for a core, and the Emperor's CPU by then. With
`PYTHONPATH=OLD` (an export of another commit's `perl` and
`psgi_forkserver`) the Emperor and the Perl code of that commit run, to put
two side by side: alternate them in one shell loop.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from benchlib import Procs, read_or_none as _read, rmtree, set_child_subreaper, tempdir  # noqa: E402
from emperor_run import start_fleet, wait_fork_server  # noqa: E402
from fleet_floor import sched_times as cpu  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def faults_and_times(pid: int) -> tuple[int, float, float] | None:
    """(minor faults, user s, system s)."""
    s = _read(f"/proc/{pid}/stat")
    if not s:
        return None
    f = s[s.rindex(")") + 2:].split()
    return int(f[7]), int(f[11]) / TICK, int(f[12]) / TICK


def stamp(line: str) -> float:
    return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()


def one(n: int, app: str, extra: list[str]) -> dict:
    tmp = tempdir()
    procs = Procs(tmp)
    seen: dict = {}
    try:
        load = os.getloadavg()[0]
        t_wall = time.time()
        em, _ = start_fleet(procs, tmp, app, n, extra)
        e = em.proc.pid
        stop = threading.Event()

        def sample() -> None:  # the base's counters, last seen before it listened
            while not stop.is_set():
                for k in (_read(f"/proc/{e}/task/{e}/children") or "").split():
                    if "ForkServer" in (_read(f"/proc/{k}/cmdline") or "") or "fork server" in (
                            _read(f"/proc/{k}/cmdline") or ""):
                        seen.setdefault("base", int(k))
                if "base" in seen:
                    c, f = cpu(seen["base"]), faults_and_times(seen["base"])
                    if c and f:
                        seen["base_cpu"], seen["base_stat"] = c, f
                seen["emperor_cpu"] = cpu(e)
                time.sleep(0.005)
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        wait_fork_server(tmp / "base.sock", em, 120)
        t_listen = time.time()
        stop.set()
        th.join()
        em.stop()
        log = (tmp / "emperor.log").read_text(errors="replace").splitlines()
    finally:
        procs.cleanup()
        rmtree(tmp)

    def at(pattern: str) -> float | None:
        line = next((x for x in log if re.search(pattern, x)), None)
        return stamp(line) - t_wall if line else None
    return {"load": load, "watching": at(r"emperor: watching "), "base_started": at(r"started base vassal"),
            "loaded": at(r"\[base\] psgi-vassal"), "listening_logged": at(r"fork server listening on"),
            "listening": t_listen - t_wall, "base_cpu": seen.get("base_cpu"), "base_stat": seen.get("base_stat"),
            "emperor_cpu": seen.get("emperor_cpu"),
            "huge": next((m.group(1) for x in log for m in [re.search(r"(huge pages: [^;)]*)", x)] if m), "?")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", type=int)
    ap.add_argument("app", nargs="?", default="heavy")
    ap.add_argument("--rounds", type=int, default=1)
    args, extra = ap.parse_known_args()
    set_child_subreaper()
    for _ in range(args.rounds):
        r = one(args.n, args.app, extra)

        def s(x: float | None) -> str:
            return f"{x:.2f}" if x is not None else "?"
        c, st, ec = r["base_cpu"], r["base_stat"], r["emperor_cpu"]
        print(f"{args.n} {args.app} files, load average {r['load']:.1f}: Emperor watching at {s(r['watching'])} s, "
              f"base started {s(r['base_started'])} s, loaded (first line) {s(r['loaded'])} s, listening "
              f"{s(r['listening_logged'])} s (seen {r['listening']:.2f} s)")
        if c and st:
            print(f"  base: {c[0]:.2f} s on a core, {c[1]:.2f} s waiting for one; {st[0]} minor faults, "
                  f"user {st[1]:.2f} s, system {st[2]:.2f} s; {r['huge']}")
        if ec:
            print(f"  Emperor: {ec[0]:.2f} s on a core, {ec[1]:.2f} s waiting for one, by then")
    return 0


if __name__ == "__main__":
    sys.exit(main())
