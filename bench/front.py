"""The front door's benchmarks (bench/run.py scenario `front`): nginx
started by `emperor run --http`, routing by Host name.

- serving: hello world, 2 workers, wrk -t2 -c16 over keep-alive, on the
  vassal's own port and through nginx, in the same run (and through nginx
  keeping idle connections to the vassal, `--nginx-keepalive 16`);
- first request to a sleeping on-demand heavy app through nginx;
- 200 sleeping apps with `domain`: `emperor run` -> every name answered
  once (which wakes all of them), time and memory;
- a new vassal file -> its name answering through nginx.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib import BenchError, Ports, Procs, http_get, pss_of, rmtree, summary

POLL = 0.0005


def host_get(port: int, host: str, path: str = "/", timeout: float = 10.0) -> int | None:
    """One HTTP/1.0 GET to loopback `port` with `Host: host`."""
    return http_get(port, path, timeout, host=host)


def wait_host_200(port: int, host: str, timeout: float, alive=None, path: str = "/") -> float:
    deadline = time.perf_counter() + timeout
    n = 0
    while True:
        if host_get(port, host, path) == 200:
            return time.perf_counter()
        n += 1
        if time.perf_counter() >= deadline:
            raise BenchError(f"no HTTP 200 for {host} on port {port} within {timeout:g} s")
        if alive is not None and n % 200 == 0 and not alive():
            raise BenchError(f"the emperor died before {host} answered")
        time.sleep(POLL)


def wrk(port: int, duration: str, host: str | None = None) -> dict:
    argv = ["wrk", "-t2", "-c16", f"-d{duration}"]
    if host:
        argv += ["-H", f"Host: {host}"]
    argv.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120).stdout
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    return {"rps": float(m.group(1)) if m else None, "command": shlex.join(argv),
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errors.group(0) if errors else None,
            "output": None if m else out}


def _vassal(name: str, *lines: str) -> str:
    return "\n".join(["[uwsgi]", f"env = APP_NAME={name}", *lines]) + "\n"


def _write(vdir: Path, name: str, text: str) -> None:
    tmp = vdir / f".{name}.ini.tmp"
    tmp.write_text(text)
    tmp.rename(vdir / f"{name}.ini")


SERVING_VARIANTS = {  # key: (emperor options, vassal lines)
    "default": ([], []),
    "nolog": (["--no-http-access-log"], []),
    "nohandoff": (["--no-http-access-log"], ["http-keepalive-handoff = false"]),
    "nokeepalive": (["--no-http-access-log", "--nginx-keepalive", "0"], []),
}
SERVING_LABELS = {
    "default": "as `emperor run --http` starts it: access log on, 16 idle connections kept per vassal",
    "nolog": "--no-http-access-log",
    "nohandoff": "--no-http-access-log, vassal `http-keepalive-handoff = false` (a worker keeps its connections)",
    "nokeepalive": "--no-http-access-log --nginx-keepalive 0: a new connection per request",
}


def load() -> str:
    """The machine's load average (1, 5, 15 min): other work shares it."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def serving(procs: Procs, ports: Ports, tmp: Path, emperor_run, base_ini, duration: str) -> dict:
    """The same vassal, direct and through the front door, in one run."""
    res: dict = {}
    for key, (extra, lines) in SERVING_VARIANTS.items():
        vdir = tmp / f"front-serve-{key}"
        vdir.mkdir()
        (vdir / "base.ini").write_text(base_ini("hello", tmp / f"front-serve-{key}.sock"))
        direct = ports.get()
        _write(vdir, "hello", _vassal("hello", f"http-socket = 127.0.0.1:{direct}",
                                      "domain = hello.localhost", "processes = 2",
                                      "disable-logging = true", *lines))
        front = ports.get()
        em = emperor_run(procs, vdir, f"emperor-front-serve-{key}",
                         ["--http", f"127.0.0.1:{front}", "--run-dir", str(tmp / f"run-s{key}"),
                          *extra])
        try:
            wait_host_200(front, "hello.localhost", 60, em.alive)
            wrk(direct, "1s")
            wrk(front, "1s", "hello.localhost")  # warm-up of both, not counted
            res[key] = {"load_before": load(), "direct": wrk(direct, duration),
                        "front": wrk(front, duration, "hello.localhost"),
                        "command": shlex.join(em.argv), "vassal_lines": lines}
            d, f = res[key]["direct"]["rps"], res[key]["front"]["rps"]
            res[key]["ratio"] = f / d if d and f else None
        finally:
            em.stop()
            rmtree(vdir)
    return res


def first_request_asleep(procs: Procs, ports: Ports, tmp: Path, emperor_run, base_ini, n: int) -> dict:
    """n on-demand heavy vassals, asleep; the first GET / of each through nginx."""
    vdir = tmp / "front-od"
    vdir.mkdir()
    (vdir / "base.ini").write_text(base_ini("heavy", tmp / "front-od.sock"))
    for i in range(n):
        _write(vdir, f"od{i:03d}", _vassal(f"od{i:03d}", f"domain = od{i:03d}.localhost",
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
        _write(vdir, name, _vassal(name, f"domain = {name}.localhost", "on-demand = true",
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


def em_reloads(log: Path) -> int | None:
    """nginx reloads an Emperor logged ("routing changed ... reloads")."""
    try:
        return log.read_text(errors="replace").count(" reloads\n")
    except OSError:
        return None


def mass_start(procs: Procs, ports: Ports, tmp: Path, emperor_run, base_ini, n: int) -> dict:
    """n vassals with `domain` (not on-demand): `emperor run --http` -> every
    name answered once, and how many times nginx was reloaded meanwhile."""
    vdir = tmp / "front-start"
    vdir.mkdir()
    (vdir / "base.ini").write_text(base_ini("hello", tmp / "front-start.sock"))
    names = [f"s{i:03d}" for i in range(n)]
    for name in names:
        _write(vdir, name, _vassal(name, f"domain = {name}.localhost", "disable-logging = true"))
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
            _write(vdir, name, _vassal(name, f"domain = {name}.localhost"))
            t200 = wait_host_200(front, f"{name}.localhost", 30, em.alive, "/hello")
            samples.append((t200 - t0) * 1000)
            time.sleep(1.2)  # apart from the previous reload (--min-gap 1 s)
        return {**summary(samples), "samples_ms": samples, "command": shlex.join(em.argv)}
    finally:
        em.stop()
        rmtree(vdir)


def _wrk_full(port: int, duration: str, host: str, conns: int = 16, path: str = "/") -> dict:
    """wrk --latency: requests, errors, p50 and p99 (ms)."""
    argv = ["wrk", f"-t{min(2, conns)}", f"-c{conns}", f"-d{duration}", "--latency", "-H", f"Host: {host}",
            f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120).stdout

    def ms(label: str) -> float | None:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return None
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    total = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    return {"requests": int(total.group(1)) if total else None,
            "errors": sum(map(int, errors.groups())) if errors else 0,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "p50_ms": ms("50"), "p99_ms": ms("99"), "command": shlex.join(argv),
            "output": None if total else out}


def churn(procs: Procs, ports: Ports, tmp: Path, emperor_run, base_ini, seconds: int) -> dict:
    """Two steady apps under wrk (keep-alive, -c16 each) while 10 other
    vassal files are added and removed every 0.5 s: failed requests of the
    steady apps, and nginx reloads meanwhile."""
    vdir = tmp / "front-churn"
    vdir.mkdir()
    (vdir / "base.ini").write_text(base_ini("hello", tmp / "front-churn.sock"))
    for name in ("steady1", "steady2"):
        _write(vdir, name, _vassal(name, f"domain = {name}.localhost", "processes = 2",
                                   "disable-logging = true"))
    front = ports.get()
    em = emperor_run(procs, vdir, "emperor-front-churn",
                     ["--http", f"127.0.0.1:{front}", "--run-dir", str(tmp / "run-churn"),
                      "--no-http-access-log"])
    try:
        for name in ("steady1", "steady2"):
            wait_host_200(front, f"{name}.localhost", 60, em.alive)
        before = em_reloads(tmp / "emperor-front-churn.log") or 0
        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(_wrk_full, front, f"{seconds}s", f"{n}.localhost")
                    for n in ("steady1", "steady2")]
            end = time.perf_counter() + seconds
            toggles, on = 0, False
            while time.perf_counter() < end - 0.5:
                on = not on
                for i in range(10):
                    if on:
                        _write(vdir, f"t{i}", _vassal(f"t{i}", f"domain = t{i}.localhost",
                                                      "disable-logging = true"))
                    else:
                        (vdir / f"t{i}.ini").unlink(missing_ok=True)
                toggles += 1
                time.sleep(0.5)
            results = [r.result() for r in runs]
        reloads = (em_reloads(tmp / "emperor-front-churn.log") or 0) - before
        return {"seconds": seconds, "toggles": toggles,
                "requests": sum(r["requests"] or 0 for r in results),
                "errors": sum(r["errors"] for r in results),
                "non_2xx": sum(r["non_2xx"] for r in results),
                "reloads": reloads, "wrk": results, "command": shlex.join(em.argv)}
    finally:
        em.stop()
        rmtree(vdir)


def fairness(procs: Procs, ports: Ports, tmp: Path, emperor_run, base_ini, duration: str,
             keepalive: int = 16, handoff: bool = True, slow_conns: int = 1) -> dict:
    """One vassal (2 workers) behind nginx with keep-alive upstreams: wrk
    -c16 on its fast route while wrk -c`slow_conns` keeps its slow route
    (100 ms) busy; the fast route's p50 and p99. One slow client leaves a
    worker's worth of room for the fast route, and the question is whether
    a fast request ever waits for the slow one; two slow clients on two
    workers take all of it (any prefork server then queues fast requests
    behind slow ones, by capacity, not fairness). `handoff` False: the
    vassal's workers keep the connections they accepted
    (http-keepalive-handoff)."""
    tag = f"{keepalive}{'' if handoff else 'nh'}s{slow_conns}"
    vdir = tmp / f"front-fair{tag}"
    vdir.mkdir()
    (vdir / "base.ini").write_text(
        f"[uwsgi]\nearly-psgi = {Path(__file__).resolve().parent / 'slow.psgi'}\n"
        f"fork-server = {tmp / 'front-fair.sock'}\n")
    _write(vdir, "fair", _vassal("fair", "domain = fair.localhost", "processes = 2",
                                 "disable-logging = true",
                                 *([] if handoff else ["http-keepalive-handoff = false"])))
    front = ports.get()
    em = emperor_run(procs, vdir, f"emperor-front-fair{tag}",
                     ["--http", f"127.0.0.1:{front}", "--run-dir", str(tmp / f"run-fair{tag}"),
                      "--no-http-access-log", "--nginx-keepalive", str(keepalive)])
    try:
        wait_host_200(front, "fair.localhost", 60, em.alive)
        load_before = load()
        alone = _wrk_full(front, duration, "fair.localhost")
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(_wrk_full, front, duration, "fair.localhost", slow_conns, "/slow")
            fast = pool.submit(_wrk_full, front, duration, "fair.localhost")
            slow_r, fast_r = slow.result(), fast.result()
        return {"alone": alone, "fast": fast_r, "slow": slow_r, "handoff": handoff,
                "slow_conns": slow_conns, "keepalive": keepalive,
                "load_before": load_before, "load_after": load(),
                "ratio": (fast_r["p99_ms"] / fast_r["p50_ms"])
                if fast_r["p50_ms"] and fast_r["p99_ms"] else None,
                "command": shlex.join(em.argv)}
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
        "fairness": ("front fairness", lambda: fairness(*args, duration)),
        "fairness_nohandoff": ("front fairness, workers keep their connections",
                               lambda: fairness(*args, duration, handoff=False)),
        "fairness_nokeepalive": ("front fairness, no keep-alive",
                                 lambda: fairness(*args, duration, keepalive=0)),
        "fairness_saturated": ("front fairness, two slow clients",
                               lambda: fairness(*args, duration, slow_conns=2)),
    }
    # BENCH_FRONT_STEPS=serving,fairness,...: only those (a quicker look
    # while working on one of them)
    wanted = {w for w in os.environ.get("BENCH_FRONT_STEPS", "").split(",") if w}
    return {key: step(name, fn) for key, (name, fn) in steps.items() if not wanted or key in wanted}


def rows(fr: dict) -> list[tuple[str, str, str, str]]:
    out = []
    sv = fr.get("serving") or {}
    for key, label in SERVING_LABELS.items():
        s = sv.get(key)
        if s and s["ratio"] is not None:
            out.append((f"hello world, wrk -t2 -c16, 2 workers: through the front door / direct ({label})",
                        f"{s['front']['rps']:.0f} / {s['direct']['rps']:.0f} req/s ({s['ratio']:.2f}); "
                        f"load {s.get('load_before', '?')}",
                        ">= 0.80", "met" if s["ratio"] >= 0.8 else "**not met**"))
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
                    f"{f_['p99_ms']:.2f} / {f_['p50_ms']:.2f} ms ({fa['ratio']:.1f}x); alone "
                    f"{fa['alone']['p99_ms']:.2f} / {fa['alone']['p50_ms']:.2f} ms; "
                    f"{fa['fast']['requests']} fast, {fa['slow']['requests']} slow requests; "
                    f"load {fa.get('load_before', '?')} -> {fa.get('load_after', '?')}",
                    "<= 3x" if target else "",
                    ("met" if fa["ratio"] <= 3 else "**not met**") if target else ""))
    nf = fr.get("new_file")
    if nf:
        out.append((f"new vassal file -> its name answering through nginx (`/hello`): p50 / max (N={nf['n']})",
                    f"{nf['p50']:.1f} / {nf['max']:.1f} ms", "", ""))
    return out
