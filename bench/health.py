"""The status server under load: does /healthz still answer at once?

An Emperor with N adopted vassals and --status-http; wrk keeps C
connections busy on the status page and /metrics (half each) for a bounded
time, while one client asks /healthz every 50 ms on a new connection and
times each answer. Figures: /healthz latency idle and under load (p50 / p99
/ max), the Emperor's CPU while loaded, what wrk got from / and /metrics.
Loopback only.
"""

from __future__ import annotations

import http.client
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from benchlib import rmtree, summary

VASSALS = 40
CLIENTS = 200
PROBE_EVERY = 0.05


def healthz_ms(port: int, timeout: float = 10.0) -> float:
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", "/healthz")
        r = c.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"/healthz answered {r.status}")
    finally:
        c.close()
    return (time.perf_counter() - t0) * 1000


def probe(port: int, seconds: float) -> list[float]:
    out = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        out.append(healthz_ms(port))
        time.sleep(PROBE_EVERY)
    return out


def wrk(port: int, path: str, conns: int, seconds: int) -> subprocess.Popen:
    return subprocess.Popen(["wrk", "-t", "1", "-c", str(conns), "-d", f"{seconds}s",
                             "--timeout", "10s", f"http://127.0.0.1:{port}{path}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def requests_per_s(text: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    return None


def run(procs, ports, tmp: Path, emperor_run, base_ini: Callable[[str, Path], str],
        vassal_ini: Callable[[str, int], str], wait_loyal_count, say,
        seconds: int = 10, vassals: int = VASSALS, clients: int = CLIENTS) -> dict[str, Any]:
    say(f"status under load: {vassals} vassals, {clients} clients on / and /metrics, {seconds} s")
    vdir = tmp / "health"
    vdir.mkdir()
    sock = tmp / "health.sock"
    stats = tmp / "health-stats.sock"
    (vdir / "base.ini").write_text(base_ini("hello", sock))
    for i in range(vassals):
        (vdir / f"h{i:02d}.ini").write_text(vassal_ini(f"h{i:02d}", ports.get()))
    port = ports.get()
    em = emperor_run(procs, vdir, "emperor-health",
                     ["--stats", str(stats), "--status-http", f"127.0.0.1:{port}"])
    res: dict[str, Any] = {"vassals": vassals, "clients": clients, "seconds": seconds}
    try:
        deadline = time.perf_counter() + 30
        while not stats.exists():
            if time.perf_counter() > deadline or not em.alive():
                raise RuntimeError(f"no stats socket {stats} after 30 s")
            time.sleep(0.05)
        wait_loyal_count(stats, vassals, em)
        idle = probe(port, 2.0)
        res["idle_ms"] = summary(idle)
        me = psutil.Process(em.proc.pid)
        cpu0 = me.cpu_times()
        t0 = time.perf_counter()
        loads = [wrk(port, "/", clients // 2, seconds), wrk(port, "/metrics", clients - clients // 2, seconds)]
        loaded: list[float] = []
        prober = threading.Thread(target=lambda: loaded.extend(probe(port, seconds - 1)))
        time.sleep(0.5)  # the load is on
        prober.start()
        outs = [p.communicate(timeout=seconds + 60)[0] for p in loads]
        prober.join(seconds + 60)
        wall = time.perf_counter() - t0
        cpu1 = me.cpu_times()
        res["loaded_ms"] = summary(loaded)
        res["emperor_cpu_percent"] = round(100 * ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / wall, 1)
        res["page_rps"] = requests_per_s(outs[0])
        res["metrics_rps"] = requests_per_s(outs[1])
        say(f"  /healthz idle p50 {res['idle_ms']['p50']:.1f} ms; loaded p50 {res['loaded_ms']['p50']:.1f} "
            f"/ p99 {res['loaded_ms']['p99']:.1f} / max {res['loaded_ms']['max']:.1f} ms; "
            f"emperor CPU {res['emperor_cpu_percent']} %; page {res['page_rps']} req/s, "
            f"metrics {res['metrics_rps']} req/s")
    finally:
        res["stop_s"] = em.stop()
        rmtree(vdir)
    return res


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    if not r or "loaded_ms" not in r:
        return []
    lo, idle = r["loaded_ms"], r["idle_ms"]
    return [(f"/healthz with {r['clients']} clients on the status page and /metrics, "
             f"{r['vassals']} vassals: p50 / p99 / max (idle p50)",
             f"{lo['p50']:.1f} / {lo['p99']:.1f} / {lo['max']:.1f} ms ({idle['p50']:.1f} ms)",
             "2 s (probe timeout)", "met" if lo["max"] < 2000 else "NOT met"),
            (f"status under that load: Emperor CPU, status page / metrics served",
             f"{r['emperor_cpu_percent']} %, {r['page_rps']} / {r['metrics_rps']} req/s", "", "")]
