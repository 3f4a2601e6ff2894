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

    .venv/bin/python bench/prove_profile.py --bound [--only Moo] [--repeat 3]

The best any preloading runner can do on the suite, file by file: each file
alone, as prove runs it (`perl -Ilib FILE`, wall and CPU), and forked from a
base that already has everything that file loaded in the last run (its own
`emperor prove --preload ...` of that file, the fork's time from the trace);
a file that must run cold (the BEGIN rule, `$INC{...}` of a preloaded module,
yath's marker) counts its cold time. The forked times are then scheduled
on -j2 slots, longest first (the best order): the bound is that makespan,
or half the files' summed CPU if more (2 cores), with nothing for the
runner's own start. Beside it, the same plus our run's measured start (the
first request's time), and prove's `-j2` wall measured in the same loop:
prove / bound is the best ratio to prove any preloading runner can show.
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
from prove_suites import EMPEROR, SUITES, clean_env, measured, precompile, suite_dir  # noqa: E402


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
    # (a start before an end of the same instant: the count never goes below 0)
    changes = sorted([(fork[f], 1) for f in fork] + [(done[f], -1) for f in fork if f in done],
                     key=lambda change: (change[0], -change[1]))
    running = {0: 0.0, 1: 0.0, 2: 0.0}
    n, prev = 0, min(req.values())
    for t, step in changes:
        running[max(0, min(n, 2))] += t - prev
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


def lpt(times: list[float], slots: int = 2) -> float:
    """The makespan of `times` on `slots` slots, longest first."""
    ends = [0.0] * slots
    for t in sorted(times, reverse=True):
        i = ends.index(min(ends))
        ends[i] += t
    return max(ends)


def record_of(cache: Path) -> dict[str, dict[str, str]]:
    """emperor prove's record of the last run (an App::Prove::State YAML
    file): test file -> its fields (emperor_loads, emperor_cold, elapsed)."""
    tests: dict[str, dict[str, str]] = {}
    for f in (cache / "emperor-prove").glob("*.yml"):
        cur = None
        for line in f.read_text().splitlines():
            m = re.match(r"^  (\S.*):\s*$", line)
            if m:
                cur = tests.setdefault(m[1].strip("'\""), {})
                continue
            m = re.match(r"^    (\w+): (.*)$", line)
            if m and cur is not None:
                cur[m[1]] = m[2].strip("'\"")
    return tests


def loadable(d: Path, env: dict[str, str], modules: list[str]) -> list[str]:
    """Those of `modules` that load in a perl like the base's (-Ilib)."""
    if not modules:
        return []
    _, _, out = cpu_of(["perl", "-Ilib", "-e",
                        'for (@ARGV) { print "$_\n" if eval "require $_; 1" }', *modules], d, env)
    ok = set(out.split())
    return [m for m in modules if m in ok]


def one_forked(d: Path, file: str, preloads: list[str], emperor: str, env: dict[str, str]) -> tuple[float, float] | None:
    """`file` forked from a base that preloaded `preloads`: wall from fork to
    exit and the fork's CPU; None when it ran cold (no fork)."""
    trace = Path(tempfile.mkdtemp(prefix="prove-trace-")) / "trace"
    argv = [emperor, "prove", "--no-cold-retry", "--no-learn", *(f"--preload={m}" for m in preloads)]
    if not preloads:
        argv.append("--no-preload")
    try:
        cpu_of([*argv, "-l", file], d, {**env, "EMPEROR_PROVE_TRACE": str(trace)})
        lines = trace.read_text().splitlines() if trace.exists() else []
    finally:
        shutil.rmtree(trace.parent, ignore_errors=True)
    forked, got = {}, None
    for line in lines:
        at, event, what, _pid, used = line.split("\t")
        if event == "forked" and what == file:
            forked[what] = float(at)
        elif event == "exit" and what == file and what in forked:
            got = (float(at) - forked[what], float(used))
    return got


def bound(name: str, d: Path, emperor: str, repeat: int) -> None:
    cache = Path(tempfile.mkdtemp(prefix="prove-cache-"))
    try:
        _bound(name, d, emperor, repeat, cache)
    finally:  # (also when interrupted)
        shutil.rmtree(cache, ignore_errors=True)


def _bound(name: str, d: Path, emperor: str, repeat: int, cache: Path) -> None:
    env = {**clean_env(), "XDG_CACHE_HOME": str(cache)}
    cpu_of([emperor, "prove", "-j2", "-l", "-r", "t"], d, env)  # fills the record
    record = record_of(cache)
    files = sorted(str(p.relative_to(d)) for p in (d / "t").rglob("*.t"))
    load0 = os.getloadavg()[0]
    cold_env = {**clean_env(), "HARNESS_ACTIVE": "1", "HARNESS_VERSION": "3.44"}
    cold: dict[str, tuple[float, float]] = {}
    best: dict[str, tuple[float, float]] = {}
    ran_cold: list[str] = []
    for f in files:
        walls, cpus = [], []
        for _ in range(repeat):
            w, c, _ = cpu_of(["perl", "-Ilib", f], d, cold_env)
            walls.append(w)
            cpus.append(c)
        cold[f] = (min(walls), min(cpus))
        loads = record.get(f, {}).get("emperor_loads", "")
        mods = [k.removesuffix(".pm").replace("/", "::") for k in loads.split()]
        mods = loadable(d, env, mods)
        got = [g for g in (one_forked(d, f, mods, emperor, env) for _ in range(repeat)) if g]
        if got:
            best[f] = (min(g[0] for g in got), min(g[1] for g in got))
        else:  # it must run cold, whoever runs it
            best[f] = cold[f]
            ran_cold.append(f)
    proves, ours, starts, prove_cpu, our_cpu, our_files_cpu = [], [], [], [], [], []
    for _ in range(repeat):
        w, c, _ = cpu_of(["prove", "-j2", "-l", "-r", "t"], d, clean_env())
        proves.append(w)
        prove_cpu.append(c)
        t = traced(d, cache, emperor)
        ours.append(t["wall"])
        our_cpu.append(t["CPU, all"])
        our_files_cpu.append(t["forked tests"])
        starts.append(t.get("first request at", 0.0))
    prove_wall, our_wall, start = statistics.median(proves), statistics.median(ours), min(starts)
    cold_span = max(lpt([w for w, _ in cold.values()]), sum(c for _, c in cold.values()) / 2)
    floor = max(lpt([w for w, _ in best.values()]), sum(c for _, c in best.values()) / 2)
    print(f"== {name} ({len(files)} files), load {load0:.1f} -> {os.getloadavg()[0]:.1f}; per file the best of {repeat}, "
          f"whole runs the median (min)")
    print(f"  files alone, cold (perl -Ilib FILE): wall {sum(w for w, _ in cold.values()):.2f}, "
          f"CPU {sum(c for _, c in cold.values()):.2f}; -j2 longest first: {cold_span:.2f}")
    print(f"  files forked from a base with all they load: wall {sum(w for w, _ in best.values()):.2f}, "
          f"CPU {sum(c for _, c in best.values()):.2f}; cold whoever runs them: {len(ran_cold)} "
          f"({', '.join(ran_cold[:6])}); -j2 longest first: {floor:.2f}")
    slow = sorted(best.items(), key=lambda kv: -kv[1][0])[:5]
    print("  longest forked: " + ", ".join(f"{f} {w:.2f}" for f, (w, _) in slow))
    print(f"  prove -j2 {prove_wall:.2f} ({min(proves):.2f}); emperor prove -j2 {our_wall:.2f} ({min(ours):.2f}): "
          f"{prove_wall / our_wall:.2f}x prove; its first request at {start:.2f} (best)")
    # in CPU (what a loaded machine shares out; on 2 busy cores a run's wall
    # follows its CPU): prove's whole run against the files' CPU forked
    # from a full base, and against that plus our run's own (everything
    # but the forked files: prove under us with its cold files, the base,
    # the Python host)
    pc, oc = statistics.median(prove_cpu), statistics.median(our_cpu)
    fixed = statistics.median(a - b for a, b in zip(our_cpu, our_files_cpu))
    files_cpu = sum(c for _, c in best.values())
    print(f"  CPU: prove's run {pc:.2f}; the files forked from a full base {files_cpu:.2f}; "
          f"our run {oc:.2f} (the files it forked {statistics.median(our_files_cpu):.2f}, the rest {fixed:.2f})")
    print(f"  CPU BOUND: {pc / files_cpu:.2f}x prove with nothing but the files; {pc / (files_cpu + fixed):.2f}x "
          f"with our run's rest; our run: {pc / oc:.2f}x")
    print(f"  BOUND: {floor:.2f} s => at best {prove_wall / floor:.2f}x prove ({min(proves) / floor:.2f}x its best run); "
          f"with our start ({start:.2f} s): {floor + start:.2f} s => {prove_wall / (floor + start):.2f}x "
          f"({min(proves) / (floor + start):.2f}x)")


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs if k in r) for k in runs[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", type=Path, default=Path("/work/suites"))
    ap.add_argument("--only", default="Moo,Try-Tiny,HTTP-Message")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--emperor", default=EMPEROR)
    ap.add_argument("--bound", action="store_true", help="the best any preloading runner can do (above)")
    args = ap.parse_args()
    precompile(args.emperor)
    for name in args.only.split(","):
        d = suite_dir(args.suites, SUITES[name])
        if d is None:
            print(f"{name}: not found in {args.suites}")
            continue
        if args.bound:
            bound(name, d, args.emperor, args.repeat)
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
