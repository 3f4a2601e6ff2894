"""Adoption latency: one adoption at a time from a base vassal, to the
vassal's first 200 (scenario `adoption`)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import psutil

from basevassal import Base, stop_adopted
from benchlib import BenchError, Ports, Procs, http_get, summary, wait_200
from settings import APPS, Bench, say


BOUND = "heavy, early-warmup /, socket bound by the requester"


def bound_listener(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:port, as the Emperor binds a vassal's
    http-socket before it starts the vassal (psgi_forkserver/sockets.py)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(128)
    return s


def adoption_latency(procs: Procs, ports: Ports, tmp: Path, app: str, n: int, path: str = "/",
                     base_extra: tuple[str, ...] = (), bound: bool = False,
                     vassal_extra: tuple[str, ...] = ()) -> dict:
    """n adoptions, one at a time: pid reply and first 200 on `path`. The
    vassal binds its http-socket and the client polls it; or, `bound`, the
    socket is bound here and passed as descriptor 0 (as `emperor run` does)
    and one connection, made right after the pid reply, waits in its backlog."""
    say(f"adoption latency, {app}{' ' + ' '.join(base_extra) if base_extra else ''}: base + {n} adoptions, GET {path}")
    base = Base(procs, APPS[app], tmp / f"fs-{app}.sock", f"base-{app}", base_extra)
    spares = base.spares()
    pid_ms, first_ms = [], []
    by_spare = 0
    try:
        for i in range(n):
            port = ports.get()
            # the steady state: the pool refilled since the last adoption
            waiting = base.wait_spares(spares) if spares else set()
            listener = bound_listener(port) if bound else None
            try:
                pid, pipe, t0, t_pid = base.adopt(["--http-socket", f"127.0.0.1:{port}", "--processes", "1",
                                                   *vassal_extra], listener)
            finally:
                if listener is not None:
                    listener.close()  # the vassal holds it now
            by_spare += pid in waiting
            try:
                if bound:
                    if http_get(port, path, timeout=30) != 200:
                        raise BenchError(f"no 200 from the vassal on port {port} (bound socket)")
                    t200 = time.perf_counter()
                else:
                    t200 = wait_200(port, 30, path=path, alive=lambda: psutil.pid_exists(pid))
            finally:
                stop_adopted(procs, pid, pipe)
            pid_ms.append((t_pid - t0) * 1000)
            first_ms.append((t200 - t0) * 1000)
    finally:
        base.stop()
    r = {"path": path, "bound": bound, "base_ready_s": base.ready_s, "pid_reply_ms": summary(pid_ms),
         "first_200_ms": summary(first_ms),
         "samples_first_200_ms": first_ms, "samples_pid_reply_ms": pid_ms, "spares": spares, "by_spare": by_spare}
    say(f"  first 200 p50 {r['first_200_ms']['p50']:.2f} ms, p99 {r['first_200_ms']['p99']:.2f} ms; "
        f"pid reply p50 {r['pid_reply_ms']['p50']:.2f} ms")
    return r


def run(b: Bench) -> None:
    """Scenario `adoption`: the fork path (no spares) on the heavy app's `/`,
    on its `/hello` (which answers without the app's work: the server's cost
    apart from the first real page's), with the base's opt-in warm-up of `/`
    (early-warmup: the app's lazy state built once, in the base), and the
    hello app."""
    nosp = ("--fork-server-spares", "0")
    adoption_rows(b, [("heavy", "heavy", "/", nosp), ("heavy /hello", "heavy", "/hello", nosp),
                      ("heavy, base with early-warmup /", "heavy", "/", ("--early-warmup", "/", *nosp)),
                      ("hello", "hello", "/", nosp)])


def adoption_rows(b: Bench, rows: list[tuple[str, str, str, tuple[str, ...]]]) -> None:
    """results["adoption"][key] for each (key, app, path, base's extra arguments)."""
    out = b.results.setdefault("adoption", {})
    for key, app, path, extra in rows:
        x = b.step(f"adoption {key}",
                   lambda: adoption_latency(b.procs, b.ports, b.tmp, app, b.sizes.adoptions, path, extra,
                                            bound=key.startswith(BOUND)))
        if x:
            out[key] = x
