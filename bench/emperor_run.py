"""A real `emperor run` for the scenarios that need one, and the vassal
files they give it."""

from __future__ import annotations

import os
import resource
import signal
import time
from pathlib import Path

import psutil

from psgi_forkserver import adoption
from benchlib import BenchError, Ports, Procs, pss_of
from settings import APPS, EMPEROR, say


def write_vassal(vdir: Path, name: str, text: str) -> None:
    """Atomically: write a dotfile (ignored by the Emperor), rename into place."""
    tmp = vdir / f".{name}.ini.tmp"
    tmp.write_text(text)
    os.rename(tmp, vdir / f"{name}.ini")


def base_ini(app: str, sock: Path) -> str:
    return f"[uwsgi]\nearly-psgi = {APPS[app]}\nfork-server = {sock}\n"


def vassal_ini(name: str, port: int, *lines: str) -> str:
    """A vassal of the base's app; `lines` ("key = value") after the usual ones."""
    return (f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\nenv = APP_NAME={name}\n"
            + "".join(f"{line}\n" for line in lines))


def write_fleet(vdir: Path, app: str, sock: Path, n: int, ports, digits: int = 3,
                lines: tuple[str, ...] = ()) -> list[int]:
    """A vassals directory: the base of `app` on `sock` and n vassals
    (vNNN.ini, each on a port of its own, with `lines`); their ports, in order."""
    (vdir / "base.ini").write_text(base_ini(app, sock))
    vports = []
    for i in range(n):
        port = ports.get()
        name = f"v{i:0{digits}d}"
        (vdir / f"{name}.ini").write_text(vassal_ini(name, port, *lines))
        vports.append(port)
    return vports


def start_fleet(procs: Procs, tmp: Path, app: str, n: int, extra: list[str],
                lines: tuple[str, ...] = ()) -> tuple["EmperorRun", list[int]]:
    """n vassals of `app` (base on tmp/base.sock) under `emperor run`,
    started as `--only thousand` starts it: a soft RLIMIT_NOFILE of 1,024.
    The Emperor, and the vassals' ports in order."""
    vdir = tmp / "vassals"
    vdir.mkdir()
    vports = write_fleet(vdir, app, tmp / "base.sock", n, Ports(), digits=4, lines=lines)
    return EmperorRun(procs, vdir, "emperor", extra,
                      nofile=(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1])), vports


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
