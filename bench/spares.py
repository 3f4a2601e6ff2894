"""Warm spares: what the pool costs, bursts of adoptions, and the reaction
through `emperor run` with and without spares (scenario `spares`)."""

from __future__ import annotations

import shlex
import socket
import time
from pathlib import Path

import psutil

from psgi_forkserver.procfs import spare_of
from adoptions import BOUND, adoption_rows
from basevassal import Base, stop_adopted
from benchlib import BenchError, Ports, Procs, pss_of, summary, wait_200
from emperor_run import EmperorRun, base_ini, vassal_ini, wait_fork_server, write_vassal
from settings import APPS, MB, Bench, fmt, say


def spare_memory(procs: Procs, tmp: Path, ks: tuple[int, ...] = (0, 2, 4)) -> dict:
    """PSS and USS of a heavy base with `early-warmup = /` and k warm spares
    (each spare a master and its warm worker), for each k: what the pool costs."""
    say(f"spare memory: heavy base with early-warmup /, k in {ks}")
    out = {}
    for k in ks:
        base = Base(procs, APPS["heavy"], tmp / f"mem{k}.sock", f"base-mem{k}",
                    ("--early-warmup", "/", "--fork-server-spares", str(k)))
        try:
            spares = base.wait_spares(k) if k else set()
            tree = [psutil.Process(base.proc.pid)]
            for pid in spares:  # the spares are our children (clone(CLONE_PARENT)), their workers theirs
                p = psutil.Process(pid)
                tree += [p, *p.children()]
            pss, uss, count = pss_of(tree)
            spare_pss, spare_uss, _ = pss_of(tree[1:])
            out[str(k)] = {"pss_bytes": pss, "uss_bytes": uss, "processes": count,
                           "spares_pss_bytes": spare_pss, "spares_uss_bytes": spare_uss}
            say(f"  k={k}: base and spares {pss / MB:.1f} MB PSS ({count} processes), "
                f"spares {spare_pss / MB:.1f} MB PSS, {spare_uss / MB:.1f} MB USS")
        finally:
            base.stop()
    return out


def adoption_burst(procs: Procs, ports: Ports, tmp: Path, n: int, k: int) -> dict:
    """n adoptions at once (one thread each) from a heavy base with
    `early-warmup = /` and k spares: pid reply and first 200 on `/` of each,
    how many a spare served, and the time until the pool is back to k."""
    import threading

    say(f"burst: {n} adoptions at once, heavy base with early-warmup /, {k} spares")
    base = Base(procs, APPS["heavy"], tmp / f"fs-burst{k}.sock", f"base-burst{k}",
                ("--early-warmup", "/", "--fork-server-spares", str(k)))
    out: list[tuple[float, float, int]] = []
    errors: list[str] = []
    adopted: list[tuple[int, socket.socket]] = []
    lock = threading.Lock()
    try:
        waiting = base.wait_spares(k) if k else set()
        port_list = [ports.get() for _ in range(n)]
        go = threading.Barrier(n)

        def one(port: int) -> None:
            try:
                go.wait(30)
                pid, pipe, t0, t_pid = base.adopt(["--http-socket", f"127.0.0.1:{port}", "--processes", "1"])
                with lock:
                    adopted.append((pid, pipe))
                t200 = wait_200(port, 60, path="/")
                with lock:
                    out.append(((t_pid - t0) * 1000, (t200 - t0) * 1000, pid))
            except Exception as e:  # noqa: BLE001 - reported
                with lock:
                    errors.append(repr(e))
        threads = [threading.Thread(target=one, args=(p,)) for p in port_list]
        t_start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        t_done = time.perf_counter()
        refill_s = None
        if k:
            base.wait_spares(k, 120)
            refill_s = time.perf_counter() - t_done
        if errors:
            raise BenchError(f"{len(errors)} adoptions of the burst failed: {errors[0]}")
    finally:
        for pid, pipe in adopted:
            stop_adopted(procs, pid, pipe)
        base.stop()
    pid_ms = [a for a, _, _ in out]
    first_ms = [b for _, b, _ in out]
    r = {"n": n, "spares": k, "pid_reply_ms": summary(pid_ms), "first_200_ms": summary(first_ms),
         "by_spare": sum(1 for _, _, pid in out if pid in waiting), "burst_s": t_done - t_start,
         "refill_s": refill_s, "samples_first_200_ms": first_ms, "samples_pid_reply_ms": pid_ms}
    say(f"  first 200 p50 {r['first_200_ms']['p50']:.1f} ms, max {r['first_200_ms']['max']:.1f} ms; "
        f"{r['by_spare']} by a spare; pool back in {fmt(refill_s, '.2f', ' s')}")
    return r


def reaction(procs: Procs, ports: Ports, tmp: Path, n: int, k: int) -> dict:
    """New vassal file -> its first 200 through `emperor run`, heavy base with
    `early-warmup = /` and k spares (the pool refilled between files)."""
    say(f"emperor: reaction x{n}, heavy base with early-warmup /, {k} spares")
    vdir = tmp / f"react{k}"
    vdir.mkdir()
    sock = tmp / f"react{k}.sock"
    (vdir / "base.ini").write_text(base_ini("heavy", sock) + f"early-warmup = /\nfork-server-spares = {k}\n")
    em = EmperorRun(procs, vdir, f"emperor-react{k}")
    res: dict = {"command": shlex.join(em.argv), "spares": k}
    try:
        wait_fork_server(sock, em, 60)
        time.sleep(0.5)  # let the emperor see byte 1 before the first measured file
        react = []
        for i in range(n):
            if k:
                deadline = time.perf_counter() + 60
                while len([p for p in em.ps.children() if spare_of(p.pid, ready=True)]) < k:
                    if time.perf_counter() > deadline:
                        raise BenchError("the spares were not refilled within 60 s")
                    time.sleep(0.002)
            name, port = f"r{i:03d}", ports.get()
            t0 = time.perf_counter()
            write_vassal(vdir, name, vassal_ini(name, port))
            t200 = wait_200(port, 30, alive=em.alive)
            react.append((t200 - t0) * 1000)
            time.sleep(0.05)
        res["reaction_ms"] = {**summary(react), "samples_ms": react}
        say(f"  reaction p50 {res['reaction_ms']['p50']:.1f} ms")
    finally:
        em.stop()
    return res


def run(b: Bench) -> None:
    """Scenario `spares`: the adoption rows with warm spares (K = 2), the
    socket bound by the requester as `emperor run` does (no polling client),
    bursts, the pool's memory and the reaction through `emperor run`."""
    nosp = ("--fork-server-spares", "0")
    sp = ("--fork-server-spares", "2")
    adoption_rows(b, [("heavy, spares", "heavy", "/", sp), ("heavy /hello, spares", "heavy", "/hello", sp),
                      ("heavy, base with early-warmup /, spares", "heavy", "/", ("--early-warmup", "/", *sp)),
                      (BOUND + ", fork path", "heavy", "/", ("--early-warmup", "/", *nosp)),
                      (BOUND + ", spares", "heavy", "/", ("--early-warmup", "/", *sp))])
    r = b.results
    r["burst"] = {}
    for key, k in (("fork path", 0), ("spares", 4)):
        x = b.step(f"burst {key}", lambda: adoption_burst(b.procs, b.ports, b.tmp, 50, k))
        if x:
            r["burst"][key] = x
    r["spare_memory"] = b.step("spare memory", lambda: spare_memory(b.procs, b.tmp))
    r["reaction"] = {}
    for key, k in (("fork path", 0), ("spares", 2)):
        x = b.step(f"reaction {key}", lambda: reaction(b.procs, b.ports, b.tmp, b.sizes.reactions, k))
        if x:
            r["reaction"][key] = x
