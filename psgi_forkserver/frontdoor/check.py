"""A new configuration goes through `nginx -t` before it replaces the
running one: the candidate is checked by a child the Emperor reaps; a
candidate nginx refuses is bisected to the routes that broke it (those
are refused, the rest installed); an accepted one is installed (written,
nginx reloaded, an operator's include written).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..spawn import spawn
from .config import indent, render_locations, render_nginx_conf, render_routing
from .nginx import find_nginx, write_if_changed
from .options import FrontDoorOptions
from .route import Route


@dataclass
class Check:
    """`nginx -t` of one candidate configuration, running."""

    pid: int
    routes: tuple[Route, ...]
    path: Path  # the candidate file
    err: Path  # nginx's messages about it


@dataclass
class Bisect:
    """A candidate nginx refused: which routes broke it. `accepted` routes
    passed together; each group of `queue` is tried with them, a group that
    fails is halved, a single route that fails is refused."""

    accepted: tuple[Route, ...]
    queue: list[tuple[Route, ...]]
    base_checked: bool = False  # `accepted` alone passed: a failure is a route's


def nginx_message(text: str) -> str:
    """nginx's reason, one line: its first [emerg] (or last) line, without
    the `nginx: ` prefix and the candidate file's path and line."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    line = next((x for x in lines if "[emerg]" in x), lines[-1] if lines else "nginx -t failed")
    line = re.sub(r"^nginx: ", "", line)
    return re.sub(r" in /\S+:\d+$", "", line)


class Checks:
    """The FrontDoor's part that checks and installs configurations (a
    mixin: the state is the FrontDoor's `check`, `bisect`, `refused`,
    `installed`, `generation`)."""

    opts: FrontDoorOptions
    log: Callable[[str], None]
    routes: tuple[Route, ...] | None
    installed: tuple[Route, ...] | None
    refused: dict[str, tuple[Route, str]]
    check: Check | None
    bisect: Bisect | None
    ng_dir: Path
    conf_path: Path
    pid: int | None
    generation: int
    serving: int
    reloads: int
    last_reload: float | None
    last_error: str | None
    dirty_since: float | None
    last_apply: float
    next_check: float
    reload_pid: int | None
    reload_again: bool
    on_refused: Callable[[str, str], None]

    def _wanted(self) -> tuple[Route, ...]:
        """The routes wanted, but those nginx refused (unless changed since)."""
        assert self.routes is not None
        out = []
        for r in self.routes:
            refused = self.refused.get(r.vassal)
            if refused is not None:
                if refused[0] == r:
                    continue
                del self.refused[r.vassal]  # changed: it gets another chance
            out.append(r)
        live = {r.vassal for r in self.routes}
        for gone in [v for v in self.refused if v not in live]:
            del self.refused[gone]
        return tuple(out)

    def _propose(self, now: float) -> None:
        """The routes changed: check the new configuration (nginx -t) before
        it replaces the running one."""
        self.dirty_since = None
        self.last_apply = now
        wanted = self._wanted()
        if wanted == self.installed:
            return
        self.bisect = None
        self._check(wanted)

    def _render(self, routes: tuple[Route, ...], generation: int) -> str:
        if self.embedded:
            assert self.opts.listen is not None
            return render_nginx_conf(routes, self.opts.listen, self.opts.run_dir,
                                     self.opts.keepalive, user=self._user(),
                                     workers=self.opts.workers,
                                     access_log=self.opts.access_log, generation=generation,
                                     log_format=self.opts.log_format)
        return render_routing(routes, self.opts.keepalive)

    def _check_text(self, routes: tuple[Route, ...]) -> str:
        """What nginx -t reads: the embedded configuration, or an operator's
        include inside a minimal nginx configuration."""
        if self.embedded:
            return self._render(routes, self.generation + 1)
        inc = self.ng_dir / "check-include.conf"
        inc.write_text(render_routing(routes, self.opts.keepalive))
        # every path nginx -t would touch is ours (Debian's are root's)
        temps = "".join(f"    {k}_temp_path {self.ng_dir / 'tmp' / k};\n"
                        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return (f"pid {self.ng_dir / 'check.pid'};\nerror_log stderr;\nevents {{}}\nhttp {{\n"
                f"{temps}    include {inc};\n    server {{\n        listen 127.0.0.1:9;\n"
                + indent(render_locations(self.opts.keepalive), 8) + "    }\n}\n")

    def _check(self, routes: tuple[Route, ...]) -> None:
        nginx = self.opts.nginx or find_nginx()
        if nginx is None:
            if self.embedded:
                self._trouble("nginx not found (apt-get install nginx)")
                return
            self._install(routes)  # an operator's include, and no nginx here to check it
            return
        try:
            self._private_dirs()
            path = self.ng_dir / "candidate.conf"
            err = self.ng_dir / "candidate.err"
            path.write_text(self._check_text(routes))
            pid = spawn([nginx, "-t", "-q", "-e", "stderr", "-p", str(self.ng_dir),
                         "-c", str(path)], os.environ, stdin=None, stdout=None, stderr=err)
        except OSError as e:
            self._trouble(f"cannot check the nginx configuration: {e.strerror or e}")
            return
        self.check = Check(pid, routes, path, err)

    def _trouble(self, why: str) -> None:
        """A failure that is no vassal's: logged once, retried later."""
        if why != self.last_error:
            self.log(f"error: {why}")
        self.last_error = why
        self.bisect = None
        self.dirty_since = self.dirty_since if self.dirty_since is not None else 0.0
        self.next_check = self.last_apply + self.opts.backoff_max

    def _checked(self, ok: bool, now: float) -> None:
        check, self.check = self.check, None
        assert check is not None
        try:
            why = nginx_message(check.err.read_text(errors="replace")) if not ok else ""
            check.err.unlink(missing_ok=True)
        except OSError as e:
            why = f"cannot read nginx -t's messages: {e.strerror or e}"
        if self.bisect is None:
            if ok:
                self._install(check.routes, check.path)
                return
            # which route broke it? Those that did not change since the last
            # installed configuration passed together; the others are tried
            keep = set(self.installed or ()) & set(check.routes)
            suspects = tuple(r for r in check.routes if r not in keep)
            self.log(f"nginx refuses the new configuration ({why}); finding the route")
            self.bisect = Bisect(tuple(sorted(keep)), [suspects] if suspects else [])
            self._check(self.bisect.accepted)  # alone first: is it a route's fault?
            return
        b = self.bisect
        if not b.base_checked:
            if not ok:
                self._trouble(f"nginx refuses even the last good routes: {why}")
                return
            b.base_checked = True
        elif ok:
            b.accepted = tuple(sorted({*b.accepted, *b.queue.pop(0)}))
        else:
            group = b.queue.pop(0)
            if len(group) == 1:
                r = group[0]
                self.refused[r.vassal] = (r, why)
                self.log(f"[{r.vassal}] refused by nginx: {why}")
                self.on_refused(r.vassal, why)
                if self.embedded:
                    self._sync_links()
            else:
                half = len(group) // 2
                b.queue[:0] = [group[:half], group[half:]]
        if b.queue:
            self._check(tuple(sorted({*b.accepted, *b.queue[0]})))
            return
        self.bisect = None
        if b.accepted != self.installed:
            self._check(b.accepted)  # checked as a whole, then installed

    def _install(self, routes: tuple[Route, ...], checked: Path | None = None) -> None:
        """A configuration nginx -t accepted replaces the running one."""
        self.last_error = None
        self.installed = routes
        self.generation += 1
        n = sum(len(r.domains) for r in routes)
        text = self._render(routes, self.generation)
        if self.embedded:
            try:
                if checked is not None and checked.read_text() == text:
                    os.replace(checked, self.conf_path)
                else:
                    write_if_changed(self.conf_path, text)
            except OSError as e:
                self.installed = None
                self._trouble(f"cannot write {self.conf_path}: {e.strerror or e}")
                return
            if self.pid is not None:
                try:
                    os.kill(self.pid, signal.SIGHUP)
                    self.reloads += 1
                    self.serving = self.generation
                    self.last_reload = time.time()
                    self.log(f"routing changed ({n} names, {len(routes)} vassals): "
                             f"nginx pid {self.pid} reloads generation {self.generation}")
                except OSError:
                    pass
        if self.opts.include is not None:
            try:
                changed = write_if_changed(self.opts.include, text if not self.embedded
                                           else render_routing(routes, self.opts.keepalive))
            except OSError as e:
                self._trouble(f"cannot write {self.opts.include}: {e.strerror or e}")
                return
            if changed:
                self.log(f"routing changed ({n} names): {self.opts.include} written")
                if self.opts.reload_cmd:
                    self.reload_again = True
                    if self.reload_pid is None:
                        self._run_reload_cmd()
                else:
                    self.serving = self.generation
