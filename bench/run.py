#!/usr/bin/env python3
"""psgi-forkserver benchmarks: adoption speed and memory against cold starts
and Starman, in one run, one process tree.

usage: bench/run.py --quick | --full [--only SCENARIO,...] [--results DIR]

See bench/README.md for what each figure is and how it is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from benchlib import (  # noqa: E402
    BenchError,
    Ports,
    Procs,
    http_get,
    machine_info,
    pss_of,
    rmtree,
    set_child_subreaper,
    summary,
    tempdir,
    wait_200,
    wait_all_200,
)
from psgi_forkserver import adoption  # noqa: E402  (the product's fork-server client)
import front as frontbench  # noqa: E402  (bench/front.py)
import health as healthbench  # noqa: E402  (bench/health.py)
from psgi_forkserver.procfs import spare_of  # noqa: E402

PROGRAM = str(ROOT / "perl" / "ForkServer.pm")
APPS = {"heavy": str(HERE / "heavy.psgi"), "hello": str(HERE / "hello.psgi")}
EMPEROR = str(ROOT / ".venv" / "bin" / "emperor")
MB = 1024 * 1024

SCENARIOS = ("adoption", "spares", "serving", "cold", "fleet", "mass", "thousand", "deploy", "prove",
             "plack", "front", "templates", "health", "uwsgi21")


@dataclass
class Sizes:
    adoptions: int
    colds: int
    reactions: int
    fleet: tuple[int, ...]
    mass: int
    idle_seconds: float
    wrk_duration: str
    deploy: int = 20
    prove_files: int = 40
    thousand: int = 1000  # adopted vassals, the Emperor started with a soft RLIMIT_NOFILE of 1,024


QUICK = Sizes(adoptions=20, colds=3, reactions=10, fleet=(10, 50), mass=50, idle_seconds=3, wrk_duration="3s",
              deploy=10, prove_files=10, thousand=300)
FULL = Sizes(adoptions=50, colds=10, reactions=10, fleet=(10, 50, 200), mass=200, idle_seconds=10, wrk_duration="10s")

TARGETS = {
    "adoption_p50_ms": 10.0,
    "cold_over_adoption": 100.0,
    "marginal_pss_mb": 3.0,
    "mass_start_s": 3.0,
    "thousand_start_s": 5.0,
    "emperor_cpu_pct": 1.0,
    "serving_ratio": 0.90,
    "prove_over_emperor": 10.0,
    "yath_over_emperor": 3.0,
    "spare_first_200_ms": 2.0,
    "fork_path_over_uwsgi21": 0.5,  # adoption -> first 200, heavy /, p50 ratio in one run
    "spares_over_uwsgi21": 0.1,  # adoption by a warm spare, early-warmup = /
    "spare_pid_reply_ms": 1.0,
}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- a base vassal of our own (no Emperor) ---------------------------------------------


class Base:
    """`ForkServer.pm --early-psgi APP --fork-server SOCK` with an Emperor pipe."""

    def __init__(self, procs: Procs, app: str, sock: Path, log: str, extra: tuple[str, ...] = ()) -> None:
        self.procs, self.sock, self.extra = procs, sock, extra
        self.pipe, theirs = socket.socketpair()
        env = {**os.environ, "UWSGI_EMPEROR_FD": str(theirs.fileno())}
        env.pop("UWSGI_EMPEROR_FD_CONFIG", None)
        t0 = time.perf_counter()
        self.proc = procs.spawn(
            ["perl", PROGRAM, "--early-psgi", app, "--fork-server", str(sock), *extra],
            log=log, env=env, pass_fds=[theirs.fileno()],
        )
        theirs.close()
        self.pipe.settimeout(120)
        byte = self.pipe.recv(1)
        if byte != b"\x01":
            raise BenchError(f"base vassal for {app}: expected byte 1, got {byte!r} (see {log}.log)")
        self.ready_s = time.perf_counter() - t0

    def adopt(self, args: list[str], listener: socket.socket | None = None) -> tuple[int, socket.socket, float, float]:
        """One adoption (with `listener` as its descriptor 0, as `emperor run`
        passes the socket it bound); returns (pid, our end of its pipe, t0,
        t_pid) (perf_counter)."""
        ours, theirs = socket.socketpair()
        t0 = time.perf_counter()
        try:
            pid = adoption.adopt(self.sock, [PROGRAM, *args], theirs.fileno(),
                                 on_demand_fd=listener.fileno() if listener is not None else None)
        finally:
            theirs.close()
        t_pid = time.perf_counter()
        self.procs.adopted(pid)
        return pid, ours, t0, t_pid

    def spares(self) -> int:
        """fork-server-spares as given to this base (the option's default otherwise)."""
        a = self.extra
        return int(a[a.index("--fork-server-spares") + 1]) if "--fork-server-spares" in a else 2

    def warm_spares(self) -> set[int]:
        """The base's spares that an adoption can take now (their title says
        warm; procfs.spare_of): our children, since we are the base's parent."""
        return {p.pid for p in psutil.Process().children() if spare_of(p.pid, ready=True) == self.proc.pid}

    def wait_spares(self, k: int, timeout: float = 60) -> set[int]:
        deadline = time.perf_counter() + timeout
        while len(warm := self.warm_spares()) < k:
            if time.perf_counter() > deadline:
                raise BenchError(f"only {len(warm)} of {k} spares warm after {timeout:g} s")
            self.procs.reap()
            time.sleep(0.002)
        return warm

    def stop(self) -> None:
        self.pipe.close()  # end of file: the base closes its socket and exits
        if not self.procs.wait(self.proc.pid, 20):
            self.procs.stop_tree(self.proc.pid, signal.SIGKILL, 5)
        if self.sock.exists():
            say(f"  note: base left its socket {self.sock} behind")


def stop_adopted(procs: Procs, pid: int, pipe: socket.socket) -> None:
    pipe.close()  # end of file on its Emperor pipe: graceful stop
    if not procs.wait(pid, 15):
        procs.stop_tree(pid, signal.SIGKILL, 5)
    procs.reap()


def wait_loyal(pipe: socket.socket, timeout: float) -> bool:
    """Read the vassal's bytes until 17 (all workers accept)."""
    pipe.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            data = pipe.recv(64)
            if not data:
                return False
            if 17 in data:
                return True
    except OSError:
        return False
    return False


# -- scenarios ------------------------------------------------------------------------------


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
                     base_extra: tuple[str, ...] = (), bound: bool = False) -> dict:
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
                pid, pipe, t0, t_pid = base.adopt(["--http-socket", f"127.0.0.1:{port}", "--processes", "1"],
                                                  listener)
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


UWSGI21_ENV = "UWSGI21"


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
    vdir = tmp / "uwsgi21-vassals"
    vdir.mkdir()
    sock = tmp / "uwsgi21-fork.sock"
    (vdir / "base.ini").write_text(f"[uwsgi]\nearly-psgi = {APPS['heavy']}\nfork-server = {sock}\n")
    argv = [binary, "--emperor", str(vdir), "--emperor-use-fork-server", str(sock),
            "--vassal-fork-base", "base.ini"]
    res["command"] = shlex.join(argv)
    # uWSGI's vassals run with a master: it is the process that reads the
    # Emperor pipe (end of file: stop), as under its Emperor
    vassal_args = ["--master", "--processes", "1", "--http-socket"]
    res["vassal_argv"] = shlex.join([binary, *vassal_args, "127.0.0.1:PORT"])
    sp = ("--fork-server-spares", "2")
    ours_extra = {"fork path": ("--fork-server-spares", "0"), "spares": sp,
                  "spares, base with early-warmup /": ("--early-warmup", "/", *sp)}
    samples: dict[str, dict[str, list[float]]] = {
        k: {"pid": [], "first": []} for k in ("uwsgi21", *ours_extra)}
    by_spare = dict.fromkeys(ours_extra, 0)
    em = None
    bases: dict[str, Base] = {}
    try:
        t0 = time.perf_counter()
        em = procs.spawn(argv, log="uwsgi21-emperor")
        deadline = time.perf_counter() + 120
        while not adoption.probe(sock):
            if em.poll() is not None:
                raise BenchError(f"uWSGI 2.1 Emperor exited ({em.returncode}) before its fork server listened")
            if time.perf_counter() > deadline:
                raise BenchError("uWSGI 2.1's fork server did not listen within 120 s")
            time.sleep(0.005)
        res["uwsgi21_base_ready_s"] = time.perf_counter() - t0
        for i, (key, extra) in enumerate(ours_extra.items()):
            bases[key] = Base(procs, APPS["heavy"], tmp / f"fs-side{i}.sock", f"base-side{i}", extra)

        def uwsgi_one() -> tuple[float, float, bool]:
            port = ports.get()
            ours, theirs = socket.socketpair()
            a0 = time.perf_counter()
            try:
                pid = adoption.adopt(sock, [binary, *vassal_args, f"127.0.0.1:{port}"], theirs.fileno())
            except adoption.AdoptionError as e:
                raise BenchError(f"uWSGI 2.1 fork server: {e}") from None
            finally:
                theirs.close()
            a_pid = time.perf_counter()
            procs.adopted(pid)
            try:
                t200 = wait_200(port, 30, alive=lambda: psutil.pid_exists(pid))
            finally:
                stop_adopted(procs, pid, ours)
            return a_pid - a0, t200 - a0, False

        def ours_one(base: Base) -> tuple[float, float, bool]:
            port = ports.get()
            k = base.spares()
            waiting = base.wait_spares(k) if k else set()  # the steady state: the pool refilled
            pid, pipe, a0, a_pid = base.adopt(["--http-socket", f"127.0.0.1:{port}", "--processes", "1"])
            try:
                t200 = wait_200(port, 30, alive=lambda: psutil.pid_exists(pid))
            finally:
                stop_adopted(procs, pid, pipe)
            return a_pid - a0, t200 - a0, pid in waiting

        runs = {"uwsgi21": uwsgi_one, **{k: (lambda b=b: ours_one(b)) for k, b in bases.items()}}
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
            procs.stop_tree(em.pid, signal.SIGINT, 15)  # uWSGI: SIGINT stops, SIGTERM reloads
    for key, x in samples.items():
        res[key] = {"pid_reply_ms": summary(x["pid"]), "first_200_ms": summary(x["first"]),
                    "samples_first_200_ms": x["first"]}
    u50 = res["uwsgi21"]["first_200_ms"]["p50"]
    for key in ours_extra:
        res[key]["by_spare"] = by_spare[key]
        res[key]["ratio"] = res[key]["first_200_ms"]["p50"] / u50
    res["loadavg_after"] = os.getloadavg()
    for key in samples:
        f = res[key]["first_200_ms"]
        say(f"  {key}: first 200 p50 {f['p50']:.2f} ms, p99 {f['p99']:.2f} ms; "
            f"pid reply p50 {res[key]['pid_reply_ms']['p50']:.2f} ms"
            + (f" ({res[key]['ratio']:.2f}x uWSGI 2.1)" if key != "uwsgi21" else ""))
    say(f"  load average after {' '.join(f'{x:.2f}' for x in res['loadavg_after'])}")
    return res


PROVE_TEST = """use strict;
use warnings;
use Test::More;
use HeavyStack;
my $dt = DateTime->new(year => 2026, month => 11, day => {day}, time_zone => 'Europe/Paris');
is $dt->day, {day}, 'DateTime';
is_deeply(JSON::XS->new->decode('{{"n":{n}}}'), {{n => {n}}}, 'JSON::XS');
ok(Moose::Meta::Class->create_anon_class, 'Moose');
done_testing;
"""

PROVE_VERDICT = re.compile(r"^(\S+\.t) \.+ (ok|skipped.*)$", re.M)


def prove_runners(procs: Procs, tmp: Path, n: int) -> dict:
    """N test files that each load the heavy stack, run by prove -j2, yath
    test -j2 and emperor prove -j2, the last two preloading the same modules
    (Test::More and the stack)."""
    say(f"test harnesses: {n} test files loading the heavy stack, -j2: prove, yath, emperor prove")
    suite = tmp / "prove-suite"
    (suite / "t").mkdir(parents=True)
    for i in range(n):
        (suite / "t" / f"heavy{i:02d}.t").write_text(PROVE_TEST.format(day=1 + i % 28, n=i))
    lib = str(HERE / "prove")
    runners = {
        "prove": ["prove", "-j2", "-I", lib, "t"],
        "yath": ["yath", "test", "-j2", "-I", lib, "-PTest::More", "-PHeavyStack", "t"],
        "emperor prove": [EMPEROR, "prove", "-j2", "-I", lib, "--preload", "Test::More", "--preload", "HeavyStack", "t"],
    }
    res: dict = {"files": n}
    for name, argv in runners.items():
        log = tmp / f"harness-{name.replace(' ', '-')}.log"
        t0 = time.perf_counter()
        p = procs.spawn(argv, log=log.stem, cwd=suite)
        procs.wait(p.pid, 900)
        wall = time.perf_counter() - t0
        status = procs.status.get(p.pid)
        out = log.read_text(errors="replace")
        passed = len(PROVE_VERDICT.findall(out)) if name != "yath" else n * ("Result: PASSED" in out)
        res[name] = {"wall_s": wall, "exit": None if status is None else os.waitstatus_to_exitcode(status),
                     "files_passed": passed, "command": shlex.join(argv)}
        say(f"  {name}: {wall:.2f} s, exit {res[name]['exit']}, {passed}/{n} files passed")
        if res[name]["exit"] != 0:
            raise BenchError(f"{name} failed (exit {res[name]['exit']}), see {log}")
    res["prove_over_emperor"] = res["prove"]["wall_s"] / res["emperor prove"]["wall_s"]
    res["yath_over_emperor"] = res["yath"]["wall_s"] / res["emperor prove"]["wall_s"]
    return res


PLACK_SRC = HERE / "plack-src"
DEB_SRC = Path("/etc/apt/sources.list.d/psgi-forkserver-deb-src.sources")
YATH_VERDICT = re.compile(r"^\( *(PASSED|FAILED|SKIPPED) *\)\s+job\s+\d+\s+(\S+\.t)", re.M)


def plack_source() -> Path:
    """Plack's source at the version Debian ships (`apt-get source
    libplack-perl`, once, into bench/plack-src/; a deb-src line for the
    system's own Debian suites is added if there is none)."""
    found = sorted(PLACK_SRC.glob("libplack-perl-*/t"))
    if found:
        return found[-1].parent
    has_src = any("deb-src" in f.read_text(errors="replace")
                  for f in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
                  if f.is_file())
    if not has_src:
        main = Path("/etc/apt/sources.list.d/debian.sources").read_text()
        stanza = next(s for s in main.split("\n\n") if "debian-security" not in s)
        DEB_SRC.write_text(stanza.replace("Types: deb", "Types: deb-src").strip() + "\n")
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=300)
    PLACK_SRC.mkdir(exist_ok=True)
    subprocess.run(["apt-get", "source", "-qq", "libplack-perl"], cwd=PLACK_SRC, check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    return sorted(PLACK_SRC.glob("libplack-perl-*/t"))[-1].parent


def plack_suite(procs: Procs, tmp: Path) -> dict:
    """Plack's own t/ (150 files, written by Plack's authors) by prove -j2,
    yath test -j2 and emperor prove -j2, the last two preloading what the
    suite loads; per-file verdicts compared with prove's."""
    src = plack_source()
    say(f"Plack's t/ ({src.name}): prove, yath, emperor prove, -j2")
    preload = HERE / "prove" / "plack-preload.pl"
    modules = [m for m in re.findall(r"^use ([\w:]+) \(\);", preload.read_text(), re.M)
               if m not in ("strict", "warnings")]
    runners = {
        "prove": ["prove", "-j2", "-I", "lib", "-r", "t"],
        "yath": ["yath", "test", "-j2", "-I", "lib", *(f"-P{m}" for m in modules), "t"],
        "emperor prove": [EMPEROR, "prove", "-j2", "-I", "lib", "--preload", str(preload), "-r", "t"],
    }
    res: dict = {"source": src.name}
    for name, argv in runners.items():
        log = tmp / f"plack-{name.replace(' ', '-')}.log"
        t0 = time.perf_counter()
        p = procs.spawn(argv, log=log.stem, cwd=src)
        procs.wait(p.pid, 900)
        wall = time.perf_counter() - t0
        out = log.read_text(errors="replace")
        if name == "yath":
            verdicts = {f: v.lower().replace("passed", "ok") for v, f in YATH_VERDICT.findall(out)}
        else:
            verdicts = {m.group(1): ("ok" if m.group(2) == "ok" else "skipped" if m.group(2).startswith("skipped")
                                     else "FAIL")
                        for m in re.finditer(r"^(\S+\.t) \.+ ?(.*)$", out, re.M)}
        status = procs.status.get(p.pid)
        res[name] = {"wall_s": wall, "exit": None if status is None else os.waitstatus_to_exitcode(status),
                     "files": len(verdicts), "failed": sorted(f for f, v in verdicts.items() if v.upper() == "FAIL"
                                                              or v == "failed"),
                     "verdicts": verdicts, "command": shlex.join(argv)}
        say(f"  {name}: {wall:.2f} s, exit {res[name]['exit']}, {len(verdicts)} files, failed: {res[name]['failed']}")
    p_v, e_v = res["prove"]["verdicts"], res["emperor prove"]["verdicts"]
    res["same_verdicts_as_prove"] = p_v == e_v
    res["differ_from_prove"] = sorted(f for f in set(p_v) | set(e_v) if p_v.get(f) != e_v.get(f))
    res["yath_differ_from_prove"] = sorted(
        f for f in p_v if ("ok" if p_v[f] == "ok" else "skipped" if p_v[f] == "skipped" else "failed")
        != res["yath"]["verdicts"].get(f))
    return res


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


# -- the real Emperor -----------------------------------------------------------------------


def write_vassal(vdir: Path, name: str, text: str) -> None:
    """Atomically: write a dotfile (ignored by the Emperor), rename into place."""
    tmp = vdir / f".{name}.ini.tmp"
    tmp.write_text(text)
    os.rename(tmp, vdir / f"{name}.ini")


def base_ini(app: str, sock: Path) -> str:
    return f"[uwsgi]\nearly-psgi = {APPS[app]}\nfork-server = {sock}\n"


def vassal_ini(name: str, port: int) -> str:
    return f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\nenv = APP_NAME={name}\n"


class EmperorRun:
    def __init__(self, procs: Procs, vdir: Path, log: str, extra: list[str] | None = None,
                 nofile: tuple[int, int] | None = None) -> None:
        self.procs = procs
        self.argv = [EMPEROR, "run", *(extra or []), str(vdir)]
        self.t0 = time.perf_counter()
        self.proc = procs.spawn(self.argv, log=log, preexec_fn=None if nofile is None else (
            lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile)))
        self.ps = psutil.Process(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def under(self) -> list[psutil.Process]:
        try:
            return self.ps.children(recursive=True)
        except psutil.Error:
            return []

    def stop(self) -> float:
        """SIGTERM (graceful stop of every vassal); a second SIGTERM after 20 s
        (kill now); SIGKILL after 10 more. Returns seconds it took."""
        t = time.perf_counter()
        tree = [p.pid for p in self.under()]
        if self.alive():
            os.kill(self.proc.pid, signal.SIGTERM)
            if not self.procs.wait(self.proc.pid, 20):
                say("  note: emperor still running 20 s after SIGTERM; sending it again")
                os.kill(self.proc.pid, signal.SIGTERM)
                if not self.procs.wait(self.proc.pid, 10):
                    self.procs.stop_tree(self.proc.pid, signal.SIGKILL, 5)
        took = time.perf_counter() - t
        left = [q for q in tree if psutil.pid_exists(q) and q not in self.procs.status]
        for q in left:  # orphans, now ours (subreaper): by pid
            try:
                if psutil.Process(q).status() != psutil.STATUS_ZOMBIE:
                    say(f"  note: pid {q} outlived the emperor; SIGKILL")
                    os.kill(q, signal.SIGKILL)
            except psutil.Error:
                pass
        self.procs.reap()
        return took


def wait_fork_server(sock: Path, em: EmperorRun, timeout: float) -> float:
    deadline = time.perf_counter() + timeout
    while not adoption.probe(sock):
        if time.perf_counter() > deadline or not em.alive():
            raise BenchError(f"the emperor's base never listened on {sock}")
        time.sleep(0.002)
    return time.perf_counter() - em.t0


def measure_under(em: "EmperorRun") -> dict:
    """PSS/USS of every process under the Emperor, and the Emperor's own."""
    pss, uss, count = pss_of(em.under())
    m = em.ps.memory_full_info()
    return {"pss_under_bytes": pss, "uss_under_bytes": uss, "processes_under": count,
            "emperor_pss_bytes": m.pss, "emperor_rss_bytes": m.rss}


def wait_loyal_count(stats: Path, n: int, em: "EmperorRun", timeout: float = 120) -> None:
    """Until the Emperor reports n adopted vassals loyal (its stats socket)."""
    from psgi_forkserver import status

    deadline = time.perf_counter() + timeout
    while True:
        doc = status.fetch(stats)
        loyal = sum(1 for v in doc["vassals"].values() if v.get("kind") == "adopted" and v.get("state") == "loyal")
        if loyal >= n:
            return
        if time.perf_counter() > deadline or not em.alive():
            raise BenchError(f"only {loyal} of {n} vassals loyal after {timeout:g} s")
        time.sleep(0.05)


def add_increments(mem: list[dict]) -> None:
    """PSS added per vassal between fleet sizes. Between the "served"
    measurement at N1 and the "idle" one at N2 only idle vassals were added,
    so that difference is the idle cost; served to served is the cost of a
    vassal that has served its first request."""
    for a, b in zip(mem, mem[1:]):
        for k in ("idle", "served"):
            b[k]["increment_per_vassal_bytes"] = (
                (b[k]["pss_under_bytes"] - a["served"]["pss_under_bytes"]) / (b["n"] - a["n"]))


def fleet(procs: Procs, ports: Ports, tmp: Path, sizes: Sizes) -> dict:
    """End-to-end reaction, then marginal memory at each fleet size, one emperor."""
    say(f"emperor: reaction x{sizes.reactions}, memory at N = {', '.join(map(str, sizes.fleet))}")
    vdir = tmp / "fleet"
    vdir.mkdir()
    sock = tmp / "fleet.sock"
    (vdir / "base.ini").write_text(base_ini("heavy", sock))
    stats = tmp / "fleet-stats.sock"
    em = EmperorRun(procs, vdir, "emperor-fleet", ["--stats", str(stats)])
    res: dict = {"command": shlex.join(em.argv)}
    names: list[str] = []
    try:
        res["base_listening_s"] = wait_fork_server(sock, em, 60)
        time.sleep(0.5)  # let the emperor see byte 1 before the first measured file
        react = []
        for i in range(sizes.reactions):
            name, port = f"r{i:03d}", ports.get()
            t0 = time.perf_counter()
            write_vassal(vdir, name, vassal_ini(name, port))
            t200 = wait_200(port, 30, alive=em.alive)
            react.append((t200 - t0) * 1000)
            names.append(name)
            time.sleep(0.05)
        res["reaction_ms"] = {**summary(react), "samples_ms": react}
        say(f"  reaction p50 {res['reaction_ms']['p50']:.1f} ms")
        mem = []
        for n in sizes.fleet:
            new = []
            while len(names) < n:
                name, port = f"m{len(names):03d}", ports.get()
                write_vassal(vdir, name, vassal_ini(name, port))
                names.append(name)
                new.append(port)
            # idle: every vassal loyal (all its workers accept), the new ones
            # have served nothing yet
            wait_loyal_count(stats, n, em)
            time.sleep(1.0)
            idle = measure_under(em)
            # then each new vassal serves one request (the app's real page)
            wait_all_200(new, 120, time.perf_counter())
            time.sleep(1.0)
            served = measure_under(em)
            mem.append({"n": n, "idle": idle, "served": served})
            say(f"  N={n}: {served['processes_under']} processes, PSS idle {idle['pss_under_bytes'] / MB:.0f} MB, "
                f"after one request each {served['pss_under_bytes'] / MB:.0f} MB")
        add_increments(mem)
        res["memory"] = mem
    finally:
        res["stop_s"] = em.stop()
        rmtree(vdir)
    return res


def mass_start(procs: Procs, ports: Ports, tmp: Path, sizes: Sizes, n: int | None = None,
               key: str = "mass", nofile: tuple[int, int] | None = None, app: str = "heavy") -> dict:
    """`emperor run` on a directory of n vassals (sizes.mass): time to all
    answering, then the idle Emperor. With `nofile`, the Emperor starts with
    that RLIMIT_NOFILE (soft, hard): it raises the soft limit itself."""
    n = sizes.mass if n is None else n
    limit = f", RLIMIT_NOFILE {nofile[0]}:{nofile[1]} at start" if nofile else ""
    say(f"emperor: mass start of {n} vassals ({app} app){limit}, then {sizes.idle_seconds:g} s idle")
    vdir = tmp / key
    vdir.mkdir()
    sock = tmp / f"{key}.sock"
    (vdir / "base.ini").write_text(base_ini(app, sock))
    vports = []
    for i in range(n):
        port = ports.get()
        (vdir / f"v{i:03d}.ini").write_text(vassal_ini(f"v{i:03d}", port))
        vports.append(port)
    em = EmperorRun(procs, vdir, f"emperor-{key}", nofile=nofile)
    res: dict = {"command": shlex.join(em.argv), "n": n, "app": app,
                 "nofile_at_start": list(nofile) if nofile else None}
    try:
        res["base_listening_s"] = wait_fork_server(sock, em, 60)
        # /hello: "answering" is the server's readiness; a first GET / costs
        # the app's lazy start-up (~12 ms, see the adoption rows) per
        # vassal, and this one client would add those up one after another
        first = wait_all_200(vports, 120 + n // 10, em.t0, "/hello")
        res["all_200_s"] = max(first.values())
        res["after_base_s"] = res["all_200_s"] - res["base_listening_s"]
        say(f"  all {n} answering {res['all_200_s']:.2f} s after `emperor run` "
            f"(base listening at {res['base_listening_s']:.2f} s)")
        time.sleep(2.0)  # let start-up settle (bytes 5, 17 from every vassal)
        c0 = em.ps.cpu_times()
        t0 = time.perf_counter()
        time.sleep(sizes.idle_seconds)
        c1 = em.ps.cpu_times()
        dt = time.perf_counter() - t0
        cpu = (c1.user - c0.user) + (c1.system - c0.system)
        m = em.ps.memory_full_info()
        res["idle"] = {"seconds": dt, "cpu_seconds": cpu, "cpu_pct": 100 * cpu / dt,
                       "emperor_rss_bytes": m.rss, "emperor_pss_bytes": m.pss,
                       "processes_under": len(em.under())}
        say(f"  idle emperor: {res['idle']['cpu_pct']:.2f}% CPU, RSS {m.rss / MB:.1f} MB")
    finally:
        res["stop_s"] = em.stop()
        rmtree(vdir)
    return res


def code_deploy(procs: Procs, ports: Ports, tmp: Path, sizes: Sizes) -> dict:
    """A code deploy (new base generation, every vassal moved) under load:
    clients send requests without pause, each on a new connection; count
    the ones that fail."""
    import threading

    from psgi_forkserver import status

    n = sizes.deploy
    say(f"emperor: code deploy of {n} vassals under load")
    vdir = tmp / "deploy"
    vdir.mkdir()
    sock = tmp / "deploy.sock"
    stats = tmp / "deploy-stats.sock"
    (vdir / "base.ini").write_text(base_ini("heavy", sock))
    vports = []
    for i in range(n):
        port = ports.get()
        (vdir / f"d{i:03d}.ini").write_text(vassal_ini(f"d{i:03d}", port))
        vports.append(port)
    em = EmperorRun(procs, vdir, "emperor-deploy", ["--stats", str(stats)])
    res: dict = {"command": shlex.join(em.argv), "n": n, "trigger": "SIGUSR1 (emperor reload-base)"}
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    failures: list[str] = []
    lock = threading.Lock()

    def client(offset: int) -> None:
        i = offset
        deadline = time.perf_counter() + 180  # bounded whatever happens
        while not stop.is_set() and time.perf_counter() < deadline:
            port = vports[i % n]
            i += 1
            code = http_get(port, "/hello", timeout=10)
            with lock:
                if code == 200:
                    counts["ok"] += 1
                else:
                    counts["failed"] += 1
                    if len(failures) < 20:
                        failures.append(f"port {port}: {code}")

    def generations() -> tuple[set, list]:
        doc = status.fetch(stats)
        vs = doc["vassals"].values() if isinstance(doc["vassals"], dict) else doc["vassals"]
        adopted = [v for v in vs if v.get("kind") == "adopted"]
        settled = len(adopted) == n and all(v.get("state") == "loyal" for v in adopted) and all(
            v.get("state") in ("running", "loyal") for v in vs if v.get("kind") == "base")
        return {v.get("base_generation") for v in adopted}, settled, [v.get("state") for v in vs]

    # when the Emperor logged the deploy's milestones, seen while polling
    # (resolution: the 0.05 s poll); the same on any version of the Emperor
    logpath = procs.logdir / "emperor-deploy.log"
    seen: dict[str, float] = {}
    logpos = 0

    def follow() -> None:
        nonlocal logpos
        with open(logpath, "rb") as f:
            f.seek(logpos)
            data = f.read()
        end = data.rfind(b"\n") + 1
        logpos += end
        t = time.perf_counter()
        for line in data[:end].decode(errors="replace").splitlines():
            if "[base] successor ready" in line:
                seen.setdefault("successor_ready", t)
            elif "adopted successor pid" in line and "successor_ready" in seen:
                seen.setdefault("first_moved", t)

    threads = [threading.Thread(target=client, args=(k * 7,), daemon=True) for k in range(2)]
    try:
        wait_fork_server(sock, em, 60)
        wait_all_200(vports, 120, time.perf_counter())
        deadline = time.perf_counter() + 60
        while True:  # every vassal settled before the deploy starts
            gens, settled, states = generations()
            if settled and len(gens) == 1:
                break
            if time.perf_counter() > deadline:
                raise BenchError(f"fleet never settled: {states}")
            time.sleep(0.05)
        before = gens
        for t in threads:
            t.start()
        time.sleep(1.0)  # load running before the deploy
        follow()
        seen.clear()
        t0 = time.perf_counter()
        os.kill(em.proc.pid, signal.SIGUSR1)
        deadline = t0 + 120
        # until the first vassal moved, only the log is watched: a stats
        # request wakes the Emperor's loop, and would hide a loop that
        # sleeps through the new base's readiness
        while "first_moved" not in seen:
            follow()
            if time.perf_counter() > deadline:
                raise BenchError(f"no vassal moved in 120 s: {sorted(seen)}")
            time.sleep(0.05)
        while True:
            follow()
            gens, settled, states = generations()
            if settled and gens.isdisjoint(before) and len(gens) == 1 and len(states) == n + 1:
                break
            if time.perf_counter() > deadline:
                raise BenchError(f"deploy did not finish in 120 s: generations {gens}, states {states}")
            time.sleep(0.05)
        res["deploy_s"] = time.perf_counter() - t0
        if "first_moved" in seen:
            res["ready_to_first_move_s"] = seen["first_moved"] - seen["successor_ready"]
        # the Emperor's own record of the deploy, where it keeps one (bases.py)
        last = ((status.fetch(stats).get("emperor") or {}).get("deploy") or {}).get("last")
        if last:
            res["emperor_record"] = last
        time.sleep(1.0)  # load continues after the deploy
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join(15)
        res["requests_ok"] = counts["ok"]
        res["requests_failed"] = counts["failed"]
        res["failures"] = failures
        res["stop_s"] = em.stop()
        rmtree(vdir)
    say(f"  deploy of {n} vassals took {res.get('deploy_s', float('nan')):.2f} s "
        f"(successor ready to first vassal moved: {res.get('ready_to_first_move_s', float('nan')):.2f} s); "
        f"{counts['ok']} requests answered, {counts['failed']} failed")
    return res


# -- report -------------------------------------------------------------------------------------


TEMPLATE = """[uwsgi]
http-socket = 127.0.0.1:{{ 20000 + (name[1:] | int) }}
processes = {{ 2 if name.endswith("0") else 1 }}
{% for k in ["APP_NAME", "APP_ROLE", "APP_REGION"] %}env = {{ k }}={{ name }}-{{ loop.index }}
{% endfor %}
"""


def template_renders(tmp: Path, n: int) -> dict:
    """The cost of rendering templates with a deadline (config/render.py):
    N vassal templates, rendered (a) in-process as before (compiled cache
    warm), (b) in forked children through the Emperor's Renderer, 2 at
    once: children render batches (wall time, the time spent in the
    caller's thread, which is what the Emperor's loop pays, and the forks); (c) N plain .ini files read by
    config.load (the fast path, no child). Three rounds, best of each."""
    import selectors
    from psgi_forkserver import config as cfg
    from psgi_forkserver.config.render import Renderer

    vdir = tmp / "templates"
    vdir.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        p = vdir / f"v{i:03d}.ini.j2"
        p.write_text(TEMPLATE)
        (vdir / f"p{i:03d}.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{20000 + i}\n")
        paths.append(p)
    out: dict = {"n": n}
    for p in paths:  # compile once: both paths use the compiled cache
        cfg.render_template(p, TEMPLATE, p.name[:4])
    best = {"inproc": 1e9, "child_wall": 1e9, "child_loop": 1e9, "plain": 1e9}
    for _ in range(3):
        t0 = time.perf_counter()
        for p in paths:
            cfg.render_template(p, TEMPLATE, p.name[:4])
        best["inproc"] = min(best["inproc"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(n):
            cfg.load(vdir / f"p{i:03d}.ini", judge=True)
        best["plain"] = min(best["plain"], time.perf_counter() - t0)
        with selectors.DefaultSelector() as sel:
            done: list[Path] = []
            r = Renderer(sel, done.append, timeout=30)
            t0 = time.perf_counter()
            in_loop = 0.0
            c0 = time.perf_counter()
            for p in paths:
                r.render(p, TEMPLATE, p.name[:4])
            r.start()  # the Emperor's next loop turn
            in_loop += time.perf_counter() - c0
            while len(done) < n:
                events = sel.select(5)
                c0 = time.perf_counter()
                for key, _ in events:
                    key.data(0.0)
                while r.pids:  # as the Emperor's _reap does
                    pid = os.waitpid(-1, os.WNOHANG)[0]
                    if not pid:
                        break
                    r.reaped(pid)
                in_loop += time.perf_counter() - c0
            c0 = time.perf_counter()
            texts = [r.render(p, TEMPLATE, p.name[:4]) for p in paths]
            in_loop += time.perf_counter() - c0
            best["child_wall"] = min(best["child_wall"], time.perf_counter() - t0)
            best["child_loop"] = min(best["child_loop"], in_loop)
            assert all(isinstance(t, str) for t in texts)
            for pid in list(r.pids):
                os.waitpid(pid, 0)
            out["forks"] = r.forks
    for k, v in best.items():
        out[f"{k}_ms_per_template"] = round(v * 1000 / n, 3)
    return out


def fmt(x, spec=".1f", unit=""):
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def verdict(ok) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def table(r: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    ad = r.get("adoption", {})
    cold = r.get("cold", {})
    for app in ("heavy", "heavy, spares", "heavy /hello", "heavy /hello, spares", "heavy, base with early-warmup /",
                "heavy, base with early-warmup /, spares", BOUND + ", fork path", BOUND + ", spares", "hello"):
        a = ad.get(app)
        if a:
            p50 = a["first_200_ms"]["p50"]
            served = f" ({a['by_spare']} of {len(a['samples_first_200_ms'])} by a spare)" if a.get("spares") else ""
            # the targets: a spare with early-warmup = /, in 1 ms to the pid, 2 to the page
            target_200 = (TARGETS["adoption_p50_ms"] if app == "heavy" else
                          TARGETS["spare_first_200_ms"] if app == "heavy, base with early-warmup /, spares" else None)
            target_pid = TARGETS["spare_pid_reply_ms"] if app == "heavy, base with early-warmup /, spares" else None
            pid50 = a["pid_reply_ms"]["p50"]
            rows.append((f"adoption -> first 200, {app}: p50 / p99{served}",
                         f"{p50:.2f} / {a['first_200_ms']['p99']:.2f} ms",
                         f"p50 <= {target_200:g} ms" if target_200 else "",
                         verdict(p50 <= target_200) if target_200 else ""))
            rows.append((f"adoption -> pid reply, {app}: p50 / p99",
                         f"{pid50:.2f} / {a['pid_reply_ms']['p99']:.2f} ms",
                         f"p50 <= {target_pid:g} ms" if target_pid else "",
                         verdict(pid50 <= target_pid) if target_pid else ""))
    u = r.get("uwsgi21")
    if u is not None:
        if "skipped" in u:
            rows.append(("uWSGI 2.1 side by side (adoption -> first 200, heavy /)", f"skipped: {u['skipped']}", "", ""))
        else:
            w = u["uwsgi21"]["first_200_ms"]
            load = " / ".join(" ".join(f"{x:.2f}" for x in u[k]) for k in ("loadavg_before", "loadavg_after"))
            rows.append((f"adoption -> first 200, heavy /, uWSGI 2.1 fork server (Emperor-hosted base), "
                         f"{u['n']} interleaved rounds: p50 / p99 (load average before / after: {load})",
                         f"{w['p50']:.2f} / {w['p99']:.2f} ms", "", ""))
            for key, target in (("fork path", TARGETS["fork_path_over_uwsgi21"]),
                                ("spares", TARGETS["spares_over_uwsgi21"]),
                                ("spares, base with early-warmup /", TARGETS["spares_over_uwsgi21"])):
                x = u.get(key)
                if x:
                    f = x["first_200_ms"]
                    served = f", {x['by_spare']} of {f['n']} by a spare" if key != "fork path" else ""
                    rows.append((f"adoption -> first 200, heavy /, ours, {key}: p50 / p99 (ours / uWSGI 2.1{served})",
                                 f"{f['p50']:.2f} / {f['p99']:.2f} ms ({x['ratio']:.2f}x)", f"<= {target:g}x",
                                 verdict(x["ratio"] <= target)))
    for app in ("heavy", "hello"):
        a = ad.get(app)
        c = cold.get(app)
        if c:
            for server in ("ours", "starman", "uwsgi"):
                s = c.get(server)
                if not s:
                    continue
                ratio = s["p50"] / a["first_200_ms"]["p50"] if a else None
                is_target = app == "heavy"
                rows.append((f"cold start -> first 200, {app}, {server}: p50 (cold / adoption)",
                             f"{s['p50']:.0f} ms ({fmt(ratio, '.0f', 'x')})",
                             f">= {TARGETS['cold_over_adoption']:g}x" if is_target else "",
                             verdict(ratio >= TARGETS["cold_over_adoption"] if ratio else None) if is_target else ""))
    for key, b in (r.get("burst") or {}).items():
        rows.append((f"burst of {b['n']} adoptions at once, heavy, early-warmup /, {key}: first 200 p50 / p99 / max",
                     f"{b['first_200_ms']['p50']:.1f} / {b['first_200_ms']['p99']:.1f} / {b['first_200_ms']['max']:.1f} ms"
                     + (f" ({b['by_spare']} by a spare; pool back to {b['spares']} in {b['refill_s']:.2f} s)"
                        if b["spares"] else ""), "", ""))
        rows.append((f"burst, {key}: pid reply p50 / max",
                     f"{b['pid_reply_ms']['p50']:.1f} / {b['pid_reply_ms']['max']:.1f} ms", "", ""))
    sm = r.get("spare_memory") or {}
    if sm.get("0"):
        for k, m in sm.items():
            if k == "0":
                continue
            per = (m["pss_bytes"] - sm["0"]["pss_bytes"]) / int(k)
            rows.append((f"memory of K = {k} warm spares (heavy, early-warmup /): PSS of the base and its spares; "
                         "per spare: PSS added, USS (master and worker)",
                         f"{sm['0']['pss_bytes'] / MB:.1f} MB with none, {m['pss_bytes'] / MB:.1f} MB with {k}; "
                         f"{per / MB:.2f} MB, {m['spares_uss_bytes'] / int(k) / MB:.2f} MB", "", ""))
    for key, x in (r.get("reaction") or {}).items():
        rows.append((f"emperor: new vassal file -> first 200, heavy, early-warmup /, {key}: p50 / max",
                     f"{x['reaction_ms']['p50']:.1f} / {x['reaction_ms']['max']:.1f} ms",
                     "p50 <= 5 ms" if key == "spares" else "",
                     verdict(x["reaction_ms"]["p50"] <= 5) if key == "spares" else ""))
    fl = r.get("fleet")
    if fl and "reaction_ms" in fl:
        rows.append(("emperor: new vassal file -> first 200: p50 / max",
                     f"{fl['reaction_ms']['p50']:.1f} / {fl['reaction_ms']['max']:.1f} ms", "", ""))
    cp = r.get("cold_pss")
    if fl and "memory" in fl:
        for m in fl["memory"]:
            last = m is fl["memory"][-1]
            for k, label in (("idle", "idle (served nothing)"), ("served", "after one request each")):
                x = m[k]
                rows.append((f"PSS under emperor / N, {label}, N={m['n']} ({x['processes_under']} processes)",
                             f"{x['pss_under_bytes'] / m['n'] / MB:.2f} MB", "", ""))
                inc = x.get("increment_per_vassal_bytes")
                if inc is None:
                    continue
                is_target = k == "idle" and last and m["n"] >= 200
                rows.append((f"PSS increment per added vassal, {label}, N={m['n']}",
                             f"{inc / MB:.2f} MB",
                             f"<= {TARGETS['marginal_pss_mb']:g} MB at N=200 (idle)" if k == "idle" and last else "",
                             verdict(inc / MB <= TARGETS["marginal_pss_mb"]) if is_target else
                             ("n/a (N<200)" if k == "idle" and last else "")))
        if cp:
            rows.append(("PSS of one cold app (ours, master + 1 worker, one request served)",
                         f"{cp['pss_bytes'] / MB:.1f} MB", "", ""))
            inc = fl["memory"][-1]["idle"].get("increment_per_vassal_bytes")
            if inc:
                rows.append(("cold app PSS / increment per idle adopted vassal",
                             f"{cp['pss_bytes'] / inc:.0f}x", "", ""))
    ms = r.get("mass")
    if ms and "all_200_s" in ms:
        is_target = ms["n"] >= 200
        rows.append((f"mass start: `emperor run` -> all {ms['n']} answering 200 (GET /hello)",
                     f"{ms['all_200_s']:.2f} s (base listening at {ms['base_listening_s']:.2f} s)",
                     f"200 within {TARGETS['mass_start_s']:g} s",
                     verdict(ms["all_200_s"] <= TARGETS["mass_start_s"]) if is_target else "n/a (N<200)"))
    if ms and "idle" in ms:
        is_target = ms["n"] >= 200
        rows.append((f"idle emperor, {ms['n']} vassals: CPU over {ms['idle']['seconds']:.0f} s",
                     f"{ms['idle']['cpu_pct']:.2f} %", f"< {TARGETS['emperor_cpu_pct']:g} % at 200",
                     verdict(ms["idle"]["cpu_pct"] < TARGETS["emperor_cpu_pct"]) if is_target else "n/a (N<200)"))
        rows.append((f"idle emperor, {ms['n']} vassals: RSS / PSS",
                     f"{ms['idle']['emperor_rss_bytes'] / MB:.1f} / {ms['idle']['emperor_pss_bytes'] / MB:.1f} MB",
                     "", ""))
    for app, th in (r.get("thousand") or {}).items():
        if "all_200_s" in th:
            is_target = th["n"] >= 1000
            rows.append((f"fleet, {app} app: `emperor run` (soft RLIMIT_NOFILE 1024) -> all {th['n']} "
                         "answering 200 (GET /hello)",
                         f"{th['all_200_s']:.2f} s (base listening at {th['base_listening_s']:.2f} s)",
                         f"1000 within {TARGETS['thousand_start_s']:g} s",
                         verdict(th["all_200_s"] <= TARGETS["thousand_start_s"]) if is_target else "n/a (N<1000)"))
        if "idle" in th:
            rows.append((f"idle emperor, {th['n']} {app} vassals: CPU over {th['idle']['seconds']:.0f} s; "
                         "RSS / PSS",
                         f"{th['idle']['cpu_pct']:.2f} %; {th['idle']['emperor_rss_bytes'] / MB:.1f} / "
                         f"{th['idle']['emperor_pss_bytes'] / MB:.1f} MB", "", ""))
    dp = r.get("deploy")
    if dp and "requests_ok" in dp:
        rows.append((f"code deploy of {dp['n']} vassals under load: failed requests",
                     f"{dp['requests_failed']} of {dp['requests_ok'] + dp['requests_failed']}"
                     + (f" (deploy took {dp['deploy_s']:.2f} s)" if "deploy_s" in dp else " (deploy unfinished)"),
                     "0", verdict(dp["requests_failed"] == 0 and "deploy_s" in dp)))
        if "ready_to_first_move_s" in dp:
            rec = dp.get("emperor_record") or {}
            exact = rec.get("first_move_after_ready_s")
            rows.append((f"code deploy of {dp['n']} vassals: new base ready -> first vassal moved",
                         f"{dp['ready_to_first_move_s']:.2f} s (log, 0.05 s polls)"
                         + (f"; {exact * 1000:.1f} ms (Emperor's record)" if exact is not None else ""),
                         "", ""))
    pv = r.get("prove")
    if pv:
        rows.append((f"{pv['files']} heavy test files, -j2: prove / yath test / emperor prove",
                     f"{pv['prove']['wall_s']:.2f} / {pv['yath']['wall_s']:.2f} / {pv['emperor prove']['wall_s']:.2f} s",
                     "", ""))
        rows.append(("  prove / emperor prove; yath / emperor prove",
                     f"{pv['prove_over_emperor']:.1f}x; {pv['yath_over_emperor']:.1f}x",
                     f">= {TARGETS['prove_over_emperor']:g}x; >= {TARGETS['yath_over_emperor']:g}x",
                     verdict(pv["prove_over_emperor"] >= TARGETS["prove_over_emperor"]
                             and pv["yath_over_emperor"] >= TARGETS["yath_over_emperor"])))
    pl = r.get("plack")
    if pl:
        rows.append((f"Plack's t/ ({pl['prove']['files']} files), -j2: prove / yath test / emperor prove",
                     f"{pl['prove']['wall_s']:.2f} / {pl['yath']['wall_s']:.2f} / {pl['emperor prove']['wall_s']:.2f} s",
                     "", ""))
        rows.append(("  per-file verdicts: emperor prove = prove; yath = prove",
                     f"{'yes' if pl['same_verdicts_as_prove'] else 'NO ' + ', '.join(pl['differ_from_prove'])}; "
                     f"{'yes' if not pl['yath_differ_from_prove'] else 'no: ' + ', '.join(pl['yath_differ_from_prove'])}",
                     "emperor prove = prove", verdict(pl["same_verdicts_as_prove"])))
    sv = r.get("serving", {})
    for app in ("hello", "heavy"):
        s = sv.get(app)
        if s:
            a, st, ratio = s["adopted"]["rps"], s["starman"]["rps"], s["ratio"]
            rows.append((f"wrk -t2 -c16, {app}: adopted (2 workers) / starman --workers 2",
                         f"{fmt(a, '.0f')} / {fmt(st, '.0f')} req/s ({fmt(ratio, '.2f')})",
                         f">= {TARGETS['serving_ratio']:.2f} of Starman",
                         verdict(ratio >= TARGETS["serving_ratio"] if ratio else None)))
        lg = s.get("logging") if s else None
        if lg:
            rows.append((f"wrk -t2 -c16, {app}, access log on: relayed by the Emperor's reader / "
                         "written to a file by the vassal / access log off",
                         " / ".join(f"{fmt(lg[m]['rps'], '.0f')}" for m in ("relayed", "file", "off"))
                         + f" req/s (reader: {lg['relayed'].get('relay_cpu_us_per_line')} us CPU a line)",
                         "", ""))
        rp = s.get("request_path") if s else None
        if rp and rp.get("no_log"):
            rows.append((f"request path in process (bench/request_path.pl, {rp['n']} GETs), {app}: "
                         "CPU per request, access log off / on",
                         f"{rp['no_log']:.2f} / {fmt(rp['log'], '.2f')} us", "", ""))
        for who, label in (("adopted", "adopted (2 workers)"), ("starman", "starman --workers 2")):
            f = s.get(f"fair_{who}") if s else None
            sp = s.get(f"spread_{who}") if s else None
            if f and f.get("p50_ms"):
                is_target = who == "adopted"
                rows.append((f"wrk -t1 -c16 --latency, {app}, {label}: p50 / p99",
                             f"{f['p50_ms']:.2f} / {f['p99_ms']:.2f} ms ({fmt(f['rps'], '.0f')} req/s)",
                             "p99 <= 3x p50" if is_target else "",
                             verdict(f["p99_ms"] <= 3 * f["p50_ms"]) if is_target else ""))
            ng = s.get(f"nginx_{who}") if s else None
            if ng and ng.get("p50_ms"):
                is_target = who == "adopted"
                rows.append((f"wrk -t1 -c16 --latency through nginx (upstream keepalive 16), {app}, {label}: p50 / p99",
                             f"{ng['p50_ms']:.2f} / {ng['p99_ms']:.2f} ms ({fmt(ng['rps'], '.0f')} req/s)",
                             "p99 <= 3x p50" if is_target else "",
                             verdict(ng["p99_ms"] <= 3 * ng["p50_ms"]) if is_target else ""))
            if sp:
                rows.append((f"16 keep-alive connections, {app}, {label}: responses per connection in "
                             f"{sp['seconds']:g} s, min / max", f"{sp['min']} / {sp['max']}", "", ""))
    tp = r.get("templates")
    if tp:
        rows.append((f"vassal templates, N={tp['n']}: ms per template in-process (old, no deadline) "
                     "/ in a child with a deadline: wall, Emperor loop / plain .ini load",
                     f"{tp['inproc_ms_per_template']} / {tp['child_wall_ms_per_template']}, "
                     f"{tp['child_loop_ms_per_template']} / {tp['plain_ms_per_template']} ms "
                     f"({tp['forks']} children)", "", ""))
    rows += frontbench.rows(r.get("front") or {})
    rows += healthbench.rows(r.get("health") or {})
    return rows


def render_table(rows) -> str:
    head = ("figure", "measured", "target", "")
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(4)]
    lines = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")
    return "\n".join(lines)


def markdown(r: dict, rows) -> str:
    m = r["machine"]
    v = m["versions"]
    out = [
        f"# psgi-forkserver benchmark, {r['mode']} run, {r['started']}",
        "",
        f"Command: `{r['command']}` (took {r.get('duration_s', 0):.0f} s)",
        "",
        "## Machine",
        "",
        f"- `{m['uname']}`",
        f"- CPU: {m['cpu_model']}, {m['cores']} cores; memory {m['memory_bytes'] / 1024**3:.1f} GiB; "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}",
        f"- perl {v['perl']}, Plack {v['plack']}, Starman {v['starman']}, uWSGI {v['uwsgi']}, "
        f"python {v['python']}, psutil {v['psutil']}, {v['wrk']}",
        "",
        "## Results",
        "",
        render_table(rows),
        "",
    ]
    if r.get("errors"):
        out += ["## Errors", ""] + [f"- {e}" for e in r["errors"]] + [""]
    out += [
        "## Notes",
        "",
        "- Adoption: the bench process is the subreaper and talks to a base vassal directly "
        "(`psgi_forkserver.adoption.adopt`), timing from before the request to the first HTTP 200 "
        "on the adopted vassal's port (connect/GET retried every 0.2 ms). Every sample is counted, "
        "the first one included.",
        "- Cold starts: fork+exec to first HTTP 200; the exact commands are in the JSON.",
        "- Memory: PSS (psutil `memory_full_info`) summed over every process under the Emperor "
        "(base vassal, adopted vassals, their workers), each vassal having served one request.",
        "- Serving: the adopted vassal runs with `--disable-logging` because `starman` "
        "(environment `deployment`) writes no access log; both get a wrk warm-up first (Starman "
        "compiles the app in each worker on its first request).",
        "",
    ]
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="about a minute, smaller samples")
    mode.add_argument("--full", action="store_true", help="the figures to publish")
    ap.add_argument("--only", default=",".join(SCENARIOS),
                    help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)")
    ap.add_argument("--results", type=Path, default=HERE / "results", help="where reports go")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="print and rewrite the Markdown report of an earlier run from its JSON")
    if argv is None and "--render" in sys.argv:
        mode.required = False
    args = ap.parse_args(argv)
    if args.render:
        r = json.loads(args.render.read_text())
        if r.get("fleet", {}).get("memory"):
            add_increments(r["fleet"]["memory"])
        rows = table(r)
        print(render_table(rows))
        args.render.with_suffix(".md").write_text(markdown(r, rows))
        args.render.write_text(json.dumps(r, indent=1, default=str) + "\n")
        return 0
    sizes = QUICK if args.quick else FULL
    only = set(args.only.split(","))
    if only - set(SCENARIOS):
        ap.error(f"unknown scenario(s): {', '.join(sorted(only - set(SCENARIOS)))}")
    for tool in ("perl", "starman", "uwsgi", "wrk"):
        if not any(os.access(os.path.join(d, tool), os.X_OK) for d in os.environ.get("PATH", "").split(":")):
            ap.error(f"{tool} not found on PATH (run `make setup`)")
    if not os.access(EMPEROR, os.X_OK) and only & {"fleet", "mass"}:
        ap.error(f"{EMPEROR} missing (run `make setup`)")

    # Ctrl-C arrives as KeyboardInterrupt; SIGTERM and SIGHUP too, so that
    # the finally clauses stop everything.
    def on_term(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    set_child_subreaper()
    started = datetime.now(timezone.utc)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    r: dict = {
        "mode": "quick" if args.quick else "full",
        "started": started.isoformat(timespec="seconds"),
        "command": shlex.join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT))
                               else sys.executable, os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
        "sizes": sizes.__dict__,
        "targets": TARGETS,
        "machine": machine_info(),
        "errors": [],
    }
    tmp = tempdir()
    procs = Procs(tmp)
    ports = Ports()
    t_start = time.perf_counter()
    interrupted = False

    def step(name: str, fn):
        try:
            return fn()
        except BenchError as e:
            say(f"  ERROR in {name}: {e}")
            r["errors"].append(f"{name}: {e}")
            return None

    try:
        if "adoption" in only or "spares" in only:
            r["adoption"] = {}
            # heavy.psgi's /hello route answers without the app's work
            # (Template, DateTime): it separates the server's cost from the
            # first real page's
            # and with the base's opt-in warm-up of `/` (early-warmup): the
            # app's lazy state is then built once, in the base
            # the fork path (no spares), then the same with warm spares (K = 2)
            nosp = ("--fork-server-spares", "0")
            rows = [("heavy", "heavy", "/", nosp), ("heavy /hello", "heavy", "/hello", nosp),
                    ("heavy, base with early-warmup /", "heavy", "/", ("--early-warmup", "/", *nosp)),
                    ("hello", "hello", "/", nosp)] if "adoption" in only else []
            if "spares" in only:
                sp = ("--fork-server-spares", "2")
                rows += [("heavy, spares", "heavy", "/", sp), ("heavy /hello, spares", "heavy", "/hello", sp),
                         ("heavy, base with early-warmup /, spares", "heavy", "/", ("--early-warmup", "/", *sp)),
                         # the socket bound here and passed, as `emperor run` does: no polling client
                         (BOUND + ", fork path", "heavy", "/", ("--early-warmup", "/", *nosp)),
                         (BOUND + ", spares", "heavy", "/", ("--early-warmup", "/", *sp))]
            for key, app, path, extra in rows:
                x = step(f"adoption {key}",
                         lambda: adoption_latency(procs, ports, tmp, app, sizes.adoptions, path, extra,
                                                  bound=key.startswith(BOUND)))
                if x:
                    r["adoption"][key] = x
        if "spares" in only:
            r["burst"] = {}
            for key, k in (("fork path", 0), ("spares", 4)):
                x = step(f"burst {key}", lambda: adoption_burst(procs, ports, tmp, 50, k))
                if x:
                    r["burst"][key] = x
            r["spare_memory"] = step("spare memory", lambda: spare_memory(procs, tmp))
            r["reaction"] = {}
            for key, k in (("fork path", 0), ("spares", 2)):
                x = step(f"reaction {key}", lambda: reaction(procs, ports, tmp, sizes.reactions, k))
                if x:
                    r["reaction"][key] = x
        if "uwsgi21" in only:
            r["uwsgi21"] = step("uwsgi21", lambda: uwsgi21_side_by_side(procs, ports, tmp, sizes.adoptions))
        if "cold" in only:
            r["cold"] = {}
            for app in ("heavy", "hello"):
                x = step(f"cold {app}", lambda: cold_starts(procs, ports, app, sizes.colds))
                if x:
                    r["cold"][app] = x
        if "fleet" in only:
            r["cold_pss"] = step("cold pss", lambda: cold_pss(procs, ports, "heavy"))
            r["fleet"] = step("fleet", lambda: fleet(procs, ports, tmp, sizes))
        if "mass" in only:
            r["mass"] = step("mass", lambda: mass_start(procs, ports, tmp, sizes))
        if "thousand" in only:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            # the heavy app (forks of a 134 MB base: the CPU goes to page
            # tables), then the hello app (the Emperor's own pace)
            r["thousand"] = {}
            for app in ("heavy", "hello"):
                x = step(f"thousand {app}", lambda: mass_start(
                    procs, ports, tmp, sizes, sizes.thousand, f"thousand-{app}", (1024, hard), app))
                if x:
                    r["thousand"][app] = x
        if "deploy" in only:
            r["deploy"] = step("deploy", lambda: code_deploy(procs, ports, tmp, sizes))
        if "front" in only:
            r["front"] = frontbench.run(procs, ports, tmp, EmperorRun, base_ini, args.quick,
                                        sizes.wrk_duration, step)
        if "prove" in only:
            r["prove"] = step("prove", lambda: prove_runners(procs, tmp, sizes.prove_files))
        if "plack" in only:
            r["plack"] = step("plack", lambda: plack_suite(procs, tmp))
        if "templates" in only:
            r["templates"] = step("templates", lambda: template_renders(tmp, 200))
        if "health" in only:
            r["health"] = step("health", lambda: healthbench.run(
                procs, ports, tmp, EmperorRun, base_ini, vassal_ini, wait_loyal_count, say,
                seconds=5 if args.quick else 10))
        if "serving" in only:
            r["serving"] = {}
            for app in ("hello", "heavy"):
                x = step(f"serving {app}", lambda: serving(procs, ports, tmp, app, sizes.wrk_duration))
                if x:
                    r["serving"][app] = x
    except KeyboardInterrupt as e:
        interrupted = True
        why = str(e) or "SIGINT"
        say(f"interrupted ({why}): stopping everything")
        r["errors"].append(f"interrupted ({why})")
    finally:
        killed = procs.cleanup()
        if killed:
            say(f"cleanup: SIGKILLed leftover pids {killed}")
            r["cleanup_killed"] = killed
        if r["errors"]:
            # keep the logs of a failed run where the report says
            logs = args.results / f"{stamp}-logs"
            logs.mkdir(parents=True, exist_ok=True)
            for f in tmp.glob("*.log"):
                os.replace(f, logs / f.name)
            r["logs"] = str(logs)
        rmtree(tmp)
    r["duration_s"] = time.perf_counter() - t_start

    rows = table(r)
    print(render_table(rows))
    if r["errors"]:
        print("\nerrors:\n" + "\n".join(f"  {e}" for e in r["errors"]))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stamp}.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    md = markdown(r, rows)
    (args.results / f"{stamp}.md").write_text(md)
    if not interrupted:
        (args.results / "latest.md").write_text(md)
    print(f"\nwrote {args.results / stamp}.json, .md" + ("" if interrupted else " and latest.md"))
    return 130 if interrupted else (1 if r["errors"] else 0)


if __name__ == "__main__":
    sys.exit(main())
