"""Cold starts of ours, Starman and uWSGI 2.0, and one cold app's memory
(scenario `cold`)."""

from __future__ import annotations

import os
import shlex
import signal
import time

from benchlib import Ports, Procs, http_get, pss_of, summary, wait_200
from settings import APPS, Bench, PROGRAM, say


def cold_argv(server: str, app: str, port: int) -> tuple[list[str], int]:
    """argv and the signal that stops it."""
    addr = f"127.0.0.1:{port}"
    if server == "ours":
        return ["perl", PROGRAM, "--psgi", APPS[app], "--http-socket", addr], signal.SIGTERM
    if server == "starman":
        return ["starman", "--workers", "1", "--listen", addr, APPS[app]], signal.SIGTERM
    if server == "uwsgi":
        # uWSGI 2.0: SIGTERM means reload; SIGINT stops
        return ["uwsgi", "--plugin", "psgi", "--psgi", APPS[app], "--http-socket", addr,
                "--processes", "1"], signal.SIGINT
    raise ValueError(server)


def cold_starts(procs: Procs, ports: Ports, app: str, n: int) -> dict:
    say(f"cold starts, {app}: {n} each of ours, starman, uwsgi")
    res: dict = {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("UWSGI_")}
    for server in ("ours", "starman", "uwsgi"):
        xs = []
        for i in range(n):
            port = ports.get()
            argv, stop_sig = cold_argv(server, app, port)
            t0 = time.perf_counter()
            p = procs.spawn(argv, log=f"cold-{server}-{app}", env=env)
            try:
                t200 = wait_200(port, 60, alive=lambda: p.poll() is None)
            finally:
                procs.stop_tree(p.pid, stop_sig, 10)
            xs.append((t200 - t0) * 1000)
        res[server] = {**summary(xs), "samples_ms": xs, "command": shlex.join(cold_argv(server, app, 0)[0])}
        say(f"  {server}: p50 {res[server]['p50']:.0f} ms")
    return res


def cold_pss(procs: Procs, ports: Ports, app: str) -> dict:
    """PSS of one cold-started app: our vassal program, master + 1 worker."""
    port = ports.get()
    argv = ["perl", PROGRAM, "--psgi", APPS[app], "--http-socket", f"127.0.0.1:{port}", "--processes", "1"]
    p = procs.spawn(argv, log=f"cold-pss-{app}")
    try:
        wait_200(port, 60, alive=lambda: p.poll() is None)
        time.sleep(0.5)
        http_get(port)
        tree = procs.tree(p.pid)
        pss, uss, count = pss_of(tree)
    finally:
        procs.stop_tree(p.pid, signal.SIGTERM, 10)
    return {"pss_bytes": pss, "uss_bytes": uss, "processes": count, "command": shlex.join(argv)}


def run(b: Bench) -> None:
    """Scenario `cold`."""
    b.results["cold"] = {}
    for app in ("heavy", "hello"):
        x = b.step(f"cold {app}", lambda: cold_starts(b.procs, b.ports, app, b.sizes.colds))
        if x:
            b.results["cold"][app] = x
