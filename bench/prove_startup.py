"""The fixed cost of `emperor prove`, stage by stage, against prove's.

    .venv/bin/python bench/prove_startup.py [--rounds 15] [--compare OTHER_EMPEROR]

Runs every command below once per round, the commands in turn (so that a
change of the machine's load hits them all alike), and prints for each the
median wall-clock time and the median CPU time (user + system, of the
command and everything it started and reaped). The stages:

    python             the venv's python, doing nothing (the `emperor` script's start)
    python+entry       ... importing psgi_forkserver.entry (what `emperor prove` imports first)
    App::Prove         perl loading App::Prove (prove's own start)
    ForkServer::Prove  perl loading our prove side (App::Prove and the handler forking tests)
    base code          perl loading the base's own code (ForkServer::Prove::TestFile)

and whole runs in generated suites of 1 and 5 trivial Test::More files
(`prove [-j2] t` against `emperor prove [-j2] t`), where the fixed cost is
all there is. `--compare` adds the same runs with another `emperor`
command (e.g. a checkout of an older commit) beside them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from prove_suites import measured, precompile

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
EMPEROR = str(Path(sys.executable).parent / "emperor")
PERL_DIR = ROOT / "perl"

TEST = "use strict;\nuse warnings;\nuse Test::More;\nok 1;\ndone_testing;\n"


def run_once(cmd: list[str], cwd: Path) -> tuple[float, float]:
    # emperor prove's record of each suite: in the bench's directory (from
    # the second round on, a run finds the first's), not the user's cache
    env = {**os.environ, "XDG_CACHE_HOME": str(cwd.parent / "cache")}
    wall, cpu, _ = measured(cmd, cwd, env, timeout=120, capture=False)
    return wall * 1000, cpu * 1000


def suite(base: Path, files: int) -> Path:
    d = base / f"files{files}"
    (d / "t").mkdir(parents=True)
    for i in range(files):
        (d / "t" / f"t{i}.t").write_text(TEST)
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--emperor", default=EMPEROR)
    ap.add_argument("--compare", metavar="EMPEROR", help="another emperor command, measured beside")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="prove-startup-") as tmp:
        one, five = suite(Path(tmp), 1), suite(Path(tmp), 5)
        here = Path(tmp)
        cases: list[tuple[str, list[str], Path]] = [
            ("python", [PY, "-c", "pass"], here),
            ("python+entry", [PY, "-c", "import psgi_forkserver.entry"], here),
            ("App::Prove", ["perl", "-MApp::Prove", "-e1"], here),
            ("ForkServer::Prove", ["perl", f"-I{PERL_DIR}", "-MForkServer::Prove", "-e1"], here),
            ("base code", ["perl", f"-I{PERL_DIR}", "-MForkServer::Prove::TestFile", "-e1"], here),
        ]
        emperors = [("emperor", args.emperor)] + ([("compare", args.compare)] if args.compare else [])
        for _, cmd in emperors:
            precompile(cmd.split()[0])
        for d, n in ((one, 1), (five, 5)):
            for jobs in ([], ["-j2"]):
                j = " -j2" if jobs else ""
                cases.append((f"{n} file(s): prove{j}", ["prove", *jobs, "t"], d))
                for label, cmd in emperors:
                    cases.append((f"{n} file(s): {label} prove{j}", [*cmd.split(), "prove", *jobs, "t"], d))
        results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name, _, _ in cases}
        loads = [os.getloadavg()[0]]
        for _ in range(args.rounds):
            for name, cmd, cwd in cases:
                wall, cpu = run_once(cmd, cwd)
                results[name][0].append(wall)
                results[name][1].append(cpu)
            loads.append(os.getloadavg()[0])
    print(f"rounds {args.rounds}, 1-minute load average {min(loads):.1f} to {max(loads):.1f}, "
          f"commit {subprocess.run(['git', '-C', str(ROOT), 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}")
    print(f"{'':34} {'wall ms':>8} {'(min)':>6} {'CPU ms':>7}")
    for name, (walls, cpus) in results.items():
        print(f"{name:34} {statistics.median(walls):8.0f} {min(walls):6.0f} {statistics.median(cpus):7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
