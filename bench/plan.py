"""The cost of one turn's plan (psgi_forkserver.emperor.plan) for an idle fleet.

    .venv/bin/python bench/plan.py [N]

N adopted, loyal vassals (no processes: state machines only); prints the
median and the maximum time of plan() over 200 turns, stepping every vassal,
then as the Emperor plans (with its `Settled`), turns 1 ms apart in which
one vassal has a new fact (a heartbeat), and the turn of its safety net,
which steps them all. Measured, not judged: the loop runs it once per turn,
so it bounds how fast a turn can be.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from psgi_forkserver.config import VassalConfig
from psgi_forkserver.emperor.plan import Facts, Settled, plan
from psgi_forkserver.emperor.vassal import ForkServer, Vassal


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    vs = []
    for i in range(n):
        name = f"app{i:05d}"
        cfg = VassalConfig(name, Path(f"/v/{name}.ini"), "a",
                           (("http-socket", f"127.0.0.1:{20000 + i}"),))
        vs.append(Vassal(name, cfg, owns_socket=True))
    first = plan(vs, Facts(0.0, ForkServer.READY, 1, adopt_parallel=n)).actions()
    for i, v in enumerate(vs):
        v.adopted(10000 + i, 0.0, seq=first[v.name][0].seq)
        v.on_byte(17, 0.0)
    samples = []
    for turn in range(200):
        t0 = time.perf_counter()
        plan(vs, Facts(1.0 + turn, ForkServer.READY, 1))
        samples.append(time.perf_counter() - t0)
    print(f"plan() over {n} loyal vassals: median {statistics.median(samples) * 1000:.2f} ms, "
          f"max {max(samples) * 1000:.2f} ms ({len(samples)} turns)")
    settled = Settled()
    fleet = {v.name: v for v in vs}
    plan(fleet, Facts(1000.0, ForkServer.READY, 1), settled)
    samples = []
    for turn in range(200):
        now = 1000.0 + (turn + 1) / 1000
        vs[turn % n].on_byte(26, now)  # a heartbeat: a fact
        t0 = time.perf_counter()
        plan(fleet, Facts(now, ForkServer.READY, 1), settled)
        samples.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    plan(fleet, Facts(1000.0 + Settled.SAFETY, ForkServer.READY, 1), settled)
    safety = time.perf_counter() - t0
    print(f"plan() with Settled, one fact a turn: median {statistics.median(samples) * 1000:.3f} ms, "
          f"max {max(samples) * 1000:.2f} ms ({len(samples)} turns); the safety net's turn "
          f"(every {Settled.SAFETY:g} s) {safety * 1000:.2f} ms")


if __name__ == "__main__":
    main()
