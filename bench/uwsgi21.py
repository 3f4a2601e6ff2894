"""uWSGI 2.1's fork server side by side with ours (scenario `uwsgi21`)."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

from psgi_forkserver import adoption
from basevassal import Base, stop_adopted
from adoptions import bound_listener
from benchlib import BenchError, Ports, Procs, http_get, summary, wait_200
from settings import APPS, Bench, say


UWSGI21_ENV = "UWSGI21"
BOUND_KEY = "spares, base with early-warmup /, socket bound by the requester"


def uwsgi21_binary() -> tuple[str | None, str]:
    """The uWSGI 2.1 binary named by $UWSGI21, or None and why not."""
    path = os.environ.get(UWSGI21_ENV)
    if not path:
        return None, f"{UWSGI21_ENV} not set (a uWSGI 2.1 binary built with its psgi profile; Debian ships 2.0)"
    if not os.access(path, os.X_OK):
        return None, f"{UWSGI21_ENV}={path} is not an executable file"
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{UWSGI21_ENV}={path}: --version failed ({e})"
    if not version.startswith("2.1"):
        return None, f"{UWSGI21_ENV}={path} is uWSGI {version or '?'}, not 2.1 (only 2.1 has the fork server)"
    return path, version


class Uwsgi21:
    """uWSGI 2.1's Emperor with its fork server: a base vassal preloading the
    heavy app (`--emperor-use-fork-server`, the base itself started by plain
    fork through `--vassal-fork-base`), and adoptions from it as its Emperor
    makes them (uwsgi packet 35, the argv array, the vassal's Emperor pipe by
    SCM_RIGHTS), by the same client as ours."""

    # uWSGI's vassals run with a master: it is the process that reads the
    # Emperor pipe (end of file: stop), as under its Emperor
    VASSAL_ARGS = ["--master", "--processes", "1", "--http-socket"]

    def __init__(self, procs: Procs, tmp: Path, binary: str) -> None:
        self.procs, self.binary = procs, binary
        vdir = tmp / "uwsgi21-vassals"
        vdir.mkdir()
        self.sock = tmp / "uwsgi21-fork.sock"
        (vdir / "base.ini").write_text(f"[uwsgi]\nearly-psgi = {APPS['heavy']}\nfork-server = {self.sock}\n")
        argv = [binary, "--emperor", str(vdir), "--emperor-use-fork-server", str(self.sock),
                "--vassal-fork-base", "base.ini"]
        self.command = shlex.join(argv)
        self.vassal_argv = shlex.join([binary, *self.VASSAL_ARGS, "127.0.0.1:PORT"])
        t0 = time.perf_counter()
        self.em = procs.spawn(argv, log="uwsgi21-emperor")
        try:
            deadline = time.perf_counter() + 120
            while not adoption.probe(self.sock):
                if self.em.poll() is not None:
                    raise BenchError(f"uWSGI 2.1 Emperor exited ({self.em.returncode}) before its fork server listened")
                if time.perf_counter() > deadline:
                    raise BenchError("uWSGI 2.1's fork server did not listen within 120 s")
                time.sleep(0.005)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.perf_counter() - t0

    def adopt(self, ports: Ports) -> tuple[float, float]:
        """One adoption: seconds to the pid reply and to the first 200 on `/`
        (the vassal binds its own http-socket: the client polls it)."""
        port = ports.get()
        ours, theirs = socket.socketpair()
        a0 = time.perf_counter()
        try:
            pid = adoption.adopt(self.sock, [self.binary, *self.VASSAL_ARGS, f"127.0.0.1:{port}"], theirs.fileno())
        except adoption.AdoptionError as e:
            raise BenchError(f"uWSGI 2.1 fork server: {e}") from None
        finally:
            theirs.close()
        a_pid = time.perf_counter()
        self.procs.adopted(pid)
        try:
            t200 = wait_200(port, 30, alive=lambda: psutil.pid_exists(pid))
        finally:
            stop_adopted(self.procs, pid, ours)
        return a_pid - a0, t200 - a0

    def stop(self) -> None:
        self.procs.stop_tree(self.em.pid, signal.SIGINT, 15)  # uWSGI: SIGINT stops, SIGTERM reloads


def uwsgi21_side_by_side(procs: Procs, ports: Ports, tmp: Path, n: int) -> dict:
    """Adoption -> first 200 on the heavy app's `/`, one adoption at a time,
    n samples each, interleaved in one run (each round takes one sample of
    every server, the order rotated from round to round, so a drifting load
    on a shared machine falls on all alike): uWSGI 2.1's fork server (a base
    vassal of uWSGI 2.1's Emperor, `--emperor-use-fork-server`, the base
    itself started by plain fork through `--vassal-fork-base`) against our
    fork path and our warm spares. The adoption request to uWSGI's base is
    the one its Emperor sends (uwsgi packet 35, the argv array, the vassal's
    Emperor pipe by SCM_RIGHTS), made by the same client and timed the same
    way as our adoption rows; the Emperor's own directory scan (once a
    second at best) is left out, as it is not the fork server's cost."""
    binary, why = uwsgi21_binary()
    if binary is None:
        say(f"uwsgi21: skipped: {why}")
        return {"skipped": why}
    res: dict = {"binary": binary, "version": why, "n": n, "loadavg_before": os.getloadavg()}
    say(f"uwsgi21: {binary} ({why}), {n} rounds; load average {' '.join(f'{x:.2f}' for x in res['loadavg_before'])}")
    sp = ("--fork-server-spares", "2")
    # preload-learned is on by default: each base loads what its first
    # vassals required lazily, so its first adoption is reported apart
    # (first_adoption_first_200_ms) and the fork path is also run without it
    ours_extra = {"fork path": ("--fork-server-spares", "0"),
                  "fork path, preload-learned = false": ("--fork-server-spares", "0", "--preload-learned", "false"),
                  "spares": sp,
                  "spares, base with early-warmup /": ("--early-warmup", "/", *sp)}
    samples: dict[str, dict[str, list[float]]] = {
        k: {"pid": [], "first": []} for k in ("uwsgi21", *ours_extra, BOUND_KEY)}
    by_spare = dict.fromkeys((*ours_extra, BOUND_KEY), 0)
    em = None
    bases: dict[str, Base] = {}
    try:
        em = Uwsgi21(procs, tmp, binary)
        res["command"], res["vassal_argv"], res["uwsgi21_base_ready_s"] = em.command, em.vassal_argv, em.ready_s
        for i, (key, extra) in enumerate(ours_extra.items()):
            bases[key] = Base(procs, APPS["heavy"], tmp / f"fs-side{i}.sock", f"base-side{i}", extra)

        def uwsgi_one() -> tuple[float, float, bool]:
            return (*em.adopt(ports), False)

        def ours_one(base: Base, bound: bool = False) -> tuple[float, float, bool]:
            port = ports.get()
            k = base.spares()
            waiting = base.wait_spares(k) if k else set()  # the steady state: the pool refilled
            listener = bound_listener(port) if bound else None
            try:
                pid, pipe, a0, a_pid = base.adopt(["--http-socket", f"127.0.0.1:{port}", "--processes", "1"],
                                                  listener)
            finally:
                if listener is not None:
                    listener.close()  # the vassal holds it now
            try:
                if bound:  # one connection, waiting in the backlog: no polling
                    if http_get(port, "/", timeout=30) != 200:
                        raise BenchError(f"no 200 from the vassal on port {port} (bound socket)")
                    t200 = time.perf_counter()
                else:
                    t200 = wait_200(port, 30, alive=lambda: psutil.pid_exists(pid))
            finally:
                stop_adopted(procs, pid, pipe)
            return a_pid - a0, t200 - a0, pid in waiting

        runs = {"uwsgi21": uwsgi_one, **{k: (lambda b=b: ours_one(b)) for k, b in bases.items()}}
        # as `emperor run` adopts: the socket bound by the requester and passed
        # (descriptor 0), the client's connection waiting in its backlog
        runs[BOUND_KEY] = lambda: ours_one(bases["spares, base with early-warmup /"], bound=True)
        order = list(runs)
        for i in range(n):
            for key in order[i % len(order):] + order[:i % len(order)]:
                t_pid, t200, spare = runs[key]()
                samples[key]["pid"].append(t_pid * 1000)
                samples[key]["first"].append(t200 * 1000)
                if key in by_spare:
                    by_spare[key] += spare
    finally:
        for base in bases.values():
            base.stop()
        if em is not None:
            em.stop()
    for key, x in samples.items():
        res[key] = {"pid_reply_ms": summary(x["pid"]), "first_200_ms": summary(x["first"]),
                    "samples_first_200_ms": x["first"],
                    # the base's first adoption: nothing learned yet (included in the summary too)
                    "first_adoption_first_200_ms": x["first"][0] if x["first"] else None}
    u50 = res["uwsgi21"]["first_200_ms"]["p50"]
    for key in (*ours_extra, BOUND_KEY):
        res[key]["by_spare"] = by_spare[key]
        res[key]["ratio"] = res[key]["first_200_ms"]["p50"] / u50
    res["loadavg_after"] = os.getloadavg()
    for key in samples:
        f = res[key]["first_200_ms"]
        say(f"  {key}: first 200 p50 {f['p50']:.2f} ms, p99 {f['p99']:.2f} ms; "
            f"pid reply p50 {res[key]['pid_reply_ms']['p50']:.2f} ms"
            + (f" ({res[key]['ratio']:.2f}x uWSGI 2.1)" if key != "uwsgi21" else "")
            + f"; first adoption {res[key]['first_adoption_first_200_ms']:.2f} ms")
    say(f"  load average after {' '.join(f'{x:.2f}' for x in res['loadavg_after'])}")
    return res


def run(b: Bench) -> None:
    """Scenario `uwsgi21`."""
    b.results["uwsgi21"] = b.step("uwsgi21", lambda: uwsgi21_side_by_side(b.procs, b.ports, b.tmp, b.sizes.adoptions))
