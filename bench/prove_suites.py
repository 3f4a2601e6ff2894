"""`emperor prove` against prove and yath on real CPAN distributions' whole t/.

    .venv/bin/python bench/prove_suites.py [--suites DIR] [--only moo,uri] [--jobs 2]

Each suite is a Debian source package unpacked into DIR (default
/work/suites; `--fetch` downloads and unpacks them there with `apt-get
source`, which needs deb-src lines; where Debian's pool no longer
has the source of the installed version (Dancer2, Catalyst-Runtime,
DBIx-Class, Capture-Tiny; Test-Simple, whose version is the one in Debian 12's perl), its
upstream tag of that version is cloned).
For every suite, in its directory, one run each of the following (with
`-b -r t` instead of `-l -r t` for the XS ones, Moose, DateTime, DBI, Params-Util,
Template-Toolkit, HTML-Parser and Cpanel-JSON-XS, built first in a copy under
$TMPDIR/prove-suites-build; `yath test -b` for them):

    prove -j2 -l -r t
    yath test -j2 -l t                       (yath's own preload: none)
    emperor prove -j2 -l -r t                (preload chosen automatically, learned
                                             from the run before: an untimed first run
                                             fills emperor prove's record of the suite)
    emperor prove -j2 -l -r t                ("first": with an empty record, every time:
                                             the preload from the files' use lines)
    emperor prove --no-preload -j2 -l -r t
    emperor prove --state=save --statefile=TMP -j2 -l -r t    twice: the second run
                                             preloads and orders from what the first learned

with the same environment (HARNESS_ACTIVE and the like removed, no author or
release testing). Prints a row per suite: versions, wall-clock seconds, the
ratios, the load average before and after the row, and the files whose verdict (ok / skipped / FAIL) differs from
prove's (and the run's count of tests, prove's `Tests=N`, when it is not prove's), for each emperor run and for yath (pass/fail only: yath does not
say "skipped"). `--repeat N` runs every runner N times, in turn, and
shows the median run (every run's time is printed and kept in the JSON). Writes the rows as JSON to bench/results/prove-suites-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prove_suite_list import (BUILD, CORE_VERSION, DEFAULT_ARGS, PROVE_ARGS, SUITES, UPSTREAM,
                              UPSTREAM_TAG)

ROOT = Path(__file__).resolve().parent.parent
EMPEROR = str(Path(sys.executable).parent / "emperor")

BUILD_DIR = Path(tempfile.gettempdir()) / "prove-suites-build"

SUMMARY = re.compile(r"^Files=\d+, Tests=(\d+),", re.M)
FILE_LINE = re.compile(r"^(t/\S+\.t) \.+ ?(.*)$")
YATH_LINE = re.compile(r"\(\s*(PASSED|FAILED|SKIPPED|TO RETRY)\s*\)\s+job\s+\S+\s+(\S+\.t)")


@dataclass
class Run:
    command: list[str]
    seconds: float
    exit: int
    verdicts: dict[str, str]
    notes: list[str] = field(default_factory=list)  # emperor prove's own stderr lines
    # user + system seconds of the command and all it waited for: on a
    # shared machine steadier than the wall-clock seconds
    cpu: float = 0.0
    # prove's summary count ("Files=N, Tests=M": M), the number of tests
    # the files ran: the same verdicts with another count would still differ
    tests: int | None = None


@dataclass
class Row:
    suite: str
    version: str
    files: int
    runs: dict[str, Run] = field(default_factory=dict)
    differ: dict[str, list[str]] = field(default_factory=dict)
    # the 1-minute load average before and after the suite's four runs (a
    # shared machine: the ratios within one row are what can be compared)
    load: tuple[float, float] = (0.0, 0.0)
    seconds: dict[str, list[float]] = field(default_factory=dict)  # every run, with --repeat
    cpu: dict[str, float] = field(default_factory=dict)  # each runner's median CPU seconds


def prove_verdicts(out: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in out.splitlines():
        m = FILE_LINE.match(line.strip("\r"))
        if m:
            rest = m.group(2).strip()
            found[m.group(1)] = ("ok" if rest.startswith("ok") else
                                 "skipped" if rest.startswith("skipped") else "FAIL")
    return found


def yath_verdicts(out: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for m in YATH_LINE.finditer(out):
        found[m.group(2)] = "FAIL" if m.group(1) == "FAILED" else "ok"
    return found


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HARNESS_", "TEST_", "AUTHOR_", "RELEASE_", "EXTENDED_", "PERL5OPT",
                                "T2_", "YATH_"))}
    env.pop("PERL5LIB", None)
    env["NONINTERACTIVE_TESTING"] = "1"
    env["AUTOMATED_TESTING"] = "1"
    return env


def precompile(emperor: str) -> None:
    """Compile the `emperor` command's Python package to .pyc files, as an
    install does. With PYTHONDONTWRITEBYTECODE set (it is on this machine)
    Python never writes them, and every run of an editable install would
    compile our modules again (~80 M instructions, ~25 ms of CPU) where an
    installed `emperor prove` reads them compiled."""
    python = Path(emperor).parent / "python"
    if not python.exists():
        return
    subprocess.run([str(python), "-c", "import compileall, os, psgi_forkserver; "
                    "compileall.compile_dir(os.path.dirname(psgi_forkserver.__file__), quiet=1)"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def measured(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 1800,
             capture: bool = True) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run cmd to its end: wall seconds, CPU seconds of it and of the
    processes it waited for (RUSAGE_CHILDREN), and the finished process
    (its output as text when `capture`, else thrown away)."""
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                       text=True, errors="replace", timeout=timeout, check=False)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, p


def timed(cmd: list[str], cwd: Path, parse, cache: Path | None = None) -> Run:
    """`cache`: emperor prove's $XDG_CACHE_HOME (its record of the last run);
    an empty one for every run when it is None."""
    env = clean_env()
    fresh = Path(tempfile.mkdtemp(prefix="prove-cache-")) if cache is None else None
    env["XDG_CACHE_HOME"] = str(cache or fresh)
    try:
        wall, cpu, p = measured(cmd, cwd, env)
        seconds = round(wall, 2)
    finally:
        if fresh is not None:
            shutil.rmtree(fresh, ignore_errors=True)
    notes = [line for line in p.stderr.splitlines() if line.startswith("emperor prove:")]
    summary = SUMMARY.search(p.stdout)
    return Run(cmd, seconds, p.returncode, parse(p.stdout + "\n" + p.stderr), notes, round(cpu, 2),
               int(summary.group(1)) if summary else None)


def suite_dir(base: Path, package: str) -> Path | None:
    found = sorted(d for d in base.glob(f"{package}-*") if (d / "t").is_dir())
    return found[-1] if found else None


def installed_upstream_version(package: str) -> str | None:
    """0.400001 for an installed 0.400001+dfsg-1."""
    p = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True)
    m = re.match(r"(?:\d+:)?([^-+~]+)", p.stdout.strip()) if p.returncode == 0 else None
    return m.group(1) if m else None


def fetch(base: Path, packages: list[str]) -> None:
    base.mkdir(parents=True, exist_ok=True)
    for pkg in packages:
        if suite_dir(base, pkg) is None:
            subprocess.run(["apt-get", "source", "-qq", pkg], cwd=base, check=False)
        for orig in sorted(base.glob(f"{pkg}_*.orig.tar.*")) if suite_dir(base, pkg) is None else []:
            # the pool has the upstream tarball but no longer the Debian diff
            # (DBI, List-MoreUtils...): the upstream t/ is the same
            unpacked = base / f"{pkg}-{orig.name[len(pkg) + 1:].split('.orig.')[0]}"
            unpacked.mkdir(exist_ok=True)
            subprocess.run(["tar", "-xf", str(orig), "-C", str(unpacked), "--strip-components=1"], check=False)
        version = installed_upstream_version(pkg) or CORE_VERSION.get(pkg)
        if suite_dir(base, pkg) is None and pkg in UPSTREAM and version:
            tag = UPSTREAM_TAG.get(pkg, "v{version}").format(version=version)
            subprocess.run(["git", "clone", "-q", "--depth", "1", "--branch", tag, UPSTREAM[pkg],
                            str(base / f"{pkg}-{version}")], check=False)


def built(d: Path, makefile_args: list[str]) -> Path:
    """A distribution built (`perl Makefile.PL ARGS && make`) in a copy
    under BUILD_DIR, once; the copy's path."""
    copy = BUILD_DIR / d.name
    if (copy / "pm_to_blib").exists():
        return copy
    shutil.rmtree(copy, ignore_errors=True)
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(d, copy, symlinks=True)
    if not (copy / "pm_to_blib").exists():  # (not built where it was unpacked)
        # Template-Toolkit's Makefile.PL `require`s its .defaults.cfg from "."
        env = {**clean_env(), "PERL_MM_USE_DEFAULT": "1", "PERL_USE_UNSAFE_INC": "1"}
        for cmd in (["perl", "Makefile.PL", *makefile_args], ["make"]):
            subprocess.run(cmd, cwd=copy, env=env, stdout=subprocess.DEVNULL, check=True)
    shutil.rmtree(copy / "inc" / ".author", ignore_errors=True)
    return copy


def bench_suite(name: str, d: Path, jobs: str, emperor: str = EMPEROR, repeat: int = 1) -> Row:
    version = d.name.split("-")[-1]
    args = PROVE_ARGS.get(name, DEFAULT_ARGS)
    if name in BUILD:  # (counted after: DBI's Makefile.PL writes 156 more files)
        d = built(d, BUILD[name])
    row = Row(name, version, len(list((d / "t").rglob("*.t"))))
    auto = [emperor, "prove", "-j", jobs, *args]
    runs = {
        "prove": (["prove", "-j", jobs, *args], prove_verdicts),
        "yath": (["yath", "test", "-j", jobs, "-b" if "-b" in args else "-l", "--no-color", "t"],
                 yath_verdicts),
        "emperor": (auto, prove_verdicts),
        "emperor-first": (auto, prove_verdicts),
        "emperor-no-preload": ([emperor, "prove", "--no-preload", "-j", jobs, *args], prove_verdicts),
    }
    # (the suites are read-only: prove's state file goes elsewhere)
    statefile = Path(tempfile.mkdtemp(prefix="prove-state-")) / ".prove"
    state = [emperor, "prove", "--state=save", f"--statefile={statefile}", "-j", jobs, *args]
    runs["emperor-learn"] = (state, prove_verdicts)
    runs["emperor-state"] = (state, prove_verdicts)
    # emperor prove's record of this suite, kept from run to run ("emperor"):
    # filled by an untimed first run, as a developer's second run finds it
    cache = Path(tempfile.mkdtemp(prefix="prove-cache-"))
    timed(auto, d, prove_verdicts, cache)
    before = os.getloadavg()[0]
    every: dict[str, list[Run]] = {key: [] for key in runs}
    for _ in range(repeat):  # the runners in turn, `repeat` times: a load change hits them all
        for key, (cmd, parse) in runs.items():
            every[key].append(timed(cmd, d, parse, cache if key == "emperor" else None))
    row.load = (round(before, 2), round(os.getloadavg()[0], 2))
    shutil.rmtree(statefile.parent, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    for key, done in every.items():  # the median run (by time) stands for the runner
        row.runs[key] = sorted(done, key=lambda run: run.seconds)[(len(done) - 1) // 2]
        row.seconds[key] = [run.seconds for run in done]
        row.cpu[key] = round(statistics.median(run.cpu for run in done), 2)
    # verdicts: every run of every runner against prove's (its first run)
    want = every["prove"][0].verdicts
    for key in ("emperor", "emperor-first", "emperor-no-preload", "emperor-learn", "emperor-state"):
        row.differ[key] = sorted({f for run in every[key] for f in set(want) | set(run.verdicts)
                                  if want.get(f) != run.verdicts.get(f)})
        row.differ[key] += sorted({f"Tests={run.tests} (prove: {every['prove'][0].tests})" for run in every[key]
                                   if run.tests != every["prove"][0].tests})
    passfail = {f: ("FAIL" if v == "FAIL" else "ok") for f, v in want.items()}
    row.differ["yath"] = sorted({f for run in every["yath"] for f in set(passfail) | set(run.verdicts)
                                 if passfail.get(f) != run.verdicts.get(f)})
    return row


def versions() -> dict[str, str]:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
        except OSError:
            return "?"
    return {
        "perl": out(["perl", "-e", "print $^V"]),
        "Test::Harness (prove)": out(["perl", "-MTest::Harness", "-e", "print $Test::Harness::VERSION"]),
        "Test2::Harness (yath)": out(["perl", "-MTest2::Harness", "-e", "print $Test2::Harness::VERSION"]),
        "emperor": out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "cpus": str(os.cpu_count()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", type=Path, default=Path("/work/suites"))
    ap.add_argument("--only", default="", help="comma-separated suite names")
    ap.add_argument("--jobs", default="2")
    ap.add_argument("--fetch", action="store_true", help="apt-get source the missing suites first")
    ap.add_argument("--emperor", default=EMPEROR, help="the emperor command to measure")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each runner N times (in turn); the rows show the median run")
    args = ap.parse_args()
    names = [n for n in SUITES if not args.only or n in args.only.split(",")]
    precompile(args.emperor)
    if args.fetch:
        fetch(args.suites, [SUITES[n] for n in names])
    print(" ".join(f"{k}={v}" for k, v in versions().items()), flush=True)
    print(f"{'suite':14} {'ver':>12} {'files':>5} {'prove':>7} {'yath':>7} {'emperor':>8} {'first':>7} "
          f"{'no-pre':>7} {'state':>7} {'x prove':>7} {'x yath':>7} {'1st x pr':>8} {'np x pr':>7} "
          f"{'st x pr':>7} {'load':>11}  verdicts vs prove", flush=True)
    rows: list[Row] = []
    for name in names:
        d = suite_dir(args.suites, SUITES[name])
        if d is None:
            print(f"{name:14} not found in {args.suites} (--fetch)", flush=True)
            continue
        row = bench_suite(name, d, args.jobs, args.emperor, args.repeat)
        rows.append(row)
        r = row.runs
        e = r["emperor"].seconds
        diffs = "; ".join(f"{k}: {len(v)} differ ({', '.join(v[:4])})" if v else f"{k}: same"
                          for k, v in row.differ.items())
        for note in r["emperor"].notes:
            print(f"    {note}", flush=True)
        for note in r["emperor-state"].notes:
            if "preloaded" in note:
                print(f"    (--state) {note}", flush=True)
        if args.repeat > 1:
            print("    every run (s): " + "; ".join(f"{k} {' '.join(f'{x:.2f}' for x in v)}"
                                               for k, v in row.seconds.items()), flush=True)
        print("    CPU s (median): " + "; ".join(f"{k} {v:.2f}" for k, v in row.cpu.items())
              + f"; prove / auto {row.cpu['prove'] / max(row.cpu['emperor'], 0.01):.2f}"
              + f", prove / no-preload {row.cpu['prove'] / max(row.cpu['emperor-no-preload'], 0.01):.2f}",
              flush=True)
        np, st = r["emperor-no-preload"].seconds, r["emperor-state"].seconds
        first = r["emperor-first"].seconds
        print(f"{name:14} {row.version:>12} {row.files:5d} {r['prove'].seconds:7.2f} "
              f"{r['yath'].seconds:7.2f} {e:8.2f} {first:7.2f} {np:7.2f} {st:7.2f} "
              f"{r['prove'].seconds / e:7.2f} {r['yath'].seconds / e:7.2f} {r['prove'].seconds / first:8.2f} "
              f"{r['prove'].seconds / np:7.2f} {r['prove'].seconds / st:7.2f} "
              f"{row.load[0]:5.1f}-{row.load[1]:<5.1f}  {diffs}", flush=True)
    out = ROOT / "bench" / "results" / time.strftime("prove-suites-%Y%m%dT%H%M%S.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"versions": versions(), "rows": [asdict(r) for r in rows]}, indent=1))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
