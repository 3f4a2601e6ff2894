"""The cost of one turn's plan (psgi_forkserver.emperor.plan) for an idle fleet.

    .venv/bin/python bench/plan.py [N]

N adopted, loyal vassals (no processes: state machines only); prints the
median and the maximum time of plan() over 200 turns, stepping every vassal,
then as the Emperor plans (with its `Settled`), turns 1 ms apart in which
one vassal has a new fact (a heartbeat), and the turn of its safety net,
which steps them all. Measured, not judged: the loop runs it once per turn,
so it bounds how fast a turn can be. Last, a simulated mass start of N
(`mass_start`): how many steps it takes, and plan()'s CPU over it.

Then the rest of a turn's work around the plan, on a real `Emperor` (not
run: no process, no socket) whose directory holds a base file and N vassal
files with a `domain`, every vassal adopted and loyal, each with its
process record in the process table, while one adoption is in flight:
the turn's facts (`Emperor._facts`: the fork servers' probes and state,
the adoptions in flight and failed), its wait (`Emperor._timeout`: every
part's next wake-up) and the front door's routes for a turn that stepped
one vassal. The code before incremental routes is timed as it ran then
(every route built and sorted each turn).
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


def around_the_plan(n: int) -> None:
    """The turn's passes besides the plan, on a real Emperor of n vassals."""
    import tempfile

    from psgi_forkserver.emperor.handles import ProcHandles
    from psgi_forkserver.emperor.loop import Emperor
    from psgi_forkserver.options import Options

    with tempfile.TemporaryDirectory() as d:
        vdir = Path(d) / "vassals"
        vdir.mkdir()
        (vdir / "base.ini").write_text(f"[uwsgi]\nfork-server = {d}/fs.sock\nearly-psgi = {d}/app.psgi\n")
        for i in range(n):
            (vdir / f"app{i:05d}.ini").write_text(
                f"[uwsgi]\nhttp-socket = 127.0.0.1:{20000 + i}\ndomain = app{i}.example\n")
        em = Emperor(Options(vdir, program="/bin/false", own_sockets=False))
        try:
            em.files.rescan(time.monotonic())
            base = em.vassals["base"]
            plan({"base": base}, Facts(0.0, ForkServer.NONE, 0))  # the base's spawn
            base.spawned(100, 0.0, base.current.seq)
            base.on_byte(1, 0.0, base.current.seq)
            first = plan(em.vassals, Facts(0.0, ForkServer.READY, 1, adopt_parallel=n)).actions()
            for i, (name, v) in enumerate(sorted(em.vassals.items())):
                seq = base.current.seq if v is base else first[name][0].seq
                em.procs.handles[(name, seq)] = ProcHandles()
                if v is not base:
                    v.adopted(10000 + i, 0.0, seq=seq)
                    v.on_byte(17, 0.0)
            now = time.monotonic()
            plan(em.vassals, em._facts(now), em.settled)  # as the loop plans: the quiet ones marked
            facts, timeout, routes = [], [], []
            names = sorted(em.vassals)
            incremental = hasattr(em.routes, "route_of")
            for turn in range(200):
                t0 = time.perf_counter()
                em._facts(now)
                t1 = time.perf_counter()
                em._timeout(now)
                t2 = time.perf_counter()
                if incremental:
                    em.routes._refresh(now, [names[turn % n]])
                else:
                    tuple(sorted(em.routes.routes()))  # what each turn did: FrontDoor.update
                t3 = time.perf_counter()
                facts.append(t1 - t0)
                timeout.append(t2 - t1)
                routes.append(t3 - t2)
                now += 0.001
            med = lambda xs: statistics.median(xs) * 1000  # noqa: E731
            print(f"around the plan, {n} loyal vassals, one turn: facts {med(facts):.3f} ms, "
                  f"wait {med(timeout):.3f} ms, routes {med(routes):.3f} ms (medians of {len(facts)} turns)")
        finally:
            em.sel.close()


def mass_start(n: int) -> None:
    """A mass start of n vassals as the Emperor plans it (with its Settled):
    a turn every 5 ms, 8 adoptions in flight, each answered 50 ms after its
    request with its bytes 5 and 17 (facts, an event each). How many vassal
    steps it takes, and plan()'s CPU: the safety net's turns step the whole
    fleet (SAFETY_PER_VASSAL)."""
    from psgi_forkserver.proc import Adopt

    fleet = {}
    for i in range(n):
        name = f"app{i:05d}"
        fleet[name] = Vassal(name, VassalConfig(name, Path(f"/v/{name}.ini"), "a",
                                                (("http-socket", f"127.0.0.1:{20000 + i}"),)),
                             owns_socket=True)
    settled, in_flight, now, events, cpu, steps, pid = Settled(), {}, 0.0, 0, 0.0, 0, 10000
    while any(v.phase != "loyal" for v in fleet.values()) and now < 60:
        now += 0.005
        for name, (seq, asked) in list(in_flight.items()):
            if now - asked > 0.05:
                pid += 1
                v = fleet[name]
                v.adopted(pid, now, seq=seq)
                v.on_byte(5, now, seq)
                v.on_byte(17, now, seq)
                del in_flight[name]
                events += 1
        t0 = time.process_time()
        p = plan(fleet, Facts(now, ForkServer.READY, 1, adopt_parallel=8,
                              adoptions_in_flight=len(in_flight), events=events), settled)
        cpu += time.process_time() - t0
        steps += len(p.steps)
        in_flight.update((s.vassal.name, (a.seq, now)) for s in p.steps for a in s.actions
                         if isinstance(a, Adopt))
    print(f"a mass start of {n} (simulated: 8 in flight, 50 ms each): every vassal loyal at "
          f"{now:.2f} s, {steps} steps ({steps / n:.1f} a vassal), plan() CPU {cpu:.2f} s")


if __name__ == "__main__":
    main()
    around_the_plan(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
    mass_start(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
