"""What bounds through / direct on this machine (bench/run.py --only front,
step `bound`): the same wrk load on each app server's own port and through
one nginx whose configuration is the front door's own generator's, side by
side, interleaved.

App servers, each 2 processes serving bench/slow.psgi (hello world, and
100 ms on /slow), all running at once (an idle one costs nothing):

- ours: a vassal of `emperor run` on a TCP http-socket, and a twin on the
  UNIX socket the Emperor binds for a vassal with `domain` (also loaded
  through the Emperor's own nginx, the product as it runs);
- Starman (Debian's), `--workers 2 --preload-app`;
- uWSGI 2.1 ($UWSGI21), `--http11-socket` (keep-alive) and a uwsgi-protocol
  socket, `--master --processes 2`: proxy_pass and uwsgi_pass through;
- a second nginx (2 workers) answering `return 200` itself: the cheapest
  upstream there is, the ideal app server;
- and nginx answering `return 200` itself, no upstream: what wrk and nginx
  alone cost.

The nginx in front is `render_nginx_conf` of routes to all of them (the
access log on, written to a file: the Emperor's copy of it is not counted).
Each round loads every target once, the next round in the reverse order;
the figures are medians of the rounds. Beside each rate: the CPU a request
of wrk, of nginx, of the app server's processes (front_cpu). Then the fast
route's p99 / p50 under wrk -c16 while wrk -c1 keeps /slow busy, through
the same nginx with keep-alive upstreams, for ours, Starman and uWSGI.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchlib import BenchError, Ports, Procs, rmtree, wait_200
from front_cpu import Groups, wrk_measured
from front_load import _median, _median_run, _wrk_full, load, vassal_ini, write_vassal
from psgi_forkserver.frontdoor.config import render_nginx_conf, upstream_name
from psgi_forkserver.frontdoor.nginx import find_nginx, nginx_worker_user
from psgi_forkserver.frontdoor.route import Route
from settings import say
from uwsgi21 import uwsgi21_binary

SLOW_APP = Path(__file__).resolve().parent / "slow.psgi"

#: (through target, its direct target): the ratios the step reports
PAIRS = {
    "ours_tcp": "ours", "ours_unix": "ours", "ours_emperor": "ours",
    "starman_via": "starman", "uwsgi_http": "uwsgi", "uwsgi_uwsgi": "uwsgi", "ideal_via": "ideal",
}
LABELS = {
    "ours": "ours (a vassal of emperor run, 2 workers), its own port",
    "ours_tcp": "ours through nginx, TCP upstream (proxy_pass, keep-alive)",
    "ours_unix": "ours through nginx, UNIX upstream (the default of a vassal with domain)",
    "ours_emperor": "ours through the Emperor's own nginx (UNIX, access log relayed by the Emperor)",
    "starman": "Starman --workers 2 --preload-app, its own port",
    "starman_via": "Starman through nginx (proxy_pass, a connection a request)",
    "uwsgi": "uWSGI 2.1 --http11-socket, 2 processes, its own port",
    "uwsgi_http": "uWSGI 2.1 through nginx, proxy_pass to its http11-socket (a connection a request)",
    "uwsgi_uwsgi": "uWSGI 2.1 through nginx, uwsgi_pass (a connection a request)",
    "starman_ka": "Starman through nginx, keep-alive upstream (16 kept)",
    "uwsgi_ka": "uWSGI 2.1 through nginx, proxy_pass, keep-alive upstream (16 kept)",
    "ideal": "a second nginx (2 workers) answering return 200, its own port",
    "ideal_via": "that nginx as the upstream, through nginx (proxy_pass, keep-alive)",
    "self": "nginx answering return 200 itself (no upstream)",
}


@dataclass
class Under(Groups):
    """Groups whose nginx role is the workers of the nginx master `master`
    now (a reload replaces them)."""

    master: int = 0

    def pids(self) -> dict[str, set[int]]:
        out = super().pids()
        if self.master:
            out["nginx"] = set(_nginx_workers(self.master))
        return out


@dataclass
class Target:
    url: str
    host: str | None
    groups: Groups


def _nginx_workers(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def _spawn_ideal(procs: Procs, tmp: Path, port: int):
    """An nginx of 2 workers answering hello world itself (the upstream that
    costs least), keep-alive without a request limit."""
    d = tmp / "bound-ideal"
    (d / "tmp").mkdir(parents=True)
    temp = " ".join(f"{k}_temp_path {d / 'tmp'};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (d / "nginx.conf").write_text(
        f"daemon off;\nworker_processes 2;\npid {d / 'nginx.pid'};\nerror_log stderr warn;\n"
        "events { worker_connections 1024; }\n"
        f"http {{ access_log off; keepalive_requests 1000000; {temp}\n"
        f'  server {{ listen 127.0.0.1:{port}; location / {{ return 200 "Hello, World!\\n"; }} }} }}\n')
    return procs.spawn([find_nginx() or "nginx", "-p", str(d), "-c", str(d / "nginx.conf")], log="bound-ideal")


def front_conf(routes: list[Route], listen: str, run_dir: Path, self_name: str,
               close: tuple[str, ...] = (), uwsgi_path_info: tuple[str, ...] = ()) -> str:
    """The generator's configuration of `routes`, plus one server answering
    `self_name` with `return 200` itself; the upstreams of the vassals in
    `close` keep no idle connection (a connection a request)."""
    user = nginx_worker_user(None)[0] if os.geteuid() == 0 else None
    conf = render_nginx_conf(routes, listen, run_dir, user=user)
    for name in close:
        conf, n = re.subn(rf"(upstream {upstream_name(name)} {{\n[^\n]*\n)\s*keepalive \d+;\n", r"\1", conf)
        assert n == 1, name
    # uWSGI takes PATH_INFO from nginx (our vassal decodes it from REQUEST_URI)
    for name in uwsgi_path_info:
        conf, n = re.subn(rf"(uwsgi_pass {upstream_name(name)};\n)(\s*)", r"\1\2uwsgi_param PATH_INFO $document_uri;\n\2",
                          conf)
        assert n == 1, name
    extra = (f'    server {{\n        listen {listen};\n        server_name "{self_name}";\n'
             '        location / {\n            return 200 "Hello, World!\\n";\n        }\n    }\n')
    assert conf.endswith("}\n")
    return conf[:-2] + extra + "}\n"


def _summary(runs: list[dict]) -> dict:
    roles = {k for x in runs for k in (x.get("cpu_us") or {})}
    return {"rps": _median(x["rps"] for x in runs), "output": next((x["output"] for x in runs if x.get("output")), None),
            "rps_runs": [x["rps"] for x in runs],
            "p50_ms": _median(x["p50_ms"] for x in runs), "p99_ms": _median(x["p99_ms"] for x in runs),
            "errors": sum(x["errors"] + x["non_2xx"] for x in runs),
            "cores_others": _median(x.get("cores_others") for x in runs),
            "load": [x["load"] for x in runs],
            "cpu_us": {k: _median((x.get("cpu_us") or {}).get(k) for x in runs) for k in sorted(roles)}}


def _paid(cpu: dict) -> float:
    return sum(v or 0 for k, v in cpu.items() if k != "others")


def bound(procs: Procs, ports: Ports, tmp: Path, emperor_run, base_ini, duration: str,
          rounds: int | None = None) -> dict:
    """The serving rows and the fairness rows of every app server, direct
    and through the generated nginx; see the module's docstring."""
    rounds = rounds or int(os.environ.get("BENCH_FRONT_ROUNDS", "3"))
    uwsgi, why_not = uwsgi21_binary()
    nginx = find_nginx()
    if not nginx:
        raise BenchError("nginx not found")
    stops: list = []
    vdir = tmp / "bound-vassals"
    vdir.mkdir()
    try:
        # ours, under an Emperor of its own (its nginx serves the UNIX twin too)
        (vdir / "base.ini").write_text(f"[uwsgi]\nearly-psgi = {SLOW_APP}\nfork-server = {tmp / 'bound.sock'}\n")
        p_ours, p_front = ports.get(), ports.get()
        common = ["processes = 2", "disable-logging = true"]
        write_vassal(vdir, "hello", vassal_ini("hello", f"http-socket = 127.0.0.1:{p_ours}",
                                               "domain = hello.localhost", *common))
        write_vassal(vdir, "hellou", vassal_ini("hellou", "domain = hellou.localhost", *common))
        em_run = tmp / "run-bound"
        em = emperor_run(procs, vdir, "emperor-bound", ["--http", f"127.0.0.1:{p_front}", "--run-dir", str(em_run)])
        stops.append(em.stop)
        p_starman = ports.get()
        # its workers live for the whole run (by default each stops after
        # 1,000 requests, and a process that went takes its CPU time along)
        st = procs.spawn(["starman", "--workers", "2", "--preload-app", "--max-requests", "100000000",
                          "--listen", f"127.0.0.1:{p_starman}", str(SLOW_APP)], log="bound-starman")
        stops.append(lambda: procs.stop_tree(st.pid))
        p_uw_http, p_uw_uwsgi = ports.get(), ports.get()
        uw = None
        if uwsgi:
            uw = procs.spawn([uwsgi, "--master", "--processes", "2", "--http11-socket", f"127.0.0.1:{p_uw_http}",
                              "--uwsgi-socket", f"127.0.0.1:{p_uw_uwsgi}", "--psgi", str(SLOW_APP),
                              "--disable-logging"], log="bound-uwsgi21")
            stops.append(lambda: procs.stop_tree(uw.pid))
        p_ideal = ports.get()
        ideal = _spawn_ideal(procs, tmp, p_ideal)
        stops.append(lambda: procs.stop_tree(ideal.pid))

        for port, alive in ((p_starman, lambda: st.poll() is None), (p_ideal, lambda: ideal.poll() is None),
                            *([(p_uw_http, lambda: uw.poll() is None)] if uw else [])):
            wait_200(port, 60, "/", alive)
        wait_200(p_front, 60, "/", em.alive, host="hellou.localhost")
        wait_200(p_front, 60, "/", em.alive, host="hello.localhost")

        # the nginx in front: the generator's configuration of routes to all of them
        routes = [Route("ours_tcp", ("ours-tcp.bench",), f"127.0.0.1:{p_ours}"),
                  Route("ours_unix", ("ours-unix.bench",), f"unix:{em_run / 'sockets' / 'hellou.sock'}"),
                  Route("starman", ("starman.bench",), f"127.0.0.1:{p_starman}"),
                  Route("starman_ka", ("starman-ka.bench",), f"127.0.0.1:{p_starman}"),
                  Route("ideal", ("ideal.bench",), f"127.0.0.1:{p_ideal}")]
        if uw:
            routes += [Route("uwsgi_http", ("uwsgi-http.bench",), f"127.0.0.1:{p_uw_http}"),
                       Route("uwsgi_ka", ("uwsgi-ka.bench",), f"127.0.0.1:{p_uw_http}"),
                       Route("uwsgi_uwsgi", ("uwsgi-uwsgi.bench",), f"127.0.0.1:{p_uw_uwsgi}", protocol="uwsgi")]
        p_nginx = ports.get()
        fr = tmp / "bound-front"
        (fr / "nginx" / "tmp").mkdir(parents=True)
        # Starman's and uWSGI's workers serve one connection at a time and
        # wait on an idle kept one for its next request (Starman 1 s, uWSGI
        # its socket-timeout): behind nginx they get a connection a request,
        # as they are deployed; kept connections (`_ka`) only in the fairness
        # rows, nginx reloaded after each (its old workers close them)
        conf = front_conf(routes, f"127.0.0.1:{p_nginx}", fr, "self.bench",
                          close=("starman", *(("uwsgi_http",) if uw else ())),
                          uwsgi_path_info=("uwsgi_uwsgi",) if uw else ())
        (fr / "nginx.conf").write_text(conf)
        front = procs.spawn([nginx, "-p", str(fr), "-c", str(fr / "nginx.conf")], log="bound-front-nginx")
        stops.append(lambda: procs.stop_tree(front.pid))
        for r in routes:
            wait_200(p_nginx, 60, "/", lambda: front.poll() is None, host=r.domains[0])
        wait_200(p_nginx, 60, "/", lambda: front.poll() is None, host="self.bench")

        vassal_pids: dict[str, list[int]] = {"hello": [], "hellou": []}
        for p in em.under():
            try:
                title = " ".join(p.cmdline())
            except psutil.Error:
                continue
            for name in vassal_pids:
                if title.startswith(f"psgi-vassal {name} ") or title == f"psgi-vassal {name}":
                    vassal_pids[name].append(p.pid)
        em_ngx = [p.pid for p in em.under() if p.name() == "nginx" and p.ppid() != em.ps.pid]
        if not vassal_pids["hello"] or not vassal_pids["hellou"]:
            raise BenchError(f"the bench vassals' processes not found under the Emperor: {vassal_pids}")

        def g(nginx: list[int] | int, app: list[int], emperor: bool = False) -> Groups:
            """Roles of a target: nginx (fixed pids, or a master's workers
            now), the app server's processes, the Emperor."""
            roles = {"app": app, **({"emperor": [em.ps.pid]} if emperor else {})}
            if isinstance(nginx, int):
                return Under(roles, master=nginx)
            return Under({"nginx": nginx, **roles})

        ngx = front.pid

        st_pids = [c.pid for c in psutil.Process(st.pid).children(recursive=True)] + [st.pid]
        ideal_pids = _nginx_workers(ideal.pid)
        via = f"http://127.0.0.1:{p_nginx}/"
        targets = {
            "ours": Target(f"http://127.0.0.1:{p_ours}/", None, g([], vassal_pids["hello"], True)),
            "ours_tcp": Target(via, "ours-tcp.bench", g(ngx, vassal_pids["hello"], True)),
            "ours_unix": Target(via, "ours-unix.bench", g(ngx, vassal_pids["hellou"], True)),
            "ours_emperor": Target(f"http://127.0.0.1:{p_front}/", "hellou.localhost",
                                   g(em_ngx, vassal_pids["hellou"], True)),
            "starman": Target(f"http://127.0.0.1:{p_starman}/", None, g([], st_pids)),
            "ideal": Target(f"http://127.0.0.1:{p_ideal}/", None, g([], ideal_pids)),
            "self": Target(via, "self.bench", g(ngx, [])),
        }
        targets["starman_via"] = Target(via, "starman.bench", g(ngx, st_pids))
        targets["ideal_via"] = Target(via, "ideal.bench", g(ngx, ideal_pids))
        if uw:
            uw_pids = [c.pid for c in psutil.Process(uw.pid).children(recursive=True)] + [uw.pid]
            targets["uwsgi"] = Target(f"http://127.0.0.1:{p_uw_http}/", None, g([], uw_pids))
            targets["uwsgi_http"] = Target(via, "uwsgi-http.bench", g(ngx, uw_pids))
            targets["uwsgi_uwsgi"] = Target(via, "uwsgi-uwsgi.bench", g(ngx, uw_pids))
        kept = {"starman_ka": Target(via, "starman-ka.bench", g(ngx, st_pids))}
        if uw:
            kept["uwsgi_ka"] = Target(via, "uwsgi-ka.bench", g(ngx, uw_pids))

        def reload_front() -> None:
            """A reload of the nginx in front: its old workers close their
            kept connections, which frees the workers of Starman and uWSGI
            that wait on them."""
            old = set(_nginx_workers(front.pid))
            os.kill(front.pid, signal.SIGHUP)
            deadline = time.monotonic() + 30
            while old & set(_nginx_workers(front.pid)) or not _nginx_workers(front.pid):
                if time.monotonic() > deadline or front.poll() is not None:
                    raise BenchError("the nginx in front did not finish its reload within 30 s")
                time.sleep(0.01)
            for r in routes:
                wait_200(p_nginx, 30, "/", lambda: front.poll() is None, host=r.domains[0])

        for t in targets.values():  # warm-up (Starman's and uWSGI's workers too), not counted
            wrk_measured(t.url, "1s", t.groups, t.host)
        load_before = load()
        names = list(targets)
        runs: dict[str, list[dict]] = {k: [] for k in names}
        for i in range(rounds):
            for k in names if i % 2 == 0 else names[::-1]:
                t = targets[k]
                runs[k].append(wrk_measured(t.url, duration, t.groups, t.host))
        serving = {k: _summary(rs) for k, rs in runs.items()}
        for k, s in serving.items():
            say(f"  bound {k}: {s['rps'] or 0:.0f} req/s, CPU a request {s['cpu_us']}")
        ratios: dict = {}
        for key, direct in PAIRS.items():
            if key not in runs or direct not in runs:
                continue
            per_round = [a["rps"] / b["rps"] for a, b in zip(runs[key], runs[direct]) if a["rps"] and b["rps"]]
            cpu_t, cpu_d = serving[key]["cpu_us"], serving[direct]["cpu_us"]
            ratios[key] = {"through": key, "direct": direct, "ratio": _median(per_round),
                               "ratio_runs": per_round,
                               "cpu_ratio": _paid(cpu_d) / _paid(cpu_t) if _paid(cpu_t) else None,
                               "nginx_us": cpu_t.get("nginx")}
        load_mid = load()

        # fairness: fast route beside one slow client, through the same nginx
        fair_names = [k for k in ("ours_unix", "ours_tcp", "starman_via", "uwsgi_http", "uwsgi_uwsgi", *kept)
                      if k in targets or k in kept]
        fair: dict[str, list] = {k: [] for k in fair_names}
        targets.update(kept)

        def beside_slow(t: Target) -> tuple[dict, dict]:
            with ThreadPoolExecutor(2) as pool:
                slow = pool.submit(_wrk_full, p_nginx, duration, t.host, 1, "/slow")
                fast = pool.submit(wrk_measured, t.url, duration, t.groups, t.host)
                return fast.result(), slow.result()

        for i in range(rounds):
            for k in fair_names if i % 2 == 0 else fair_names[::-1]:
                fair[k].append(beside_slow(targets[k]))
                if k in kept:
                    reload_front()
        fairness = {k: {"fast": _median_run([f for f, _ in v]), "slow": _median_run([s for _, s in v])}
                    for k, v in fair.items()}
        for v in fairness.values():
            v["ratio"] = v["fast"]["ratio"]
        return {"rounds": rounds, "duration": duration, "load_before": load_before, "load_mid": load_mid,
                "load_after": load(), "uptime": open("/proc/loadavg").read().strip(),
                "uwsgi21": uwsgi or why_not, "serving": serving, "ratios": ratios, "fairness": fairness,
                "runs": runs, "nginx_conf": conf, "command": shlex.join(em.argv)}
    finally:
        for stop in reversed(stops):
            try:
                stop()
            except Exception:  # noqa: BLE001 - stop the others anyway
                pass
        rmtree(vdir)


def _cpu(cpu: dict) -> str:
    return ", ".join(f"{k} {cpu[k]:.1f}" for k in ("wrk", "nginx", "app", "emperor") if cpu.get(k))


def rows(b: dict) -> list[tuple[str, str, str, str]]:
    """The report's rows of the step (front.rows)."""
    out = []
    sv = b.get("serving") or {}
    head = f"{b['rounds']} interleaved rounds of {b['duration']}; load {b['load_before']} -> {b['load_after']}"
    for k, s in sv.items():
        if s.get("rps") is None:
            out.append((f"bound: {LABELS.get(k, k)}", f"no rate (wrk: {s.get('output') or '?'})", "", ""))
            continue
        label = LABELS.get(k, k)
        out.append((f"bound: hello world, wrk -t2 -c16: {label}",
                    f"{s['rps']:.0f} req/s, p50 {s['p50_ms']:.2f} p99 {s['p99_ms']:.2f} ms; CPU a request (us) "
                    f"{_cpu(s['cpu_us'])}; others' cores {s['cores_others']:.2f}", "", ""))
    for k, r in (b.get("ratios") or {}).items():
        if r.get("ratio") is None:
            continue
        runs = ", ".join(f"{x:.2f}" for x in r["ratio_runs"])
        target = k.startswith("ours")
        out.append((f"bound: through / direct, {LABELS.get(k, k)} ({head})",
                    f"{r['ratio']:.2f} (rounds {runs}); the CPU a request predicts {r['cpu_ratio'] or 0:.2f}",
                    ">= 0.80" if target else "", ("met" if r["ratio"] >= 0.8 else "**not met**") if target else ""))
    for k, f in (b.get("fairness") or {}).items():
        fa = f["fast"]
        if f.get("ratio") is None:
            continue
        xs = " ".join(f"{x:.1f}" for x in fa["ratio_runs"] if x is not None)
        target = k.startswith("ours")
        out.append((f"bound: wrk -c16 on the fast route beside wrk -c1 on /slow (100 ms), "
                    f"{LABELS.get(k, k)}: p99 / p50",
                    f"{fa['p99_ms']:.2f} / {fa['p50_ms']:.2f} ms ({f['ratio']:.1f}x; rounds {xs}); "
                    f"{fa['requests']} fast, {f['slow']['requests']} slow requests",
                    "<= 3x" if target else "", ("met" if f["ratio"] <= 3 else "**not met**") if target else ""))
    return out
