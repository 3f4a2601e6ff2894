"""A trace of a run for profiling (bench/prove_profile.py): with
EMPEROR_PROVE_TRACE=FILE, the host appends one line per event, tab-separated:
monotonic time, event (request, forked, exit, answer, base-ready, host,
end), what (a test file, prove, base, python), pid, CPU seconds (the
process's user + system time from wait4, at exit and end)."""

from __future__ import annotations

import os
import time

TRACE = os.environ.get("EMPEROR_PROVE_TRACE")


def trace(event: str, what: str, pid: int, cpu: float) -> None:
    if TRACE is None:
        return
    with open(TRACE, "a") as fh:
        fh.write(f"{time.monotonic():.4f}\t{event}\t{what}\t{pid}\t{cpu:.4f}\n")
