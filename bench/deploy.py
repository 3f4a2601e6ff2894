"""A code deploy under load (scenario `deploy`)."""

from __future__ import annotations

import os
import shlex
import signal
import time
from pathlib import Path

from benchlib import BenchError, Ports, Procs, http_get, rmtree, wait_all_200
from emperor_run import EmperorRun, base_ini, vassal_ini, wait_fork_server
from settings import Bench, Sizes, say


def code_deploy(procs: Procs, ports: Ports, tmp: Path, sizes: Sizes) -> dict:
    """A code deploy (new base generation, every vassal moved) under load:
    clients send requests without pause, each on a new connection; count
    the ones that fail."""
    import threading

    from psgi_forkserver import status

    n = sizes.deploy
    say(f"emperor: code deploy of {n} vassals under load")
    vdir = tmp / "deploy"
    vdir.mkdir()
    sock = tmp / "deploy.sock"
    stats = tmp / "deploy-stats.sock"
    (vdir / "base.ini").write_text(base_ini("heavy", sock))
    vports = []
    for i in range(n):
        port = ports.get()
        (vdir / f"d{i:03d}.ini").write_text(vassal_ini(f"d{i:03d}", port))
        vports.append(port)
    em = EmperorRun(procs, vdir, "emperor-deploy", ["--stats", str(stats)])
    res: dict = {"command": shlex.join(em.argv), "n": n, "trigger": "SIGUSR1 (emperor reload-base)"}
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    failures: list[str] = []
    lock = threading.Lock()

    def client(offset: int) -> None:
        i = offset
        deadline = time.perf_counter() + 180  # bounded whatever happens
        while not stop.is_set() and time.perf_counter() < deadline:
            port = vports[i % n]
            i += 1
            code = http_get(port, "/hello", timeout=10)
            with lock:
                if code == 200:
                    counts["ok"] += 1
                else:
                    counts["failed"] += 1
                    if len(failures) < 20:
                        failures.append(f"port {port}: {code}")

    def generations() -> tuple[set, list]:
        doc = status.fetch(stats)
        vs = doc["vassals"].values() if isinstance(doc["vassals"], dict) else doc["vassals"]
        adopted = [v for v in vs if v.get("kind") == "adopted"]
        settled = len(adopted) == n and all(v.get("state") == "loyal" for v in adopted) and all(
            v.get("state") in ("running", "loyal") for v in vs if v.get("kind") == "base")
        return {v.get("base_generation") for v in adopted}, settled, [v.get("state") for v in vs]

    # when the Emperor logged the deploy's milestones, seen while polling
    # (resolution: the 0.05 s poll); the same on any version of the Emperor
    logpath = procs.logdir / "emperor-deploy.log"
    seen: dict[str, float] = {}
    logpos = 0

    def follow() -> None:
        nonlocal logpos
        with open(logpath, "rb") as f:
            f.seek(logpos)
            data = f.read()
        end = data.rfind(b"\n") + 1
        logpos += end
        t = time.perf_counter()
        for line in data[:end].decode(errors="replace").splitlines():
            if "[base] successor ready" in line:
                seen.setdefault("successor_ready", t)
            elif "adopted successor pid" in line and "successor_ready" in seen:
                seen.setdefault("first_moved", t)

    threads = [threading.Thread(target=client, args=(k * 7,), daemon=True) for k in range(2)]
    try:
        wait_fork_server(sock, em, 60)
        wait_all_200(vports, 120, time.perf_counter())
        deadline = time.perf_counter() + 60
        while True:  # every vassal settled before the deploy starts
            gens, settled, states = generations()
            if settled and len(gens) == 1:
                break
            if time.perf_counter() > deadline:
                raise BenchError(f"fleet never settled: {states}")
            time.sleep(0.05)
        before = gens
        for t in threads:
            t.start()
        time.sleep(1.0)  # load running before the deploy
        follow()
        seen.clear()
        t0 = time.perf_counter()
        os.kill(em.proc.pid, signal.SIGUSR1)
        deadline = t0 + 120
        # until the first vassal moved, only the log is watched: a stats
        # request wakes the Emperor's loop, and would hide a loop that
        # sleeps through the new base's readiness
        while "first_moved" not in seen:
            follow()
            if time.perf_counter() > deadline:
                raise BenchError(f"no vassal moved in 120 s: {sorted(seen)}")
            time.sleep(0.05)
        while True:
            follow()
            gens, settled, states = generations()
            if settled and gens.isdisjoint(before) and len(gens) == 1 and len(states) == n + 1:
                break
            if time.perf_counter() > deadline:
                raise BenchError(f"deploy did not finish in 120 s: generations {gens}, states {states}")
            time.sleep(0.05)
        res["deploy_s"] = time.perf_counter() - t0
        if "first_moved" in seen:
            res["ready_to_first_move_s"] = seen["first_moved"] - seen["successor_ready"]
        # the Emperor's own record of the deploy, where it keeps one (bases.py)
        last = ((status.fetch(stats).get("emperor") or {}).get("deploy") or {}).get("last")
        if last:
            res["emperor_record"] = last
        time.sleep(1.0)  # load continues after the deploy
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join(15)
        res["requests_ok"] = counts["ok"]
        res["requests_failed"] = counts["failed"]
        res["failures"] = failures
        res["stop_s"] = em.stop()
        rmtree(vdir)
    say(f"  deploy of {n} vassals took {res.get('deploy_s', float('nan')):.2f} s "
        f"(successor ready to first vassal moved: {res.get('ready_to_first_move_s', float('nan')):.2f} s); "
        f"{counts['ok']} requests answered, {counts['failed']} failed")
    return res


def run(b: Bench) -> None:
    """Scenario `deploy`."""
    b.results["deploy"] = b.step("deploy", lambda: code_deploy(b.procs, b.ports, b.tmp, b.sizes))
