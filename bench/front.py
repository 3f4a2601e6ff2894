"""The front door's benchmarks (bench/run.py scenario `front`): nginx
started by `emperor run --http`, routing by Host name.

- serving, churn and fairness under wrk: bench/front_load.py;
- first request to a sleeping on-demand heavy app through nginx;
- 200 sleeping apps with `domain`: `emperor run` -> every name answered
  once (which wakes all of them), time and memory;
- a new vassal file -> its name answering through nginx.
"""

from __future__ import annotations

import os
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import front_bound
from benchlib import BenchError, Ports, Procs, pss_of, rmtree, summary
from front_load import (SERVING_LABELS, churn, em_reloads, fairness, host_get, serving, vassal_ini,
                        wait_host_200, write_vassal)


def first_request_asleep(procs: Procs, ports: Ports, tmp: Path, emperor_run, base_ini, n: int) -> dict:
    """n on-demand heavy vassals, asleep; the first GET / of each through nginx."""
    vdir = tmp / "front-od"
    vdir.mkdir()
    (vdir / "base.ini").write_text(base_ini("heavy", tmp / "front-od.sock"))
    for i in range(n):
        write_vassal(vdir, f"od{i:03d}", vassal_ini(f"od{i:03d}", f"domain = od{i:03d}.localhost",
                                           "on-demand = true", "idle = 600"))
    front = ports.get()
    em = emperor_run(procs, vdir, "emperor-front-od",
                     ["--http", f"127.0.0.1:{front}", "--run-dir", str(tmp / "run-od")])
    try:
        # every name routed and nginx up: an unknown name answers 404 by then
        deadline = time.perf_counter() + 60
        while host_get(front, "nobody.localhost") != 404:
            if time.perf_counter() > deadline or not em.alive():
                raise BenchError("the front door never answered")
            time.sleep(0.01)
        time.sleep(2.0)  # the base loaded, the routing of all n written
        samples = []
        for i in range(n):
            t0 = time.perf_counter()
            status = host_get(front, f"od{i:03d}.localhost", timeout=30)
            if status != 200:
                raise BenchError(f"od{i:03d}: status {status}")
            samples.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.05)
        return {**summary(samples), "samples_ms": samples, "command": shlex.join(em.argv)}
    finally:
        em.stop()
        rmtree(vdir)


def mass_wake(procs: Procs, ports: Ports, tmp: Path, emperor_run, base_ini, n: int) -> dict:
    """n sleeping apps: `emperor run` -> every name answered once (16
    clients at a time: each first answer wakes its app)."""
    vdir = tmp / "front-mass"
    vdir.mkdir()
    (vdir / "base.ini").write_text(base_ini("hello", tmp / "front-mass.sock"))
    names = [f"m{i:03d}" for i in range(n)]
    for name in names:
        write_vassal(vdir, name, vassal_ini(name, f"domain = {name}.localhost", "on-demand = true",
                                   "idle = 600", "disable-logging = true"))
    front = ports.get()
    em = emperor_run(procs, vdir, "emperor-front-mass",
                     ["--http", f"127.0.0.1:{front}", "--run-dir", str(tmp / "run-mass")])
    try:
        def first_200(name: str) -> float:
            return wait_host_200(front, f"{name}.localhost", 120, em.alive) - em.t0

        with ThreadPoolExecutor(16) as pool:
            times = list(pool.map(first_200, names))
        res = {"n": n, "all_answered_s": max(times), "first_answered_s": min(times),
               "command": shlex.join(em.argv)}
        time.sleep(1.0)
        pss, uss, count = pss_of(em.under())
        res.update(pss_under_bytes=pss, uss_under_bytes=uss, processes_under=count,
                   emperor_rss_bytes=em.ps.memory_full_info().rss,
                   reloads=em_reloads(tmp / "emperor-front-mass.log"))
        return res
    finally:
        em.stop()
        rmtree(vdir)



def mass_start(procs: Procs, ports: Ports, tmp: Path, emperor_run, base_ini, n: int) -> dict:
    """n vassals with `domain` (not on-demand): `emperor run --http` -> every
    name answered once, and how many times nginx was reloaded meanwhile."""
    vdir = tmp / "front-start"
    vdir.mkdir()
    (vdir / "base.ini").write_text(base_ini("hello", tmp / "front-start.sock"))
    names = [f"s{i:03d}" for i in range(n)]
    for name in names:
        write_vassal(vdir, name, vassal_ini(name, f"domain = {name}.localhost", "disable-logging = true"))
    front = ports.get()
    em = emperor_run(procs, vdir, "emperor-front-start",
                     ["--http", f"127.0.0.1:{front}", "--run-dir", str(tmp / "run-start")])
    try:
        def first_200(name: str) -> float:
            return wait_host_200(front, f"{name}.localhost", 120, em.alive, "/") - em.t0

        with ThreadPoolExecutor(16) as pool:
            times = list(pool.map(first_200, names))
        time.sleep(1.5)  # a last batched reload, if any, is logged
        return {"n": n, "all_answered_s": max(times),
                "reloads": em_reloads(tmp / "emperor-front-start.log"),
                "command": shlex.join(em.argv)}
    finally:
        em.stop()
        rmtree(vdir)


def new_file(procs: Procs, ports: Ports, tmp: Path, emperor_run, base_ini, n: int) -> dict:
    """A new vassal file with a `domain` -> its name answering through nginx."""
    vdir = tmp / "front-new"
    vdir.mkdir()
    (vdir / "base.ini").write_text(base_ini("heavy", tmp / "front-new.sock"))
    front = ports.get()
    em = emperor_run(procs, vdir, "emperor-front-new",
                     ["--http", f"127.0.0.1:{front}", "--run-dir", str(tmp / "run-new")])
    try:
        deadline = time.perf_counter() + 60
        while host_get(front, "nobody.localhost") != 404:
            if time.perf_counter() > deadline or not em.alive():
                raise BenchError("the front door never answered")
            time.sleep(0.01)
        time.sleep(2.0)  # the base is loaded
        samples = []
        for i in range(n):
            name = f"n{i:03d}"
            t0 = time.perf_counter()
            write_vassal(vdir, name, vassal_ini(name, f"domain = {name}.localhost"))
            t200 = wait_host_200(front, f"{name}.localhost", 30, em.alive, "/hello")
            samples.append((t200 - t0) * 1000)
            time.sleep(1.2)  # apart from the previous reload (--min-gap 1 s)
        return {**summary(samples), "samples_ms": samples, "command": shlex.join(em.argv)}
    finally:
        em.stop()
        rmtree(vdir)



def run(procs: Procs, ports: Ports, tmp: Path, emperor_run, base_ini, quick: bool,
        duration: str, step) -> dict:
    n_od, n_mass, n_new = (10, 50, 5) if quick else (30, 200, 10)
    tmp.chmod(0o755)  # nginx's workers (www-data under a root Emperor) reach the sockets
    args = (procs, ports, tmp, emperor_run, base_ini)
    steps = {  # key: (step name, what it runs)
        "serving": ("front serving", lambda: serving(*args, duration)),
        "asleep": ("front asleep", lambda: first_request_asleep(*args, n_od)),
        "mass_wake": ("front mass wake", lambda: mass_wake(*args, n_mass)),
        "mass_start": ("front mass start", lambda: mass_start(*args, n_mass)),
        "new_file": ("front new file", lambda: new_file(*args, n_new)),
        "churn": ("front churn", lambda: churn(*args, 10 if quick else 30)),
        "fairness": ("front fairness", lambda: fairness(*args, duration, floor=True)),
        "fairness_nohandoff": ("front fairness, workers keep their connections",
                               lambda: fairness(*args, duration, handoff=False)),
        "fairness_nokeepalive": ("front fairness, no keep-alive",
                                 lambda: fairness(*args, duration, keepalive=0)),
        "fairness_saturated": ("front fairness, two slow clients",
                               lambda: fairness(*args, duration, slow_conns=2)),
        "bound": ("front bound: app servers direct and through nginx",
                  lambda: front_bound.bound(*args, duration)),
    }
    # BENCH_FRONT_STEPS=serving,fairness,...: only those (a quicker look
    # while working on one of them)
    wanted = {w for w in os.environ.get("BENCH_FRONT_STEPS", "").split(",") if w}
    return {key: step(name, fn) for key, (name, fn) in steps.items() if not wanted or key in wanted}


def _cpu(target: dict) -> str:
    """CPU microseconds a request, by process (front_cpu.wrk_measured)."""
    cpu = target.get("cpu_us") or {}
    return " ".join(f"{k} {v:.1f}" for k, v in cpu.items() if v and k != "others")


def _runs(row: dict) -> str:
    """`, runs 5.3 6.1 17.0x`: each round's p99 / p50 behind a median."""
    xs = [x for x in row.get("ratio_runs") or [] if x is not None]
    return f"; median of {len(xs)}: " + " ".join(f"{x:.1f}" for x in xs) if len(xs) > 1 else ""


def _waits(run: dict) -> str:
    """Microseconds each role's processes were runnable without a CPU, and
    their preemptions per 1,000 requests (front_cpu.wrk_measured)."""
    pre = run.get("preempted_per_1k") or {}
    return ", ".join(f"{k} {v:.0f} ({pre.get(k, 0):.0f} preempted /1k)"
                     for k, v in (run.get("wait_us") or {}).items() if k != "emperor") + \
        (f", wrk preempted {pre['wrk']:.0f} /1k" if "wrk" in pre else "")


def rows(fr: dict) -> list[tuple[str, str, str, str]]:
    out = []
    sv = fr.get("serving") or {}
    for key, label in SERVING_LABELS.items():
        s = sv.get(key)
        if not s or s.get("ratio") is None:
            continue
        for target, rkey, over in (("front", "ratio", "its TCP http-socket"),
                                   ("front_unix", "ratio_unix", "a twin on a UNIX socket")):
            if s.get(rkey) is None:
                continue
            runs = ", ".join(f"{x:.2f}" for x in s[rkey + "_runs"])
            out.append((f"hello world, wrk -t2 -c16, 2 workers: through the front door ({over}) / direct, "
                        f"{len(s[rkey + '_runs'])} interleaved rounds ({label})",
                        f"{s[target]['rps']:.0f} / {s['direct']['rps']:.0f} req/s (median {s[rkey]:.2f}; "
                        f"rounds {runs}); CPU a request (us) through {_cpu(s[target])}, direct "
                        f"{_cpu(s['direct'])}: predicts {s.get(rkey.replace('ratio', 'cpu_ratio')) or 0:.2f}; "
                        f"others' cores {s[target]['cores_others']:.2f}; load {s.get('load_before', '?')} -> "
                        f"{s.get('load_after', '?')}" + ("; sched_autogroup on" if s.get("autogroup") else ""),
                        ">= 0.80", "met" if s[rkey] >= 0.8 else "**not met**"))
    a = fr.get("asleep")
    if a:
        out.append((f"first request to a sleeping on-demand heavy app through nginx: p50 / p99 (N={a['n']})",
                    f"{a['p50']:.1f} / {a['p99']:.1f} ms", "", ""))
    m = fr.get("mass_wake")
    if m:
        out.append((f"{m['n']} sleeping apps with domain: `emperor run` -> every name answered once",
                    f"{m['all_answered_s']:.2f} s; PSS under the Emperor {m['pss_under_bytes'] / 2**20:.0f} MB "
                    f"({m['processes_under']} processes)", "", ""))
    ms = fr.get("mass_start")
    if ms:
        out.append((f"{ms['n']} vassals with domain (not on-demand): `emperor run --http` -> every "
                    "name answered once; nginx reloads meanwhile",
                    f"{ms['all_answered_s']:.2f} s; {ms['reloads']} reloads", "", ""))
    ch = fr.get("churn")
    if ch:
        out.append((f"2 steady apps under wrk -c16 each for {ch['seconds']} s while 10 others are "
                    "added and removed every 0.5 s: failed requests of the steady apps",
                    f"{ch['errors']} socket errors + {ch['non_2xx']} non-2xx of {ch['requests']}; "
                    f"{ch['reloads']} reloads", "0", "met" if ch["errors"] + ch["non_2xx"] == 0
                    else "**not met**"))
    for key, label in (("fairness", "keep-alive upstreams, a busy worker's waiting connections taken by a free one"),
                       ("fairness_nohandoff", "keep-alive upstreams, vassal `http-keepalive-handoff = false`"),
                       ("fairness_nokeepalive", "--nginx-keepalive 0"),
                       ("fairness_saturated", "keep-alive upstreams, hand-over; both workers' room taken "
                                              "by slow clients: no target")):
        fa = fr.get(key)
        if not fa or fa.get("ratio") is None:
            continue
        f_ = fa["fast"]
        target = key != "fairness_saturated"
        out.append((f"wrk -c16 on a fast route through nginx ({label}, 2 workers) "
                    f"while wrk -c{fa.get('slow_conns', 2)} keeps a 100 ms route busy: p99 / p50",
                    f"{f_['p99_ms']:.2f} / {f_['p50_ms']:.2f} ms ({fa['ratio']:.1f}x{_runs(f_)}); alone "
                    f"{fa['alone']['p99_ms']:.2f} / {fa['alone']['p50_ms']:.2f} ms "
                    f"({fa['alone'].get('ratio') or 0:.1f}x{_runs(fa['alone'])}); "
                    f"{fa['fast']['requests']} fast, {fa['slow']['requests']} slow requests; "
                    + (f"waiting for a CPU a fast request (us): {_waits(fa['fast'])}; " if fa["fast"].get("wait_us")
                       else "") +
                    (f"nginx alone (`return 200`, no vassal) {fa['floor']['p99_ms']:.2f} / "
                       f"{fa['floor']['p50_ms']:.2f} ms ({fa['floor']['ratio']:.1f}x{_runs(fa['floor'])}); "
                       if (fa.get("floor") or {}).get("ratio") else "") +
                    f"load {fa.get('load_before', '?')} -> {fa.get('load_after', '?')}",
                    "<= 3x" if target else "",
                    ("met" if fa["ratio"] <= 3 else "**not met**") if target else ""))
    if fr.get("bound"):
        out += front_bound.rows(fr["bound"])
    nf = fr.get("new_file")
    if nf:
        out.append((f"new vassal file -> its name answering through nginx (`/hello`): p50 / max (N={nf['n']})",
                    f"{nf['p50']:.1f} / {nf['max']:.1f} ms", "", ""))
    return out
