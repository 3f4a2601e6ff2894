"""What every scenario shares: where things are, the sizes of a quick and a
full run, the targets, and the run's context handed to each scenario."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import Ports, Procs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROGRAM = str(ROOT / "perl" / "ForkServer.pm")
APPS = {"heavy": str(HERE / "heavy.psgi"), "hello": str(HERE / "hello.psgi")}
EMPEROR = str(ROOT / ".venv" / "bin" / "emperor")
MB = 1024 * 1024


@dataclass
class Sizes:
    adoptions: int
    colds: int
    reactions: int
    fleet: tuple[int, ...]
    mass: int
    idle_seconds: float
    wrk_duration: str
    deploy: int = 20
    prove_files: int = 40
    thousand: int = 1000  # adopted vassals, the Emperor started with a soft RLIMIT_NOFILE of 1,024


QUICK = Sizes(adoptions=20, colds=3, reactions=10, fleet=(10, 50), mass=50, idle_seconds=3, wrk_duration="3s",
              deploy=10, prove_files=10, thousand=300)
FULL = Sizes(adoptions=50, colds=10, reactions=10, fleet=(10, 50, 200), mass=200, idle_seconds=10, wrk_duration="10s")

TARGETS = {
    "adoption_p50_ms": 10.0,
    "cold_over_adoption": 100.0,
    "marginal_pss_mb": 3.0,
    "mass_start_s": 3.0,
    "thousand_start_s": 5.0,
    "emperor_cpu_pct": 1.0,
    "serving_ratio": 0.90,
    "prove_over_emperor": 10.0,
    "yath_over_emperor": 3.0,
    "spare_first_200_ms": 2.0,
    "fork_path_over_uwsgi21": 0.5,  # adoption -> first 200, heavy /, p50 ratio in one run
    "spares_over_uwsgi21": 0.1,  # adoption by a warm spare, early-warmup = /
    "spare_pid_reply_ms": 1.0,
}


@dataclass
class Bench:
    """One run's context, handed to every scenario: its processes, ports and
    temporary directory, the sizes, and `results` (the report's JSON) that
    the scenario fills. `step(name, fn)` runs fn and returns its result, or
    records a BenchError among the run's errors and returns None."""

    procs: Procs
    ports: Ports
    tmp: Path
    sizes: Sizes
    quick: bool
    results: dict
    step: Callable[[str, Callable[[], Any]], Any]
    floor_only: bool = False    # `floor` without its mass start (--floor-only)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt(x, spec=".1f", unit=""):
    return "n/a" if x is None else f"{x:{spec}}{unit}"
