"""Where the time of `emperor prove -j2 -l -r t` goes on a real suite, beside prove's.

    .venv/bin/python bench/prove_profile.py [--suites DIR] [--only Moo,Try-Tiny] [--repeat 3]

For each suite (bench/prove_suites.py's), in turn, `--repeat` times:

- `emperor prove -j2 -l -r t` with EMPEROR_PROVE_TRACE (the host's trace of
  every request, fork, exit, answer, with each process's CPU from wait4),
  its record of the suite filled by an untimed run first (the learned preload);
- `prove -j2 -l -r t`, its own CPU and its children's (from its summary line);
- the floor of a fresh `perl FILE` under prove: the CPU of `perl -e 1`, of
  `perl -MTest::More -e 1` and of `perl -Ilib -M<what emperor prove preloaded> -e 1`.

Prints the medians: wall; CPU of prove under us (App::Prove, TAP parsing,
and the files it ran cold), the base, the Python host, the forked tests;
how long 0, 1 and 2 forked tests were running between the first request
and the last exit; the latencies of a request, a fork and prove's turnaround.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prove_suites import EMPEROR, SUITES, clean_env, measured, suite_dir  # noqa: E402


def cpu_of(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """wall, CPU (the process tree's it waited for), stdout+stderr."""
    wall, cpu, p = measured(argv, cwd, env)
    return wall, cpu, p.stdout + p.stderr


def traced(d: Path, cache: Path, emperor: str) -> dict[str, float]:
    trace = Path(tempfile.mkdtemp(prefix="prove-trace-")) / "trace"
    env = {**clean_env(), "XDG_CACHE_HOME": str(cache), "EMPEROR_PROVE_TRACE": str(trace)}
    t0 = time.monotonic()
    wall, cpu, _ = cpu_of([emperor, "prove", "-j2", "-l", "-r", "t"], d, env)
    events = [line.split("\t") for line in trace.read_text().splitlines()]
    shutil.rmtree(trace.parent, ignore_errors=True)
    got = {"wall": wall, "CPU, all": cpu, "prove under us": 0.0, "base": 0.0, "Python host": 0.0,
           "forked tests": 0.0}
    req, fork, done, answered = {}, {}, {}, {}
    for at, event, what, _pid, used in events:
        t, c = float(at) - t0, float(used)
        if event == "exit":
            key = {"prove": "prove under us", "base": "base"}.get(what, "forked tests")
            got[key] += c
            if key == "forked tests":
                done[what] = t
        elif event == "end":
            got["Python host"] = c
        elif event == "request":
            req[what] = t
        elif event == "forked":
            fork[what] = t
        elif event == "answer":
            answered[what] = t
    if not fork:
        return got
    changes = sorted([(fork[f], 1) for f in fork] + [(done[f], -1) for f in fork if f in done])
    running = {0: 0.0, 1: 0.0, 2: 0.0}
    n, prev = 0, min(req.values())
    for t, step in changes:
        running[min(n, 2)] += t - prev
        n, prev = n + step, t
    got.update({f"{k} forked running (s)": v for k, v in running.items()})
    got["request -> forked (ms)"] = 1000 * statistics.median(fork[f] - req[f] for f in fork)
    starts = sorted(req.values())
    turn = [min((r for r in starts if r >= a), default=a) - a for a in answered.values()]
    got["answer -> next request (ms)"] = 1000 * statistics.median(turn)
    got["forked test run (ms, median)"] = 1000 * statistics.median(done[f] - fork[f] for f in fork if f in done)
    got["first request at"] = min(req.values())
    return got


def prove_side(d: Path, preloads: list[str]) -> dict[str, float]:
    env = clean_env()
    wall, cpu, out = cpu_of(["prove", "-j2", "-l", "-r", "t"], d, env)
    m = re.search(r"\(\s*([\d.]+) usr\s+([\d.]+) sys \+\s+([\d.]+) cusr\s+([\d.]+) csys", out)
    got = {"wall": wall, "CPU, all": cpu}
    if m:
        got["prove itself"] = float(m[1]) + float(m[2])
        got["test processes"] = float(m[3]) + float(m[4])
    for name, argv in (("perl -e 1", ["perl", "-e", "1"]),
                       ("perl -MTest::More -e 1", ["perl", "-MTest::More", "-e", "1"]),
                       ("perl -M(preloads) -e 1", ["perl", "-Ilib", *(f"-M{m} ()" for m in preloads), "-e", "1"])):
        got[f"{name} (ms)"] = 1000 * cpu_of(argv, d, env)[1]
    return got


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs if k in r) for k in runs[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", type=Path, default=Path("/work/suites"))
    ap.add_argument("--only", default="Moo,Try-Tiny,HTTP-Message")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--emperor", default=EMPEROR)
    args = ap.parse_args()
    for name in args.only.split(","):
        d = suite_dir(args.suites, SUITES[name])
        if d is None:
            print(f"{name}: not found in {args.suites}")
            continue
        cache = Path(tempfile.mkdtemp(prefix="prove-cache-"))
        _, _, out = cpu_of([args.emperor, "prove", "-j2", "-l", "-r", "t"], d,
                           {**clean_env(), "XDG_CACHE_HOME": str(cache)})  # fills the record
        _, _, out = cpu_of([args.emperor, "prove", "-j2", "-l", "-r", "t"], d,
                           {**clean_env(), "XDG_CACHE_HOME": str(cache)})  # names the learned preload
        m = re.search(r"preloaded \([^)]*\): (.*)", out)
        preloads = [p for p in (m[1].split(" and ")[0].split(", ") if m else []) if re.fullmatch(r"[\w:]+", p)]
        load0 = os.getloadavg()[0]
        ours, theirs = [], []
        for _ in range(args.repeat):
            ours.append(traced(d, cache, args.emperor))
            theirs.append(prove_side(d, preloads))
        shutil.rmtree(cache, ignore_errors=True)
        files = len(list((d / "t").rglob("*.t")))
        print(f"== {name} ({files} files), load {load0:.1f} -> {os.getloadavg()[0]:.1f}, "
              f"medians of {args.repeat}; preloaded: {', '.join(preloads[:8])}")
        for side, got in (("emperor prove", medians(ours)), ("prove", medians(theirs))):
            print(f"  {side}: " + "; ".join(f"{k} {v:.3f}" if "ms" not in k else f"{k} {v:.1f}"
                                              for k, v in got.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
