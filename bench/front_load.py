"""The front door's benchmarks under load (part of bench/run.py scenario
`front`, see bench/front.py), and the helpers every front scenario uses.

- serving: hello world, 2 workers, wrk -t2 -c16 over keep-alive, on the
  vassal's own port and through nginx, in the same run (and through nginx
  keeping idle connections to the vassal, `--nginx-keepalive 16`);
- churn: two steady apps under wrk while other vassal files come and go;
- fairness: a fast route's latency while a slow route keeps a worker busy,
  beside the machine's own floor (nginx answering by itself, same load).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib import Ports, Procs, http_get, rmtree, wait_200
from front_cpu import Groups, wrk_measured
from psgi_forkserver.frontdoor.config import default_workers

POLL = 0.0005


def host_get(port: int, host: str, path: str = "/", timeout: float = 10.0) -> int | None:
    """One HTTP/1.0 GET to loopback `port` with `Host: host`."""
    return http_get(port, path, timeout, host=host)


def wait_host_200(port: int, host: str, timeout: float, alive=None, path: str = "/") -> float:
    """benchlib.wait_200 through the front door: `Host: host`."""
    return wait_200(port, timeout, path, alive, host=host)


def vassal_ini(name: str, *lines: str) -> str:
    return "\n".join(["[uwsgi]", f"env = APP_NAME={name}", *lines]) + "\n"


def write_vassal(vdir: Path, name: str, text: str) -> None:
    tmp = vdir / f".{name}.ini.tmp"
    tmp.write_text(text)
    tmp.rename(vdir / f"{name}.ini")


SERVING_VARIANTS = {  # key: (emperor options, vassal lines)
    "default": ([], []),
    "nolog": (["--no-http-access-log"], []),
    "nohandoff": (["--no-http-access-log"], ["http-keepalive-handoff = false"]),
    "nokeepalive": (["--no-http-access-log", "--nginx-keepalive", "0"], []),
    "workers2": (["--nginx-workers", "2"], []),
}
SERVING_LABELS = {
    "default": "as `emperor run --http` starts it: access log on, 16 idle connections kept per vassal",
    "nolog": "--no-http-access-log",
    "nohandoff": "--no-http-access-log, vassal `http-keepalive-handoff = false` (a worker keeps its connections)",
    "nokeepalive": "--no-http-access-log --nginx-keepalive 0: a new connection per request",
    "workers2": "--nginx-workers 2 (access log on)",
}

#: the serving step's targets, in the order a round runs them (the next
#: round runs them backwards: drift of the machine's load falls on both)
SERVING_TARGETS = ("direct", "front", "front_unix")


def load() -> str:
    """The machine's load average (1, 5, 15 min): other work shares it."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def autogroup() -> bool | None:
    """Whether the kernel shares the CPU between sessions first
    (sched_autogroup): then nginx, each vassal and wrk, each in a session
    of its own, weigh one session each against every other busy session
    on the machine, whatever their number of processes; a path through
    nginx (three sessions) gets a larger part of a machine busy with
    other sessions than the direct one (two), and its rate is flattered."""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return None


def _median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def serving_summary(rounds: list[dict]) -> dict:
    """Medians over the rounds: each target's rate, latency and CPU a
    request (by role), the ratios through / direct, and the ratio the CPU
    a request predicts on a machine whose cores are all busy:
    (wrk + vassal) direct / (wrk + nginx + vassal + Emperor) through."""
    out: dict = {}
    for t in SERVING_TARGETS:
        runs = [r[t] for r in rounds if r.get(t)]
        if not runs:
            continue
        roles = {k for x in runs for k in (x.get("cpu_us") or {})}
        out[t] = {"rps": _median(x["rps"] for x in runs), "rps_runs": [x["rps"] for x in runs],
                  "p50_ms": _median(x["p50_ms"] for x in runs),
                  "p99_ms": _median(x["p99_ms"] for x in runs),
                  "errors": sum(x["errors"] + x["non_2xx"] for x in runs),
                  "cores_others": _median(x.get("cores_others") for x in runs),
                  "load": [x["load"] for x in runs],
                  "cpu_us": {k: _median((x.get("cpu_us") or {}).get(k) for x in runs) for k in sorted(roles)}}
    for t, key in (("front", "ratio"), ("front_unix", "ratio_unix")):
        per_round = [r[t]["rps"] / r["direct"]["rps"] for r in rounds
                     if r.get(t) and r.get("direct") and r[t]["rps"] and r["direct"]["rps"]]
        out[key] = _median(per_round)
        out[key + "_runs"] = per_round
        cpu_t, cpu_d = (out.get(t) or {}).get("cpu_us"), (out.get("direct") or {}).get("cpu_us")
        if cpu_t and cpu_d:
            paid = sum(v or 0 for k, v in cpu_t.items() if k != "others")
            direct = sum(v or 0 for k, v in cpu_d.items() if k != "others")
            out[key.replace("ratio", "cpu_ratio")] = direct / paid if paid else None
    return out


def serving(procs: Procs, ports: Ports, tmp: Path, emperor_run, base_ini, duration: str,
            rounds: int | None = None) -> dict:
    """Hello world (2 workers) on the vassal's own port and through the
    front door, interleaved: every variant's Emperor runs at once (the
    idle ones cost next to nothing), and `rounds` rounds
    (BENCH_FRONT_ROUNDS, default 3) each load every variant's direct port,
    nginx to that vassal (its TCP http-socket) and nginx to a twin on a
    UNIX socket (the default of a vassal with `domain`), one after the
    other, each round in the other order than the last: a change of the
    machine's load falls on every variant alike. Medians, and the CPU a
    request costs each process (front_cpu)."""
    rounds = rounds or int(os.environ.get("BENCH_FRONT_ROUNDS", "3"))
    # BENCH_FRONT_SERVING=default,nolog: only those variants
    wanted = {w for w in os.environ.get("BENCH_FRONT_SERVING", "").split(",") if w}
    variants = {k: v for k, v in SERVING_VARIANTS.items() if not wanted or k in wanted}
    started: dict[str, tuple] = {}  # key -> (emperor, vassals dir, urls, groups)
    try:
        for key, (extra, lines) in variants.items():
            vdir = tmp / f"front-serve-{key}"
            vdir.mkdir()
            (vdir / "base.ini").write_text(base_ini("hello", tmp / f"front-serve-{key}.sock"))
            direct = ports.get()
            common = ["processes = 2", "disable-logging = true", *lines]
            write_vassal(vdir, "hello", vassal_ini("hello", f"http-socket = 127.0.0.1:{direct}",
                                                   "domain = hello.localhost", *common))
            write_vassal(vdir, "hellou", vassal_ini("hellou", "domain = hellou.localhost", *common))
            front = ports.get()
            em = emperor_run(procs, vdir, f"emperor-front-serve-{key}",
                             ["--http", f"127.0.0.1:{front}", "--run-dir", str(tmp / f"run-s{key}"),
                              *extra])
            urls = {"direct": (f"http://127.0.0.1:{direct}/", None),
                    "front": (f"http://127.0.0.1:{front}/", "hello.localhost"),
                    "front_unix": (f"http://127.0.0.1:{front}/", "hellou.localhost")}
            started[key] = (em, vdir, urls, None)
        for key, (em, vdir, urls, _) in started.items():
            for t in ("front", "front_unix"):
                wait_200(int(urls[t][0].split(":")[2].rstrip("/")), 60, "/", em.alive, host=urls[t][1])
            groups = Groups.under_emperor(em.ps)
            started[key] = (em, vdir, urls, groups)
            for url, host in urls.values():  # warm-up, not counted
                wrk_measured(url, "1s", groups, host)
        load_before = load()
        runs: dict[str, list[dict]] = {key: [] for key in started}
        pairs = [(key, t) for key in started for t in SERVING_TARGETS]
        for i in range(rounds):
            got: dict[str, dict] = {key: {} for key in started}
            for key, t in (pairs if i % 2 == 0 else pairs[::-1]):
                _, _, urls, groups = started[key]
                got[key][t] = wrk_measured(urls[t][0], duration, groups, urls[t][1])
            for key in started:
                runs[key].append(got[key])
        res: dict = {}
        for key, (em, _, _, _) in started.items():
            res[key] = {"load_before": load_before, "load_after": load(), "rounds": runs[key],
                        "autogroup": autogroup(),
                        **serving_summary(runs[key]), "command": shlex.join(em.argv),
                        "vassal_lines": variants[key][1]}
        return res
    finally:
        for em, vdir, _, _ in started.values():
            em.stop()
            rmtree(vdir)


def em_reloads(log: Path) -> int | None:
    """nginx reloads an Emperor logged ("routing changed ... reloads")."""
    try:
        return log.read_text(errors="replace").count(" reloads\n")
    except OSError:
        return None



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
        write_vassal(vdir, name, vassal_ini(name, f"domain = {name}.localhost", "processes = 2",
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
                        write_vassal(vdir, f"t{i}", vassal_ini(f"t{i}", f"domain = t{i}.localhost",
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


def _p99_over_p50(run: dict) -> float | None:
    return run["p99_ms"] / run["p50_ms"] if run.get("p50_ms") and run.get("p99_ms") else None


def _median_run(runs: list[dict]) -> dict:
    """One row of several wrk runs: median p50, p99 and p99 / p50 (each
    run's own ratio), each role's median wait and preemptions a request;
    requests and errors summed."""
    out: dict = {"runs": len(runs), "requests": sum(r.get("requests") or 0 for r in runs),
                 "errors": sum(r.get("errors", 0) + r.get("non_2xx", 0) for r in runs),
                 "p50_ms": _median(r.get("p50_ms") for r in runs),
                 "p99_ms": _median(r.get("p99_ms") for r in runs),
                 "ratio_runs": [_p99_over_p50(r) for r in runs]}
    out["ratio"] = _median(out["ratio_runs"])
    for key in ("wait_us", "preempted_per_1k", "cpu_us"):
        roles = {k for r in runs for k in (r.get(key) or {})}
        if roles:
            out[key] = {k: _median((r.get(key) or {}).get(k) for r in runs) for k in sorted(roles)}
    return out


def fairness(procs: Procs, ports: Ports, tmp: Path, emperor_run, base_ini, duration: str,
             keepalive: int = 16, handoff: bool = True, slow_conns: int = 1,
             floor: bool = False, rounds: int | None = None) -> dict:
    """One vassal (2 workers) behind nginx with keep-alive upstreams: wrk
    -c16 on its fast route while wrk -c`slow_conns` keeps its slow route
    (100 ms) busy; the fast route's p50 and p99. One slow client leaves a
    worker's worth of room for the fast route, and the question is whether
    a fast request ever waits for the slow one; two slow clients on two
    workers take all of it (any prefork server then queues fast requests
    behind slow ones, by capacity, not fairness). `handoff` False: the
    vassal's workers keep the connections they accepted
    (http-keepalive-handoff). `floor`: beside them, the same load's p99 /
    p50 on an nginx with nothing behind it (nginx_floor). `rounds` rounds
    (BENCH_FRONT_ROUNDS, default 3) of floor, fast alone and fast beside
    the slow route, each round in the other order than the last; each row
    the median of its runs."""
    rounds = rounds or int(os.environ.get("BENCH_FRONT_ROUNDS", "3"))
    tag = f"{keepalive}{'' if handoff else 'nh'}s{slow_conns}"
    vdir = tmp / f"front-fair{tag}"
    vdir.mkdir()
    (vdir / "base.ini").write_text(
        f"[uwsgi]\nearly-psgi = {Path(__file__).resolve().parent / 'slow.psgi'}\n"
        f"fork-server = {tmp / 'front-fair.sock'}\n")
    write_vassal(vdir, "fair", vassal_ini("fair", "domain = fair.localhost", "processes = 2",
                                 "disable-logging = true",
                                 *([] if handoff else ["http-keepalive-handoff = false"])))
    front = ports.get()
    em = emperor_run(procs, vdir, f"emperor-front-fair{tag}",
                     ["--http", f"127.0.0.1:{front}", "--run-dir", str(tmp / f"run-fair{tag}"),
                      "--no-http-access-log", "--nginx-keepalive", str(keepalive)])
    floor_port, floor_stop = nginx_floor(procs, ports, tmp) if floor else (None, None)
    try:
        wait_host_200(front, "fair.localhost", 60, em.alive)
        load_before = load()
        # the fast runs count each process's waits for a CPU (front_cpu):
        # whose descheduling the fast requests' tail is
        groups = Groups.under_emperor(em.ps)
        url = f"http://127.0.0.1:{front}/"

        def beside_slow() -> tuple[dict, dict]:
            with ThreadPoolExecutor(2) as pool:
                slow = pool.submit(_wrk_full, front, duration, "fair.localhost", slow_conns, "/slow")
                fast = pool.submit(wrk_measured, url, duration, groups, "fair.localhost")
                return fast.result(), slow.result()

        steps = ["alone", "beside"] + (["floor"] if floor_port else [])
        got: dict[str, list] = {k: [] for k in steps}
        for i in range(rounds):
            for step in (steps if i % 2 == 0 else steps[::-1]):
                if step == "alone":
                    got[step].append(wrk_measured(url, duration, groups, "fair.localhost"))
                elif step == "beside":
                    got[step].append(beside_slow())
                else:
                    got[step].append(_wrk_full(floor_port, duration, "floor.localhost"))
        fast = _median_run([f for f, _ in got["beside"]])
        return {"alone": _median_run(got["alone"]), "fast": fast,
                "slow": _median_run([s_ for _, s_ in got["beside"]]),
                "floor": _median_run(got["floor"]) if floor_port else None,
                "handoff": handoff, "slow_conns": slow_conns, "keepalive": keepalive,
                "rounds": rounds, "load_before": load_before, "load_after": load(),
                "ratio": fast["ratio"], "command": shlex.join(em.argv)}
    finally:
        if floor_stop:
            floor_stop()
        em.stop()
        rmtree(vdir)


def nginx_floor(procs: Procs, ports: Ports, tmp: Path):
    """The machine's own tail under the fairness step's load: an nginx (as
    many workers as the front door's) that answers 200 itself, no vassal
    behind it; (its port, how to stop it). No p99 / p50 through the front
    door can be lower here; on two shared cores it is the kernel's
    scheduling of wrk and nginx, which the fairness rows pay too."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    d = tmp / "front-floor"
    (d / "tmp").mkdir(parents=True)
    port = ports.get()
    temp = " ".join(f"{k}_temp_path {d / 'tmp'};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (d / "nginx.conf").write_text(
        f"daemon off;\nworker_processes {default_workers()};\npid {d / 'nginx.pid'};\nerror_log stderr warn;\n"
        "events { worker_connections 1024; }\n"
        f"http {{ access_log off; {temp}\n"
        f'  server {{ listen 127.0.0.1:{port}; location / {{ return 200 "Hello, World!\\n"; }} }} }}\n')
    p = procs.spawn([nginx, "-p", str(d), "-c", str(d / "nginx.conf")], log="front-floor-nginx")

    def stop() -> None:
        procs.stop_tree(p.pid)
        rmtree(d)

    try:
        wait_200(port, 30, "/", lambda: p.poll() is None)
    except BaseException:
        stop()
        raise
    return port, stop
