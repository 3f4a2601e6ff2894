"""The fleet under one Emperor: reaction and marginal memory by fleet
size, mass starts (scenarios `fleet`, `mass`, `thousand`)."""

from __future__ import annotations

import os
import resource
import shlex
import time
from pathlib import Path

from benchlib import Ports, Procs, rmtree, summary, wait_200, wait_all_200
from cold import cold_pss
from fleetcpu import base_of, fleet_cpu
from emperor_run import (EmperorRun, base_ini, measure_under, vassal_ini, wait_fork_server, wait_loyal_count,
                         write_fleet, write_vassal)
from settings import MB, Bench, Sizes, say


def add_increments(mem: list[dict]) -> None:
    """PSS added per vassal between fleet sizes. Between the "served"
    measurement at N1 and the "idle" one at N2 only idle vassals were added,
    so that difference is the idle cost; served to served is the cost of a
    vassal that has served its first request."""
    for a, b in zip(mem, mem[1:]):
        for k in ("idle", "served"):
            b[k]["increment_per_vassal_bytes"] = (
                (b[k]["pss_under_bytes"] - a["served"]["pss_under_bytes"]) / (b["n"] - a["n"]))


def fleet(procs: Procs, ports: Ports, tmp: Path, sizes: Sizes) -> dict:
    """End-to-end reaction, then marginal memory at each fleet size, one emperor."""
    say(f"emperor: reaction x{sizes.reactions}, memory at N = {', '.join(map(str, sizes.fleet))}")
    vdir = tmp / "fleet"
    vdir.mkdir()
    sock = tmp / "fleet.sock"
    (vdir / "base.ini").write_text(base_ini("heavy", sock))
    stats = tmp / "fleet-stats.sock"
    em = EmperorRun(procs, vdir, "emperor-fleet", ["--stats", str(stats)])
    res: dict = {"command": shlex.join(em.argv)}
    names: list[str] = []
    try:
        res["base_listening_s"] = wait_fork_server(sock, em, 60)
        time.sleep(0.5)  # let the emperor see byte 1 before the first measured file
        react = []
        for i in range(sizes.reactions):
            name, port = f"r{i:03d}", ports.get()
            t0 = time.perf_counter()
            write_vassal(vdir, name, vassal_ini(name, port))
            t200 = wait_200(port, 30, alive=em.alive)
            react.append((t200 - t0) * 1000)
            names.append(name)
            time.sleep(0.05)
        res["reaction_ms"] = {**summary(react), "samples_ms": react}
        say(f"  reaction p50 {res['reaction_ms']['p50']:.1f} ms")
        mem = []
        for n in sizes.fleet:
            new = []
            while len(names) < n:
                name, port = f"m{len(names):03d}", ports.get()
                write_vassal(vdir, name, vassal_ini(name, port))
                names.append(name)
                new.append(port)
            # idle: every vassal loyal (all its workers accept), the new ones
            # have served nothing yet
            wait_loyal_count(stats, n, em)
            time.sleep(1.0)
            idle = measure_under(em)
            # then each new vassal serves one request (the app's real page)
            wait_all_200(new, 120, time.perf_counter())
            time.sleep(1.0)
            served = measure_under(em)
            mem.append({"n": n, "idle": idle, "served": served})
            say(f"  N={n}: {served['processes_under']} processes, PSS idle {idle['pss_under_bytes'] / MB:.0f} MB, "
                f"after one request each {served['pss_under_bytes'] / MB:.0f} MB")
        add_increments(mem)
        res["memory"] = mem
    finally:
        res["stop_s"] = em.stop()
        rmtree(vdir)
    return res


def mass_start(procs: Procs, ports: Ports, tmp: Path, sizes: Sizes, n: int | None = None,
               key: str = "mass", nofile: tuple[int, int] | None = None, app: str = "heavy",
               lines: tuple[str, ...] = ()) -> dict:
    """`emperor run` on a directory of n vassals (sizes.mass): time to all
    answering, then the idle Emperor. With `nofile`, the Emperor starts with
    that RLIMIT_NOFILE (soft, hard): it raises the soft limit itself."""
    n = sizes.mass if n is None else n
    limit = f", RLIMIT_NOFILE {nofile[0]}:{nofile[1]} at start" if nofile else ""
    say(f"emperor: mass start of {n} vassals ({app} app{''.join(', ' + x for x in lines)}){limit}, "
        f"then {sizes.idle_seconds:g} s idle")
    vdir = tmp / key
    vdir.mkdir()
    sock = tmp / f"{key}.sock"
    vports = write_fleet(vdir, app, sock, n, ports, lines=lines)
    em = EmperorRun(procs, vdir, f"emperor-{key}", nofile=nofile)
    res: dict = {"command": shlex.join(em.argv), "n": n, "app": app, "vassal_lines": list(lines),
                 "nofile_at_start": list(nofile) if nofile else None}
    try:
        res["base_listening_s"] = wait_fork_server(sock, em, 60)
        base, until = None, time.perf_counter() + 1
        while base is None and time.perf_counter() < until:  # its title says so once it serves
            base = base_of(em.proc.pid) or time.sleep(0.005)
        before = fleet_cpu(em.proc.pid, base)
        poller = sum(os.times()[:2])
        # /hello: "answering" is the server's readiness; a first GET / costs
        # the app's lazy start-up (~12 ms, see the adoption rows) per
        # vassal, and this one client would add those up one after another
        first = wait_all_200(vports, 120 + n // 10, em.t0, "/hello")
        res["all_200_s"] = max(first.values())
        # who used the cores from the base listening to the last answer
        parts = {k: [m, c - before.get(k, (0, 0.0))[1]] for k, (m, c) in fleet_cpu(em.proc.pid, base).items()}
        parts["the bench's poller"] = [1, sum(os.times()[:2]) - poller]
        res["burst_cpu"] = parts
        res["after_base_s"] = res["all_200_s"] - res["base_listening_s"]
        say(f"  all {n} answering {res['all_200_s']:.2f} s after `emperor run` "
            f"(base listening at {res['base_listening_s']:.2f} s)")
        time.sleep(2.0)  # let start-up settle (bytes 5, 17 from every vassal)
        c0 = em.ps.cpu_times()
        t0 = time.perf_counter()
        time.sleep(sizes.idle_seconds)
        c1 = em.ps.cpu_times()
        dt = time.perf_counter() - t0
        cpu = (c1.user - c0.user) + (c1.system - c0.system)
        m = em.ps.memory_full_info()
        res["idle"] = {"seconds": dt, "cpu_seconds": cpu, "cpu_pct": 100 * cpu / dt,
                       "emperor_rss_bytes": m.rss, "emperor_pss_bytes": m.pss,
                       "processes_under": len(em.under())}
        say(f"  idle emperor: {res['idle']['cpu_pct']:.2f}% CPU, RSS {m.rss / MB:.1f} MB")
    finally:
        res["stop_s"] = em.stop()
        rmtree(vdir)
    return res


def run_fleet(b: Bench) -> None:
    """Scenario `fleet` (with one cold app's memory to compare)."""
    b.results["cold_pss"] = b.step("cold pss", lambda: cold_pss(b.procs, b.ports, "heavy"))
    b.results["fleet"] = b.step("fleet", lambda: fleet(b.procs, b.ports, b.tmp, b.sizes))


def run_mass(b: Bench) -> None:
    """Scenario `mass`."""
    b.results["mass"] = b.step("mass", lambda: mass_start(b.procs, b.ports, b.tmp, b.sizes))


def run_thousand(b: Bench) -> None:
    """Scenario `thousand`: the heavy app (forks of a 134 MB base: the CPU
    goes to page tables), then the hello app (the Emperor's own pace), the
    Emperor started with a soft RLIMIT_NOFILE of 1,024."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    b.results["thousand"] = {}
    # and the heavy app without a master (the vassal's one process serves): a
    # variant beside the default row
    for key, app, lines in (("heavy", "heavy", ()), ("hello", "hello", ()),
                            ("heavy, master = false", "heavy", ("master = false",))):
        x = b.step(f"thousand {key}", lambda: mass_start(
            b.procs, b.ports, b.tmp, b.sizes, b.sizes.thousand, f"thousand-{app}{len(lines)}", (1024, hard), app,
            lines))
        if x:
            b.results["thousand"][key] = x
