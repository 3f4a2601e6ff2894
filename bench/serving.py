"""Serving: an adopted vassal against Starman under wrk, fairness among
keep-alive connections, behind nginx, and the access log's cost
(scenario `serving`)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from psgi_forkserver import adoption
from basevassal import Base, stop_adopted, wait_loyal
from benchlib import BenchError, Ports, Procs, wait_200
from settings import APPS, Bench, HERE, PROGRAM, ROOT, say


def _wrk_ms(text: str) -> float:
    """wrk's latency figures ("812.00us", "1.20ms", "2.01s") in ms."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(2)]


def run_wrk(port: int, duration: str, path: str = "/", threads: int = 2, latency: bool = False) -> dict:
    argv = ["wrk", f"-t{threads}", "-c16", f"-d{duration}", *(["--latency"] if latency else []),
            f"http://127.0.0.1:{port}{path}"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    out = r.stdout
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    errors = re.search(r"Socket errors:.*", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    res = {
        "rps": float(m.group(1)) if m else None,
        "socket_errors": errors.group(0) if errors else None,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "command": shlex.join(argv),
        "output": out if not m else None,
    }
    if latency:
        for pct in ("50", "99"):
            lm = re.search(rf"^\s*{pct}(?:\.000)?%\s+(\S+)", out, re.M)
            res[f"p{pct}_ms"] = _wrk_ms(lm.group(1)) if lm else None
    return res


def conn_spread(port: int, conns: int, seconds: float) -> dict:
    """`conns` keep-alive connections, each sending GET / as soon as its
    previous response is complete, for `seconds`: responses per connection
    (wrk does not report them). One thread, non-blocking sockets."""
    import selectors
    sel = selectors.DefaultSelector()
    req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    state = {}
    for i in range(conns):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setblocking(False)
        s.sendall(req)
        state[s] = {"i": i, "buf": b"", "n": 0}
        sel.register(s, selectors.EVENT_READ)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            for key, _ in sel.select(timeout=0.1):
                s = key.fileobj
                st = state[s]
                data = s.recv(65536)
                if not data:
                    raise BenchError(f"connection {st['i']} closed by the server")
                st["buf"] += data
                while True:
                    head_end = st["buf"].find(b"\r\n\r\n")
                    if head_end < 0:
                        break
                    m = re.search(rb"(?i)content-length:\s*(\d+)", st["buf"][:head_end])
                    total = head_end + 4 + (int(m.group(1)) if m else 0)
                    if len(st["buf"]) < total:
                        break
                    st["buf"] = st["buf"][total:]
                    st["n"] += 1
                    s.sendall(req)
    finally:
        for s in state:
            sel.unregister(s)
            s.close()
    counts = sorted(st["n"] for st in state.values())
    return {"connections": conns, "seconds": seconds, "min": counts[0], "max": counts[-1],
            "counts": counts}


def behind_nginx(procs: Procs, ports: Ports, tmp: Path, upstream: int, duration: str, name: str) -> dict:
    """wrk -t1 -c16 --latency through nginx (one process) with upstream
    keep-alive to `upstream`: how a real deployment's pooled connections
    are shared among the workers."""
    port = ports.get()
    d = tmp / f"nginx-{name}"
    d.mkdir()
    conf = d / "nginx.conf"
    conf.write_text(f"""daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream app {{ server 127.0.0.1:{upstream}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")
    p = procs.spawn(["nginx", "-p", str(d), "-c", str(conf)], log=f"nginx-{name}")
    try:
        wait_200(port, 20, alive=lambda: p.poll() is None)
        run_wrk(port, "1s")  # warm-up: nginx fills its upstream pool
        return run_wrk(port, duration, threads=1, latency=True)
    finally:
        procs.stop_tree(p.pid, signal.SIGTERM, 10)


# The Emperor's reader of vassal output (psgi_forkserver/logs.py), alone in
# a process as in the Emperor: reads the pipe on its stdin, timestamps and
# names each line, appends it to argv[1].
RELAY = """
import selectors, sys
from pathlib import Path
from psgi_forkserver import logs
log = logs.Log(path=Path(sys.argv[1]))
sel = selectors.DefaultSelector()
relay = logs.Relay(log, sel)
relay.watch(logs.OutputPipe(rfd=0), "hello", lambda: None)
while relay.pipes:
    for key, _ in sel.select():
        key.data(0.0)
"""


def logging_cost(procs: Procs, ports: Ports, tmp: Path, base: "Base", duration: str) -> dict:
    """The hello app with its access log on (one line a request), its output
    (a) a pipe the Emperor's reader relays (RELAY), (b) an O_APPEND file the
    vassal writes itself (what a vassal prefixing its own lines costs,
    without the prefix), (c) no access log. The output descriptor rides with
    the config packet, as the Emperor sends it. Two rounds, the second in
    the reverse order (a loaded machine drifts): each mode's best counts."""
    from psgi_forkserver import launch

    res: dict = {}
    order = ("relayed", "file", "off")
    for i, mode in enumerate(order + order[::-1]):
        port = ports.get()
        out_path = tmp / f"serve-log-{mode}.log"
        relay = None
        if mode == "relayed":
            r, w = os.pipe()
            relay = subprocess.Popen([sys.executable, "-c", RELAY, str(out_path)], stdin=r,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
            procs.popens[relay.pid] = relay
            procs.known.add(relay.pid)
            os.close(r)
            out_fd = w
        else:
            out_fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        text = f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 2\nname = hello\n"
        if mode == "off":
            text += "disable-logging = true\n"
        ours, theirs = socket.socketpair()
        cours, ctheirs = socket.socketpair()
        try:
            pid = adoption.adopt(base.sock, [PROGRAM], theirs.fileno(), config_fd=ctheirs.fileno())
            procs.adopted(pid)
            launch.send_config(cours, text.encode(), output_fd=out_fd)
        finally:
            theirs.close()
            ctheirs.close()
            os.close(out_fd)
        try:
            wait_200(port, 30)
            wait_loyal(ours, 10)
            run_wrk(port, "1s")  # warm-up, not counted
            got = run_wrk(port, duration)
            if relay is not None:  # the reader's CPU, less swayed by the load than req/s
                t = psutil.Process(relay.pid).cpu_times()
                got["relay_cpu_s"] = t.user + t.system
        finally:
            stop_adopted(procs, pid, ours)
            cours.close()
            if relay is not None:
                relay.wait(20)  # the pipe's end: every vassal process is gone
        lines = out_path.read_text(errors="replace").count("\n") if out_path.exists() else 0
        out_path.unlink(missing_ok=True)
        got["log_lines"] = lines
        if "relay_cpu_s" in got and lines:
            got["relay_cpu_us_per_line"] = round(got["relay_cpu_s"] / lines * 1e6, 2)
        cpu = (f", reader {got['relay_cpu_us_per_line']} us CPU a line"
               if "relay_cpu_us_per_line" in got else "")
        say(f"  access log {mode} (round {i // 3 + 1}): {got['rps']} req/s, {lines} lines{cpu}")
        res.setdefault(f"{mode}_runs", []).append(got)
        if mode not in res or (got["rps"] or 0) > (res[mode]["rps"] or 0):
            res[mode] = got
    return res


def request_path(app: str, n: int) -> dict:
    """CPU time of one worker's request path in process (bench/request_path.pl),
    access log off and on: the server's own cost, no network, no select loop."""
    res: dict = {}
    for label, extra in (("no_log", []), ("log", ["--log"])):
        out = subprocess.run(["perl", "-I", str(ROOT / "perl"), str(HERE / "request_path.pl"), APPS[app],
                              "--n", str(n), *extra], capture_output=True, text=True, timeout=300)
        m = re.search(r"us_per_request=([\d.]+)", out.stdout)
        res[label] = float(m.group(1)) if m else None
    res["n"] = n
    return res


def serving(procs: Procs, ports: Ports, tmp: Path, app: str, duration: str) -> dict:
    say(f"serving, {app}: adopted vassal (2 workers) vs starman --workers 2, wrk -d{duration}")
    res: dict = {}
    if app == "hello":
        res["request_path"] = request_path(app, 20000 if duration.rstrip("s") in ("1", "2", "3") else 100000)
    # ours: one adopted vassal with 2 workers, access log off (Starman's
    # default, 'deployment' environment, logs nothing either)
    base = Base(procs, APPS[app], tmp / f"fs-serve-{app}.sock", f"base-serve-{app}")
    try:
        port = ports.get()
        pid, pipe, _, _ = base.adopt(
            ["--http-socket", f"127.0.0.1:{port}", "--processes", "2", "--disable-logging"])
        try:
            wait_200(port, 30)
            wait_loyal(pipe, 10)
            run_wrk(port, "1s")  # warm-up, not counted
            res["adopted"] = run_wrk(port, duration)
            if app == "hello":
                # fairness: 16 keep-alive connections on 2 workers
                res["fair_adopted"] = run_wrk(port, duration, threads=1, latency=True)
                res["spread_adopted"] = conn_spread(port, 16, float(duration.rstrip("s")))
                res["nginx_adopted"] = behind_nginx(procs, ports, tmp, port, duration, "adopted")
        finally:
            stop_adopted(procs, pid, pipe)
        if app == "hello":
            res["logging"] = logging_cost(procs, ports, tmp, base, duration)
    finally:
        base.stop()
    port = ports.get()
    p = procs.spawn(["starman", "--workers", "2", "--listen", f"127.0.0.1:{port}", APPS[app]],
                    log=f"starman-serve-{app}")
    try:
        wait_200(port, 60, alive=lambda: p.poll() is None)
        # without --preload-app each Starman worker compiles the app on its
        # first request: the warm-up gets both workers past that
        run_wrk(port, "2s")
        res["starman"] = run_wrk(port, duration)
        if app == "hello":
            res["fair_starman"] = run_wrk(port, duration, threads=1, latency=True)
            res["spread_starman"] = conn_spread(port, 16, float(duration.rstrip("s")))
            res["nginx_starman"] = behind_nginx(procs, ports, tmp, port, duration, "starman")
    finally:
        procs.stop_tree(p.pid, signal.SIGTERM, 10)
    a, s = res["adopted"]["rps"], res["starman"]["rps"]
    res["ratio"] = a / s if a and s else None
    say(f"  adopted {a} req/s, starman {s} req/s")
    return res


def run(b: Bench) -> None:
    """Scenario `serving`."""
    b.results["serving"] = {}
    for app in ("hello", "heavy"):
        x = b.step(f"serving {app}", lambda: serving(b.procs, b.ports, b.tmp, app, b.sizes.wrk_duration))
        if x:
            b.results["serving"][app] = x
