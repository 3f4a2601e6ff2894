"""Starting `emperor run` one way: `start_emperor` (pytest-xprocess, once it
logs that it watches), `Emperors` (a fresh vassals directory with a base,
files, the fast back-off every fleet test uses, and everything stopped and
removed after), and `Emp`, the one handle a test gets on a running Emperor."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from xprocess import ProcessStarter

from psgi_forkserver.status import fetch

from .apps import APP, base_ini, get
from .processes import alive, descendants, kill_all, wait_for


EMPEROR = str(Path(sys.executable).parent / "emperor")


class EmperorLog:
    """What an Emperor started by `start_emperor` logged (needs `.log`)."""

    log: Path
    _PID = r"emperor: \[{name}\] (?:adopted (?:successor )?pid|started \w+ vassal, pid) (\d+)"

    def text(self) -> str:
        # xprocess appends every run of the same name to one file
        return Path(self.log).read_text(errors="replace").split("@@__xproc_block_delimiter__@@")[-1]

    def lines(self, needle: str) -> list[str]:
        return [line for line in self.text().splitlines() if needle in line]

    def vpids(self, name: str) -> list[int]:
        """Every pid the Emperor logged for this vassal, oldest first."""
        pat = re.compile(self._PID.format(name=re.escape(name)))
        return [int(m) for m in pat.findall(self.text())]

    def vpid(self, name: str, timeout: float = 15.0) -> int:
        """The vassal's latest pid. Waits for it: a vassal may answer HTTP
        before the Emperor has read its adoption reply and logged it."""
        try:
            return wait_for(lambda: self.vpids(name), timeout, f"a pid logged for {name}")[-1]
        except AssertionError as e:
            raise AssertionError(f"{e}:\n{self.text()}") from None


@dataclass
class RunningEmperor(EmperorLog):
    pid: int
    popen: subprocess.Popen
    log: Path


@dataclass
class Emp(RunningEmperor):
    """An Emperor on a vassals directory of the test's own (`Emperors`):
    its --stats socket and --pidfile when it was given them, and the ports
    of the apps the test wrote."""

    dir: Path = Path()
    stats: Path | None = None
    pidfile: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)
    status_http_port: int = 0  # its --status-http, when the test gave it one

    def doc(self) -> dict:
        """Its status document, from its stats socket."""
        return fetch(self.stats)

    def status(self) -> dict[str, dict]:
        """Its vassals, as its stats socket tells."""
        return fetch(self.stats, timeout=10)["vassals"]

    def vassal(self, name: str) -> dict:
        return self.doc()["vassals"][name]

    def after_a_rescan(self, timeout: float = 20.0) -> None:
        """Wait until a full rescan of its directory started after this call
        is done: whatever a rescan would do again has been done by then."""
        before = self.doc()["emperor"]["rescans"]
        wait_for(lambda: self.doc()["emperor"]["rescans"] > before, timeout, "a full rescan")

    def heartbeats_seen(self, names, timeout: float = 20.0) -> None:
        """Wait until the Emperor has a heartbeat from each of `names`."""
        def seen() -> bool:
            status = self.status()
            return all(status[n]["heartbeat_age"] is not None for n in names)
        wait_for(seen, timeout, f"a heartbeat from each of {sorted(names)}")

    def url(self, path: str) -> str:
        """`path` on its --status-http listener."""
        return f"http://127.0.0.1:{self.status_http_port}{path}"

    def running(self) -> bool:
        return self.popen.poll() is None

    def write(self, name: str, text: str) -> None:
        """`name`.ini, atomically (a dotfile renamed into place)."""
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(text)
        os.rename(tmp, self.dir / f"{name}.ini")

    def answers_from(self, name: str, vassal_pid: int) -> bool:
        """The app answers, and the answering process is vassal_pid or below it."""
        got = get(self.ports[name])
        worker = psutil.Process(int(got["pid"]))
        return worker.pid == vassal_pid or vassal_pid in [p.pid for p in worker.parents()]


def start_emperor(xprocess, name: str, args: list, env: dict | None = None,
                  nofile: tuple[int, int] | None = None,
                  groups: list[int] | None = None) -> RunningEmperor:
    """`emperor run ARGS...` under pytest-xprocess, once it logs that it watches.

    `nofile`: the (soft, hard) RLIMIT_NOFILE the Emperor starts with;
    `groups`: its supplementary groups (as root). Both are set by a Python
    that then execs it (xprocess owns the Popen's preexec_fn)."""

    # one xprocess directory per name: pytest-xdist's workers each get their own
    name = f"{name}-{os.environ.get('PYTEST_XDIST_WORKER', 'solo')}"
    argv = [EMPEROR, "run", *map(str, args)]
    if nofile is not None or groups is not None:
        argv = [sys.executable, "-c",
                "import os, resource, sys; "
                + (f"resource.setrlimit(resource.RLIMIT_NOFILE, {tuple(nofile)!r}); " if nofile else "")
                + (f"os.setgroups({list(groups)!r}); " if groups is not None else "")
                + "os.execv(sys.argv[1], sys.argv[1:])", *argv]
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}

    class Starter(ProcessStarter):
        pattern = 'emperor: watching|"message": "watching'  # --log-format text or json
        timeout = 20
        terminate_on_interrupt = True
        args = argv
        env = environ
    pid, log = xprocess.ensure(name, Starter, restart=True)
    popen = next(r.popen for r in reversed(xprocess.resources) if r.popen and r.popen.pid == pid)
    return RunningEmperor(pid, popen, Path(log))


def stop_emperor(e: RunningEmperor) -> None:  # or anything with .pid and .popen
    """SIGTERM, wait for its exit (SIGKILL after 20 s), then SIGKILL any
    descendant that outlived it (there should be none; tests check that)."""
    left = descendants(e.pid)
    if e.popen.poll() is None:
        os.kill(e.pid, signal.SIGTERM)
        try:
            e.popen.wait(20)
        except subprocess.TimeoutExpired:
            e.popen.kill()
            e.popen.wait()
    kill_all([p for p in left if alive(p)])


# What every fleet test runs its Emperor with: restarts and reloads fast,
# so that a test waits for outcomes, not for the defaults' back-off.
FAST = ("--mercy", "5", "--rescan-interval", "2", "--backoff-first", "0.2", "--backoff-max", "1",
        "--reload-grace", "0.3")


class Emperors:
    """Starts Emperors for a test, each on a fresh directory: `vassals/` (the
    base from `base_ini` unless base=False, then the test's files),
    `stats.sock` and `emperor.pid` beside it when asked for; `stop()` stops
    them all (a frozen one is thawed first) and removes the directories.

    `args`: what every Emperor gets before the call's own `extra`."""

    kind: type[Emp] = Emp

    def __init__(self, xprocess, prefix: str = "pfs-", *, args: Iterable[str] = FAST, stats: bool = True,
                 pidfile: bool = False, shared: bool = False, app: Path = APP) -> None:
        self.xprocess, self.prefix, self.args, self.app = xprocess, prefix, list(args), app
        self.with_stats, self.with_pidfile, self.shared = stats, pidfile, shared
        self.started: list[Emp] = []
        self.tops: list[Path] = []

    def _top(self) -> Path:
        top = Path(tempfile.mkdtemp(prefix=self.prefix))
        self.tops.append(top)
        if self.shared:
            top.chmod(0o755)  # nginx's workers (www-data under a root Emperor) reach the sockets
        return top

    def directory(self) -> Path:
        """A fresh vassals directory, for a test whose files name paths in
        it before it starts the Emperor there (`vdir=`); removed by stop()."""
        vdir = self._top() / "vassals"
        vdir.mkdir()
        return vdir

    def __call__(self, files: dict, *extra, base: bool = True, wait: Iterable[int] = (),
                 env: dict | None = None, prepare: Callable[[Path], None] | None = None,
                 nofile: tuple[int, int] | None = None, groups: list[int] | None = None,
                 vdir: Path | None = None, fork_server: Path | str = "fs.sock") -> Emp:
        """`files`: name -> text; a name without a dot gets `.ini`, a bytes
        name is used as it is (non-UTF-8 names). `prepare(vdir)` runs just
        before the start; `wait`: ports that must answer before it returns;
        `nofile`, `groups`: as `start_emperor`'s."""
        if vdir is None:
            vdir = self.directory()
        top = vdir.parent if vdir.parent in self.tops else self._top()
        if base:
            (vdir / "base.ini").write_text(base_ini(self.app, fork_server))
        for fname, text in files.items():
            if isinstance(fname, bytes):
                with open(os.path.join(os.fsencode(vdir), fname), "w") as f:
                    f.write(text)
            else:
                (vdir / (fname if "." in fname else f"{fname}.ini")).write_text(text)
        if prepare is not None:
            prepare(vdir)
        stats = top / "stats.sock" if self.with_stats else None
        pidfile = top / "emperor.pid" if self.with_pidfile else None
        em = start_emperor(self.xprocess, f"emperor-{top.name}", [
            vdir, *self.args, *(["--stats", stats] if stats else []), *(["--pidfile", pidfile] if pidfile else []),
            *self.args_in(top), *extra], env, nofile=nofile, groups=groups)
        e = self.kind(em.pid, em.popen, em.log, vdir, stats, pidfile)
        self.started.append(e)
        for port in wait:
            wait_for(lambda p=port: get(p), 30, f"port {port} to answer")
        return e

    def args_in(self, top: Path) -> list:
        """Arguments naming paths in the Emperor's own directory `top`."""
        return []

    def stop(self, after: Callable[[Emp], None] | None = None) -> None:
        """Stop every Emperor; `after(e)` sees each one stopped, before its
        directory goes."""
        for e in self.started:
            try:
                if e.running() and psutil.Process(e.pid).status() == psutil.STATUS_STOPPED:
                    os.kill(e.pid, signal.SIGCONT)
            except psutil.Error:
                pass
            stop_emperor(e)
            if after is not None:
                after(e)
        for top in self.tops:
            shutil.rmtree(top, ignore_errors=True)


class Load(threading.Thread):
    """Requests without pause, each on a new connection, until stopped
    (at most `limit` seconds / `max_requests`)."""

    def __init__(self, ports, limit=20.0, max_requests=20000):
        super().__init__(daemon=True)
        self.ports, self.limit, self.max_requests = list(ports), limit, max_requests
        self.ok = 0
        self.failed: list[str] = []
        self.seen: dict[int, set[str]] = {p: set() for p in self.ports}
        self.stop_ev = threading.Event()

    def run(self):
        deadline = time.monotonic() + self.limit
        i = 0
        while not self.stop_ev.is_set() and time.monotonic() < deadline \
                and self.ok + len(self.failed) < self.max_requests:
            port = self.ports[i % len(self.ports)]
            i += 1
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                c.request("GET", "/")
                r = c.getresponse()
                body = r.read().decode()
                c.close()
                if r.status != 200:
                    raise OSError(f"status {r.status}")
                self.seen[port].add(dict(kv.split("=", 1) for kv in body.split())["value"])
                self.ok += 1
            except Exception as e:  # noqa: BLE001 - counted
                self.failed.append(f"{port}: {e!r}")

    def finish(self):
        self.stop_ev.set()
        self.join(30)
        return self
