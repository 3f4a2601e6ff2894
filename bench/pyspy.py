"""Sampling a process with py-spy during a bench (py-spy is not a
dependency of the project: PYSPY=/path/to/py-spy), and its hottest
functions from the collapsed stacks it records."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path


def py_spy(pyspy: str, pid: int, out: Path) -> subprocess.Popen:
    return subprocess.Popen([pyspy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
                             "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def hot_functions(raw: Path, top: int = 15) -> list[tuple[str, float]]:
    """Share of samples in which each function is on the stack (self+children)
    and as leaf; from py-spy's collapsed-stack output."""
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        total += c
        for fn in {f.split(" (")[0] for f in stack.split(";")}:
            incl[fn] += c
    return [(fn, round(100 * c / total, 1)) for fn, c in incl.most_common(top)] if total else []
