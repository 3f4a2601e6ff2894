"""`FrontDoor`, the Emperor's side of the front door: it keeps the last
routes it was given, writes the configuration when it changed (atomically,
batched: the first change waits `batch` seconds for the others of the same
turn and no two reloads come closer than `min_gap`), and runs nginx as a
supervised child (`daemon off`, its own session, restarted with a backoff
when it dies, SIGHUP to reload, stopped last) or, for an operator's nginx,
runs their reload command after each write. Its host links are links.py's,
its checks and installs check.py's, nginx's process supervisor.py's.

Nothing here waits: the Emperor's loop calls `update`, `poll`, `exited`
and `next_wakeup`; the one reaping of children stays in the Emperor.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..logs import OutputPipe
from ..proc import backoff_delay
from .check import Bisect, Check, Checks
from .links import HOSTS, HostLinks, rerouted, served_by_link
from .options import FrontDoorOptions
from .route import Route
from .supervisor import NginxProcess


@dataclass
class FrontDoor(HostLinks, Checks, NginxProcess):
    opts: FrontDoorOptions
    log: Callable[[str], None]
    routes: tuple[Route, ...] | None = None  # the routes wanted now
    dirty_since: float | None = None
    changed_at: float = 0.0  # the last change of the routes
    last_apply: float = -1e9
    links: dict[str, str] = field(default_factory=dict)  # host link -> socket path
    links_swept: bool = False  # the host links of an earlier run removed
    pid: int | None = None
    started_at: float = 0.0
    next_start: float = 0.0
    failures: int = 0
    stopping: bool = False
    reloads: int = 0  # SIGHUPs sent (status, tests)
    restarts: int = 0  # nginx started again after dying unasked (status, /metrics)
    reload_pid: int | None = None  # --nginx-reload command running
    reload_again: bool = False
    err_r: int | None = None
    err_buf: bytes = b""
    # what the configuration file holds: checked by nginx -t, numbered
    installed: tuple[Route, ...] | None = None
    generation: int = 0
    serving: int = 0  # the generation the running nginx was started or reloaded with
    last_reload: float | None = None  # wall clock of the last start or reload
    last_error: str | None = None  # the front door's own, not a vassal's
    check: Check | None = None
    bisect: Bisect | None = None
    next_check: float = 0.0  # after a failure of nginx -t that is no route's
    # vassal -> (its route nginx refused, nginx's message); a changed route
    # is tried again
    refused: dict[str, tuple[Route, str]] = field(default_factory=dict)
    # the Emperor's selector: watch(fd, callback), unwatch(fd)
    watch: Callable[[int, Callable[[float], None]], None] = field(default=lambda fd, cb: None)
    unwatch: Callable[[int], None] = field(default=lambda fd: None)
    # relay(pipe, pid): nginx's access log, relayed as a vassal's output
    relay: Callable[[OutputPipe, Callable[[], int | None]], None] | None = None
    # the Emperor is told of a vassal whose route nginx refused
    on_refused: Callable[[str, str], None] = field(default=lambda vassal, why: None)
    # around the spawn: nginx is born in the front door's cgroup (cgroups.py)
    spawning: Callable[[], contextlib.AbstractContextManager] = field(
        default=contextlib.nullcontext)

    def __post_init__(self) -> None:
        self.ng_dir = Path(self.opts.run_dir) / "nginx"
        self.conf_path = self.ng_dir / "nginx.conf"

    # -- facts ------------------------------------------------------------

    def update(self, routes: Iterable[Route], now: float) -> None:
        """The routing facts after a loop turn; a change is applied by `poll`."""
        new = tuple(sorted(routes))
        if new != self.routes:
            self.routes = new
            self.changed_at = now
            if self.dirty_since is None:
                self.dirty_since = now
            if self.embedded:
                self._sync_links()

    def _due(self) -> float | None:
        """When the pending change of the routes is applied: at once (a
        batch) for a first configuration, an operator's include, or a route
        the host links cannot serve; else once the routes were still for
        `settle` seconds."""
        if self.dirty_since is None:
            return None
        at = self.dirty_since + self.opts.batch
        if self.embedded and self.installed is not None and self.routes is not None:
            hosts = self.ng_dir / HOSTS
            old = set(self.installed)
            if all((served_by_link(r, hosts) and not rerouted(r, self.installed)) or not r.up
                   for r in self.routes if r not in old):
                at = max(at, min(self.changed_at + self.opts.settle,
                                 self.dirty_since + self.opts.settle_max))
        return max(at, self.last_apply + self.opts.min_gap, self.next_check)

    def owns(self, pid: int) -> bool:
        return pid in (self.pid, self.reload_pid) or (self.check is not None
                                                       and pid == self.check.pid)

    def pids(self) -> dict[int, tuple[str, int]]:
        """Our children, as the Emperor's orphan sweep counts live processes."""
        mine = [self.pid, self.reload_pid, self.check.pid if self.check else None]
        return {p: ("front", 0) for p in mine if p is not None}

    def exited(self, pid: int, status: int, now: float, describe: Callable[[int], str]) -> None:
        if pid == self.reload_pid:
            self.reload_pid = None
            if status != 0:
                self.log(f"--nginx-reload command failed ({describe(status)})")
            return
        if self.check is not None and pid == self.check.pid:
            self._checked(status == 0, now)
            return
        assert pid == self.pid
        self.pid = None
        try:  # its workers are in its session (its pid): none may keep the port
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        if self.stopping:
            self.log(f"nginx pid {pid} stopped ({describe(status)})")
            return
        if now - self.started_at >= self.opts.stable_after:
            self.failures = 0
        self.failures += 1
        self.restarts += 1
        delay = backoff_delay(self.failures, self.opts.backoff_first, self.opts.backoff_max)
        self.next_start = now + delay
        self.log(f"nginx pid {pid} died ({describe(status)}); restart in {delay:.1f} s")

    # -- state, for status and /healthz ---------------------------------------

    def state(self) -> dict:
        return {
            "pid": self.pid, "listen": self.opts.listen,
            "include": str(self.opts.include) if self.opts.include else None,
            "generation": self.generation, "serving_generation": self.serving,
            "reloads": self.reloads, "restarts": self.restarts, "last_reload": self.last_reload,
            "last_error": self.last_error,
            "names": sum(len(r.domains) for r in self.installed or ()),
            "refused": {v: why for v, (_, why) in sorted(self.refused.items())},
        }

    def health(self) -> tuple[bool, str]:
        """Healthy while nginx serves the generation last installed."""
        if self.stopping:
            return True, "front door stopping"
        if self.last_error is not None:
            return False, f"front door: {self.last_error}"
        if self.embedded:
            if self.pid is None:
                return False, "front door: nginx is not running"
            if self.serving != self.generation:
                return False, (f"front door: nginx serves generation {self.serving}, "
                               f"not {self.generation}")
        return True, "front door ok"

    # -- the loop -----------------------------------------------------------

    @property
    def embedded(self) -> bool:
        return self.opts.listen is not None

    def next_wakeup(self) -> float | None:
        times = []
        due = self._due()
        if due is not None and self.check is None:
            times.append(due)
        if self.embedded and self.pid is None and not self.stopping \
                and self.installed is not None:
            times.append(self.next_start)
        if self.reload_again and self.reload_pid is None:
            times.append(0.0)
        return min(times) if times else None

    def poll(self, now: float) -> None:
        if self.routes is None or self.stopping:
            return
        if self.embedded and self.pid is None and self.installed is not None \
                and now >= self.next_start:
            self._start(now)
        due = self._due()
        if self.check is None and due is not None and now >= due:
            self._propose(now)
        if self.reload_again and self.reload_pid is None:
            self._run_reload_cmd()

    def _private_dirs(self) -> None:
        """nginx's directory in the run directory, which is private (0700;
        with an operator's include, 0711: its nginx reaches the sockets)."""
        from ..rundir import make_private_dir, run_dir_mode
        gid = self.opts.worker_gid if self.embedded else None
        make_private_dir(self.ng_dir.parent, tighten=False, group=gid,
                         mode=run_dir_mode(self.opts.include, gid))
        (self.ng_dir / "tmp").mkdir(parents=True, exist_ok=True)

    def _user(self) -> str | None:
        """nginx's workers' user: only a root master can change it."""
        return self.opts.user if os.geteuid() == 0 else None

    def stop(self) -> None:
        """Shutdown: the vassals are gone; nginx goes now (fast stop)."""
        if self.stopping:
            return
        self.stopping = True
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except OSError:
                pass

    @property
    def stopped(self) -> bool:
        return self.pid is None

    def close(self) -> None:
        """Teardown: nothing of ours may outlive the Emperor."""
        for pid in (self.pid, self.reload_pid, self.check.pid if self.check else None):
            if pid is not None:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
        self._close_pipes()
        self._remove_links()
