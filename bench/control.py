#!/usr/bin/env python3
"""Control surfaces, measured (not asserted): what judging vassal files
against the option declaration adds to a rescan, and how long the stats
socket takes to answer 50 concurrent clients.

usage: .venv/bin/python bench/control.py [--vassals N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from psgi_forkserver import config as cfgmod  # noqa: E402

EMPEROR = str(Path(sys.executable).parent / "emperor")


def write_fleet(vdir: Path, n: int, on_demand: bool) -> None:
    for i in range(n):
        extra = "on-demand = true\n" if on_demand else ""
        (vdir / f"app{i}.ini").write_text(
            f"[uwsgi]\nhttp-socket = 127.0.0.1:{20000 + i}\nprocesses = 2\n"
            f"env = APP_NAME=app{i}\nmax-requests = 1000\n{extra}")


def judge_cost(tmp: Path, n: int, rounds: int) -> dict[str, float]:
    vdir = tmp / "judge"
    vdir.mkdir()
    write_fleet(vdir, n, on_demand=False)
    cfgmod.declared_options()
    out: dict[str, list[float]] = {"plain": [], "judged": []}
    for _ in range(rounds):
        for label, judge in (("plain", False), ("judged", True)):
            t = time.perf_counter()
            for p in vdir.iterdir():
                assert cfgmod.load(p, judge=judge).error is None
            out[label].append((time.perf_counter() - t) * 1000)
    return {k: statistics.median(v) for k, v in out.items()}


def stats_clients(tmp: Path, n: int, rounds: int, clients: int = 50) -> list[float]:
    vdir = tmp / "fleet"
    vdir.mkdir()
    write_fleet(vdir, n, on_demand=True)  # bound sockets, no process: the Emperor alone
    stats = tmp / "stats.sock"
    em = subprocess.Popen([EMPEROR, "run", str(vdir), "--stats", str(stats)],
                          stderr=subprocess.DEVNULL)
    times = []
    try:
        deadline = time.monotonic() + 30
        while not stats.exists():
            if time.monotonic() > deadline or em.poll() is not None:
                raise SystemExit("the Emperor did not start")
            time.sleep(0.05)
        for _ in range(rounds):
            t = time.perf_counter()
            socks = []
            for _ in range(clients):
                c = socket.socket(socket.AF_UNIX)
                c.connect(str(stats))
                socks.append(c)
            for c in socks:
                c.settimeout(30)
                data = b""
                while chunk := c.recv(65536):
                    data += chunk
                c.close()
                assert len(json.loads(data)["vassals"]) == n
            times.append((time.perf_counter() - t) * 1000)
    finally:
        em.send_signal(signal.SIGTERM)
        em.wait(30)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vassals", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="psgi-fs-bench-ctl-"))
    try:
        j = judge_cost(tmp, args.vassals, args.rounds)
        print(f"rescan of {args.vassals} files, median of {args.rounds}: "
              f"{j['plain']:.1f} ms read+parse, {j['judged']:.1f} ms read+parse+judge")
        s = stats_clients(tmp, args.vassals, args.rounds)
        print(f"50 concurrent stats clients, {args.vassals} vassals: all answered in "
              f"median {statistics.median(s):.0f} ms (max {max(s):.0f} ms)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
