"""Two `emperor prove`s side by side with prove on real suites, in one loop.

    .venv/bin/python bench/prove_compare.py --other OTHER_EMPEROR [--only Try-Tiny,URI] [--rounds 5]

OTHER_EMPEROR is another `emperor` command (e.g. the venv of a checkout of
an older commit). Per suite (bench/prove_suites.py's, under /work/suites),
each round runs, in turn:

    prove -j2 -l -r t
    emperor prove -j2 -l -r t                  (ours and the other's, each with its
    emperor prove --no-preload -j2 -l -r t      own record of the suite, filled by an
                                                untimed first run)

and prints the medians over the rounds of wall-clock and CPU seconds (user +
system of the command and all it started and reaped: steadier than wall time
on a shared machine), the ratios to prove, the load average at the start and
end, and every file whose verdict differs from prove's in any run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prove_suites import EMPEROR, SUITES, clean_env, measured, precompile, prove_verdicts, suite_dir  # noqa: E402


def run(cmd: list[str], cwd: Path, cache: Path) -> tuple[float, float, dict[str, str]]:
    env = clean_env()
    env["XDG_CACHE_HOME"] = str(cache)
    wall, cpu, p = measured(cmd, cwd, env)
    return wall, cpu, prove_verdicts(p.stdout + "\n" + p.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", type=Path, default=Path("/work/suites"))
    ap.add_argument("--only", default="Moo,Role-Tiny,Try-Tiny,URI,HTTP-Message,Path-Tiny")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--emperor", default=EMPEROR)
    ap.add_argument("--other", required=True, help="the other emperor command")
    ap.add_argument("--no-preload", action="store_true", help="also the --no-preload runs")
    args = ap.parse_args()
    precompile(args.emperor)
    precompile(args.other)
    cmds = {"prove": ["prove", "-j2", "-l", "-r", "t"],
            "ours": [args.emperor, "prove", "-j2", "-l", "-r", "t"],
            "other": [args.other, "prove", "-j2", "-l", "-r", "t"]}
    if args.no_preload:
        cmds["ours-np"] = [args.emperor, "prove", "--no-preload", "-j2", "-l", "-r", "t"]
        cmds["other-np"] = [args.other, "prove", "--no-preload", "-j2", "-l", "-r", "t"]
    for name in args.only.split(","):
        d = suite_dir(args.suites, SUITES[name])
        if d is None:
            print(f"{name}: not found in {args.suites}")
            continue
        tmp = Path(tempfile.mkdtemp(prefix="prove-compare-"))
        caches = {k: tmp / k for k in cmds}
        try:
            for k in ("ours", "other"):  # the record a developer's second run finds
                run(cmds[k], d, caches[k])
            load0 = os.getloadavg()[0]
            walls: dict[str, list[float]] = {k: [] for k in cmds}
            cpus: dict[str, list[float]] = {k: [] for k in cmds}
            differ: dict[str, set[str]] = {k: set() for k in cmds}
            want: dict[str, str] | None = None
            for _ in range(args.rounds):
                for k, cmd in cmds.items():
                    wall, cpu, verdicts = run(cmd, d, caches[k])
                    walls[k].append(wall)
                    cpus[k].append(cpu)
                    if want is None:
                        want = verdicts
                    differ[k] |= {f for f in set(want) | set(verdicts) if want.get(f) != verdicts.get(f)}
            load1 = os.getloadavg()[0]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        pw = statistics.median(walls["prove"])
        print(f"{name} (load {load0:.1f}-{load1:.1f}, {args.rounds} rounds; medians: wall s / CPU s / x prove wall)")
        for k in cmds:
            w, c = statistics.median(walls[k]), statistics.median(cpus[k])
            same = "same" if not differ[k] else f"{len(differ[k])} differ: {', '.join(sorted(differ[k])[:4])}"
            print(f"  {k:9} {w:6.2f} {c:6.2f} {pw / w:5.2f}x   (walls {' '.join(f'{x:.2f}' for x in walls[k])})"
                  f"  verdicts {same}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
