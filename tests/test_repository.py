"""The repository itself: what no other test would notice."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A merge once committed its conflict into bench/run.py, which no test imports.
MARKER = re.compile(rb"^(<{7}|>{7}) ", re.MULTILINE)


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_merge_conflict_markers():
    files = tracked_files()
    assert len(files) > 50, "git ls-files found too few files to be this repository"
    conflicted = [str(p.relative_to(ROOT)) for p in files if p.is_file() and MARKER.search(p.read_bytes())]
    assert conflicted == []


def test_the_benchmark_starts():
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "--only" in res.stdout
