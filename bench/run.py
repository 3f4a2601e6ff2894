#!/usr/bin/env python3
"""psgi-forkserver benchmarks: adoption speed and memory against cold starts
and Starman, in one run, one process tree.

usage: bench/run.py --quick | --full [--only SCENARIO,...] [--results DIR]

See bench/README.md for what each figure is and how it is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import adoptions  # noqa: E402
import cold  # noqa: E402
import deploy  # noqa: E402
import fleet  # noqa: E402
import fleet_floor  # noqa: E402
import front  # noqa: E402
import harnesses  # noqa: E402
import health  # noqa: E402
import serving  # noqa: E402
import spares  # noqa: E402
import templates  # noqa: E402
import uss  # noqa: E402
import uwsgi21  # noqa: E402
from benchlib import BenchError, Ports, Procs, machine_info, rmtree, set_child_subreaper, tempdir  # noqa: E402
from basevassal import Base  # noqa: E402
from emperor_run import EmperorRun, base_ini, vassal_ini, wait_fork_server, wait_loyal_count  # noqa: E402
from report import markdown, render_table, table  # noqa: E402
from settings import APPS, EMPEROR, FULL, PROGRAM, QUICK, ROOT, TARGETS, Bench, say  # noqa: E402


def front_door(b: Bench) -> None:
    """Scenario `front` (bench/front.py)."""
    b.results["front"] = front.run(b.procs, b.ports, b.tmp, EmperorRun, base_ini, b.quick,
                                   b.sizes.wrk_duration, b.step)


def health_checks(b: Bench) -> None:
    """Scenario `health` (bench/health.py)."""
    b.results["health"] = b.step("health", lambda: health.run(
        b.procs, b.ports, b.tmp, EmperorRun, base_ini, vassal_ini, wait_loyal_count, say,
        seconds=5 if b.quick else 10))


def floor_profile(b: Bench) -> None:
    """Scenario `floor` (bench/fleet_floor.py)."""
    b.results["floor_profile"] = fleet_floor.run(b.procs, b.ports, b.tmp, b.quick, b.step, say, EmperorRun, Base,
                                                 wait_fork_server, APPS, PROGRAM, with_burst=not b.floor_only)


def idle_uss(b: Bench) -> None:
    """Scenario `uss` (bench/uss.py)."""
    # forked, from spares, and (a variant) forked without a master
    b.results["uss"] = [x for sp, lines in ((0, ()), (2, ()), (0, ("master = false",)))
                        if (x := b.step(f"uss {sp} {' '.join(lines)}".strip(), lambda: uss.run(
                            b.procs, b.ports, b.tmp, EmperorRun, base_ini, vassal_ini, wait_fork_server,
                            wait_loyal_count, say, spares=sp, lines=lines)))]


# Every scenario, in the order a run takes them: (the name `--only` takes,
# the function that fills its part of the results). A new scenario is a
# module of its own with a `run(b: Bench)` and one line here.
SCENARIOS: list[tuple[str, Callable[[Bench], None]]] = [
    ("adoption", adoptions.run),
    ("spares", spares.run),
    ("uwsgi21", uwsgi21.run),
    ("cold", cold.run),
    ("fleet", fleet.run_fleet),
    ("mass", fleet.run_mass),
    ("thousand", fleet.run_thousand),
    ("floor", floor_profile),
    ("uss", idle_uss),
    ("deploy", deploy.run),
    ("front", front_door),
    ("prove", harnesses.run_prove),
    ("plack", harnesses.run_plack),
    ("templates", templates.run),
    ("health", health_checks),
    ("serving", serving.run),
]
NAMES = [name for name, _ in SCENARIOS]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="about a minute, smaller samples")
    mode.add_argument("--full", action="store_true", help="the figures to publish")
    ap.add_argument("--only", default=",".join(NAMES),
                    help=f"comma-separated subset of {','.join(NAMES)} (default: all)")
    ap.add_argument("--results", type=Path, default=HERE / "results", help="where reports go")
    ap.add_argument("--floor-only", action="store_true",
                    help="`floor`: the single adoptions only, without the mass start after them")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="print and rewrite the Markdown report of an earlier run from its JSON")
    if argv is None and "--render" in sys.argv:
        mode.required = False
    args = ap.parse_args(argv)
    if args.render:
        r = json.loads(args.render.read_text())
        if r.get("fleet", {}).get("memory"):
            fleet.add_increments(r["fleet"]["memory"])
        rows = table(r)
        print(render_table(rows))
        args.render.with_suffix(".md").write_text(markdown(r, rows))
        args.render.write_text(json.dumps(r, indent=1, default=str) + "\n")
        return 0
    sizes = QUICK if args.quick else FULL
    only = set(args.only.split(","))
    if only - set(NAMES):
        ap.error(f"unknown scenario(s): {', '.join(sorted(only - set(NAMES)))}")
    for tool in ("perl", "starman", "uwsgi", "wrk"):
        if not any(os.access(os.path.join(d, tool), os.X_OK) for d in os.environ.get("PATH", "").split(":")):
            ap.error(f"{tool} not found on PATH (run `make setup`)")
    if not os.access(EMPEROR, os.X_OK) and only & {"fleet", "mass"}:
        ap.error(f"{EMPEROR} missing (run `make setup`)")

    # Ctrl-C arrives as KeyboardInterrupt; SIGTERM and SIGHUP too, so that
    # the finally clauses stop everything.
    def on_term(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    set_child_subreaper()
    started = datetime.now(timezone.utc)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    r: dict = {
        "mode": "quick" if args.quick else "full",
        "started": started.isoformat(timespec="seconds"),
        "command": shlex.join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT))
                               else sys.executable, os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
        "sizes": sizes.__dict__,
        "targets": TARGETS,
        "machine": machine_info(),
        "errors": [],
    }
    tmp = tempdir()
    procs = Procs(tmp)
    t_start = time.perf_counter()
    interrupted = False

    def step(name: str, fn):
        try:
            return fn()
        except BenchError as e:
            say(f"  ERROR in {name}: {e}")
            r["errors"].append(f"{name}: {e}")
            return None

    bench = Bench(procs=procs, ports=Ports(), tmp=tmp, sizes=sizes, quick=args.quick, results=r, step=step,
                  floor_only=args.floor_only)
    try:
        for name, scenario in SCENARIOS:
            if name in only:
                scenario(bench)
    except KeyboardInterrupt as e:
        interrupted = True
        why = str(e) or "SIGINT"
        say(f"interrupted ({why}): stopping everything")
        r["errors"].append(f"interrupted ({why})")
    finally:
        killed = procs.cleanup()
        if killed:
            say(f"cleanup: SIGKILLed leftover pids {killed}")
            r["cleanup_killed"] = killed
        if r["errors"]:
            # keep the logs of a failed run where the report says
            logs = args.results / f"{stamp}-logs"
            logs.mkdir(parents=True, exist_ok=True)
            for f in tmp.glob("*.log"):
                os.replace(f, logs / f.name)
            r["logs"] = str(logs)
        rmtree(tmp)
    r["duration_s"] = time.perf_counter() - t_start

    rows = table(r)
    print(render_table(rows))
    if r["errors"]:
        print("\nerrors:\n" + "\n".join(f"  {e}" for e in r["errors"]))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stamp}.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    md = markdown(r, rows)
    (args.results / f"{stamp}.md").write_text(md)
    if not interrupted:
        (args.results / "latest.md").write_text(md)
    print(f"\nwrote {args.results / stamp}.json, .md" + ("" if interrupted else " and latest.md"))
    return 130 if interrupted else (1 if r["errors"] else 0)


if __name__ == "__main__":
    sys.exit(main())
