"""Base generations and code deploys, apart from the Emperor's loop.

Sockets: base generation 1 serves on the configured fork-server path
(`--use-fork-server SOCK`, else the base file's `fork-server`); a code
deploy's generation N > 1 on PATH.genN, so that it never clashes with the
old generation, which keeps serving until its last adopted vassal moved.
Every adoption goes to the socket of the generation its process record
names (`Proc.base_generation`), never to "the" fork-server path: during a
deploy two generations listen, and after it only the new one does.

Deploys: `Deploy` is the record of one code deploy, from the request to its
outcome, fed by the Emperor once per loop turn (`DeployTracker.observe`)
and by two facts it cannot see in the vassals' states (a vassal's move
failed; the new base died before it was ready). It ends with one summary
line in the log, and is what `emperor reload-base --wait` reads from the
stats document (`emperor.deploy`, see `Deploy.as_dict`).

`ForkServers` is the Emperor's side (a mixin of `emperor.Emperor`): which
vassal is the base, which socket each generation serves, whether the fork
server is ready (a base that sends no byte 1, e.g. uWSGI's, is probed),
and the deploy requests (SIGUSR1).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from . import config as cfgmod
from . import adoption
from .config.render import render_with_deadline
from .proc import CODE_DEPLOY, ForkServer, Kind, Phase, ProcState
from .vassal import Vassal

PROBE_AFTER = 0.2  # a base that sent no byte 1 is probed after this long
PROBE_EVERY = 0.1


def socket_path(root: Path | None, generation: int) -> Path | None:
    """The fork-server socket of base generation `generation`, `root` being
    generation 1's (None: no fork server)."""
    if root is None or generation <= 1:
        return root
    return root.with_name(f"{root.name}.gen{generation}")


class DeployState(StrEnum):
    STARTING = "starting"  # the new base is starting
    MOVING = "moving"  # the new base serves; vassals move onto it
    DONE = "done"  # every adopted vassal runs on the new generation
    PARTIAL = "partial"  # done, but some vassals could not move
    FAILED = "failed"  # the new base could not start: the old one keeps serving
    INTERRUPTED = "interrupted"  # the Emperor is shutting down

    @property
    def finished(self) -> bool:
        return self not in (DeployState.STARTING, DeployState.MOVING)


@dataclass
class Deploy:
    """One code deploy: base generation `generation` and the vassals moved onto it."""

    generation: int
    started: float  # monotonic
    from_generation: int
    state: DeployState = DeployState.STARTING
    ready_at: float | None = None  # the new base serves
    first_moved_at: float | None = None
    finished_at: float | None = None
    # adopted vassals on an older generation when the new base became ready
    to_move: set[str] = field(default_factory=set)
    moved: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)  # name -> why its move failed
    reason: str | None = None  # FAILED: why the new base could not start; INTERRUPTED: why
    request: int = 0  # DeployTracker.requests when this deploy was (last) asked for
    next_progress: float = 0.0  # when the next `deploy: N/M moved` line is due

    @property
    def pending(self) -> set[str]:
        return self.to_move - self.moved - set(self.failed)

    def duration(self, now: float) -> float:
        return (self.finished_at if self.finished_at is not None else now) - self.started

    def summary(self, now: float) -> str:
        """The one line that ends a deploy in the log."""
        counts = (f"{len(self.moved)} moved, {len(self.failed)} failed, "
                  f"{self.duration(now):.2f} s")
        if self.state == DeployState.FAILED:
            return (f"code deploy to generation {self.generation} failed: {self.reason}; "
                    f"generation {self.from_generation} keeps serving ({counts})")
        if self.state == DeployState.INTERRUPTED:
            return f"code deploy to generation {self.generation} {self.reason} ({counts})"
        what = "done" if self.state == DeployState.DONE else "done with failures"
        extra = "".join(f"; {n}: {why}" for n, why in sorted(self.failed.items()))
        return f"code deploy to generation {self.generation} {what}: {counts}{extra}"

    def as_dict(self, now: float) -> dict[str, Any]:
        """The deploy in the stats document (`emperor.deploy.last`)."""
        return {
            "request": self.request,
            "generation": self.generation,
            "from_generation": self.from_generation,
            "state": self.state.value,
            "finished": self.state.finished,
            "moved": len(self.moved),
            "failed": dict(sorted(self.failed.items())),
            "pending": sorted(self.pending),
            "reason": self.reason,
            "duration_s": round(self.duration(now), 3),
            "ready_after_s": (round(self.ready_at - self.started, 3)
                              if self.ready_at is not None else None),
            "first_move_after_ready_s": (
                round(self.first_moved_at - self.ready_at, 3)
                if self.first_moved_at is not None and self.ready_at is not None else None),
        }


def _serving(base: Vassal) -> int:
    cur = base.current
    return cur.base_generation if cur is not None and cur.kind == Kind.BASE else 0


@dataclass
class DeployTracker:
    """The deploys of one Emperor: the one in progress and the last one."""

    log: Callable[[str, str | None], None]
    last: Deploy | None = None
    requests: int = 0  # `reload-base` (SIGUSR1) requests so far

    def requested(self, now: float, base: Vassal) -> None:
        """SIGUSR1, after base.request_deploy(). A request for the generation
        that is still starting, or that failed, waits for that generation."""
        self.requests += 1
        d = self.last
        if d is not None and d.generation == base.want_base_generation and d.state in (
                DeployState.STARTING, DeployState.FAILED):
            d.request = self.requests
            if d.state == DeployState.FAILED:
                d.state, d.reason, d.finished_at, d.started = DeployState.STARTING, None, None, now

    def refused(self, now: float, why: str) -> None:
        """SIGUSR1 with nothing to deploy: a deploy that failed at once."""
        self.requests += 1
        self.last = Deploy(0, now, 0, DeployState.FAILED, finished_at=now, reason=why,
                           request=self.requests)

    @property
    def active(self) -> Deploy | None:
        d = self.last
        return d if d is not None and not d.state.finished else None

    def observe(self, now: float, base: Vassal | None, others: Iterable[Vassal],
                shutting_down: bool) -> None:
        """Once per loop turn, after the vassals stepped."""
        if base is None:
            return
        want = base.want_base_generation
        serving = _serving(base)
        d = self.last
        if want > serving and serving > 0 and (d is None or d.generation < want):
            if d is not None and not d.state.finished:
                d.reason = f"superseded by generation {want}"
                self._finish(d, now, DeployState.INTERRUPTED, base.name)
            self.last = d = Deploy(want, now, serving, request=self.requests)
        if d is None:
            return
        if d.state == DeployState.FAILED and d.generation > 0 and serving == d.generation:
            # the base was retried (backoff) and came up after all: move on.
            # Not a refused request (generation 0): with no base serving,
            # `serving` is 0 too, and that refusal used to turn into "done".
            d.state, d.reason, d.finished_at = DeployState.STARTING, None, None
        if d.state.finished:
            return
        if shutting_down:
            d.reason = "interrupted by shutdown"
            self._finish(d, now, DeployState.INTERRUPTED, base.name)
            return
        others = list(others)
        if d.state == DeployState.STARTING:
            if serving < d.generation:
                return
            d.state, d.ready_at = DeployState.MOVING, now
            d.to_move = {v.name for v in others if v.current is not None
                         and v.current.kind == Kind.ADOPTED
                         and v.current.base_generation < d.generation}
        by_name = {v.name: v for v in others}
        for name in list(d.pending):
            v = by_name.get(name)
            if v is None or v.config is None:
                d.to_move.discard(name)  # removed meanwhile: nothing to move
                continue
            cur = v.current
            if cur is not None and cur.kind == Kind.ADOPTED and cur.base_generation >= d.generation:
                d.moved.add(name)
                d.failed.pop(name, None)
                if d.first_moved_at is None:
                    d.first_moved_at = now
        if not d.pending:
            self._finish(d, now, DeployState.PARTIAL if d.failed else DeployState.DONE, base.name)
        elif now >= d.next_progress:  # one progress line a second while vassals move
            if d.next_progress:
                self.log(f"deploy: {len(d.moved)}/{len(d.to_move)} moved, "
                         f"{len(d.failed)} failed", base.name)
            d.next_progress = now + 1.0

    def move_failed(self, name: str, why: str) -> None:
        """A vassal's code-deploy successor failed (adoption, or died before taking over)."""
        d = self.active
        if d is not None and name in d.to_move and name not in d.moved:
            d.failed[name] = why

    def base_failed(self, now: float, base_name: str, generation: int, why: str) -> None:
        """The new base died (or could not be started) before it was ready."""
        d = self.active
        if d is not None and d.generation == generation and d.state == DeployState.STARTING:
            d.reason = why
            self._finish(d, now, DeployState.FAILED, base_name)

    def _finish(self, d: Deploy, now: float, state: DeployState, base_name: str) -> None:
        d.state, d.finished_at = state, now
        self.log(d.summary(now), base_name)

    def as_dict(self, now: float, base: Vassal | None) -> dict[str, Any]:
        """`emperor.deploy` in the stats document: what `reload-base --wait` polls."""
        return {
            "requests": self.requests,
            "serving_generation": _serving(base) if base is not None else None,
            "requested_generation": base.want_base_generation if base is not None else None,
            "last": self.last.as_dict(now) if self.last is not None else None,
        }


class ForkServers:
    """The Emperor's fork server: its base vassal and generations (a mixin)."""

    def _init_fork_servers(self) -> None:
        self.deploys = DeployTracker(self.log)
        self.fork_server_seen = ForkServer.NONE  # what _base_back saw last turn
        self.external_ready = False  # --use-fork-server: its socket accepts
        self.external_next_probe = 0.0

    def _base(self) -> Vassal | None:
        """The base vassal adopted vassals are forked from (first by name)."""
        for name in sorted(self.vassals):
            v = self.vassals[name]
            if (v.is_base and v.config is not None) or v.kind == Kind.BASE and v.has_process:
                return v
        return None

    def _fork_server_sockets(self) -> list[Path]:
        """The fork-server sockets this Emperor will use: --use-fork-server,
        or the sockets its base files name now."""
        if self.opts.use_fork_server is not None:
            return [self.opts.use_fork_server]
        out: list[Path] = []
        try:
            found = cfgmod.discover(self.dir)
        except OSError:
            return out
        for path in found.values():
            cfg = cfgmod.load(path, render=render_with_deadline)
            if cfg is None or cfg.error or not self.bases.is_base(cfg):
                continue
            sock = cfg.fork_server_path()
            if sock is not None and sock not in out:
                out.append(sock)
        return out

    def base_socket_path(self, cfg: cfgmod.VassalConfig | None, generation: int) -> Path | None:
        """The socket base generation `generation` serves (bases.socket_path);
        generation 1's is `--use-fork-server SOCK`, else the file's `fork-server`."""
        root = self.opts.use_fork_server
        if root is None and cfg is not None:
            root = cfg.fork_server_path()
        return socket_path(root, generation)

    def _fork_server_path(self, generation: int | None = None) -> Path | None:
        """Where to send an adoption for base generation `generation` (None:
        the generation that serves now)."""
        base = self._base()
        if base is None:
            return self.opts.use_fork_server  # an external fork server: one generation
        cur = base.current
        if generation is None:
            generation = cur.base_generation if cur is not None and cur.kind == Kind.BASE else 1
        for p in base.procs():  # the base process of that generation knows its socket
            h = self.procs.get((base.name, p.seq))
            if p.kind == Kind.BASE and p.base_generation == generation and h is not None \
                    and h.fork_server is not None:
                return h.fork_server
        return self.base_socket_path(base.config or base.running, generation)

    def _fork_server_state(self, now: float) -> tuple[ForkServer, int]:
        base = self._base()
        if base is not None:
            if self._fork_server_path() is None:
                return ForkServer.NONE, 0
            cur = base.current
            ready = cur is not None and cur.kind == Kind.BASE and cur.state in (
                ProcState.RUNNING, ProcState.LOYAL)
            return (ForkServer.READY, cur.base_generation) if ready else (ForkServer.WAITING, 0)
        if self.opts.use_fork_server is None:
            return ForkServer.NONE, 0
        # an external fork server (e.g. a uWSGI base we do not run)
        if not self.external_ready and now >= self.external_next_probe:
            self.external_ready = adoption.probe(self.opts.use_fork_server)
            self.external_next_probe = now + PROBE_EVERY
        return (ForkServer.READY if self.external_ready else ForkServer.WAITING), 1

    def _start_failed_for_deploy(self, v: Vassal, seq: int, now: float, why: str) -> None:
        """A successor failed to start or died before taking over: if a code
        deploy started it, the deploy learns it (a base: the deploy failed;
        an adopted vassal: its move failed)."""
        p = v.proc(seq)
        if p is None or p is not v.successor:
            return
        if p.kind == Kind.BASE:  # a new base is a new generation, whatever the reason
            self.deploys.base_failed(now, v.name, p.base_generation,
                                     f"new base {why} before it was ready")
        elif p.reason == CODE_DEPLOY:
            self.deploys.move_failed(v.name, why)

    def deploy_status(self) -> dict[str, Any]:
        """The deploys in the stats document (`emperor.deploy`): what
        `emperor reload-base --wait` waits on."""
        return self.deploys.as_dict(time.monotonic(), self._base())

    def _base_timed_out(self, generation: int) -> None:
        """An adoption from base `generation` got no reply: a wedged base
        (WedgeWatch) is killed; its ordinary restart replaces it."""
        base = self._base()
        wedged = self.wedges.timed_out(base, generation, self.opts.adopt_timeout)
        if base is None or wedged is None:
            return
        pid, why = wedged
        base.note_error(why)
        self.log(f"base {why}", base.name)
        try:
            os.kill(pid, signal.SIGKILL)  # the base alone: its adopted vassals keep serving
        except ProcessLookupError:
            pass

    def _base_back(self, now: float, fs: ForkServer, others: Iterable[Vassal]) -> None:
        """The fork server is ready again (a removed or crashed base is
        back): vassals that were waiting for it in a crash-loop backoff (a
        plain start that could not load the base's code, a failed adoption)
        are adopted now, not after a backoff of up to `backoff_max`."""
        if fs == ForkServer.READY and self.fork_server_seen != ForkServer.READY:
            for v in others:
                if v.fork_server_back(now):
                    self.log("fork server ready: starting now, not after the back-off", v.name)
        self.fork_server_seen = fs

    def _probe_times(self) -> list[float]:
        """When a starting base (or an external fork server) is probed next."""
        times = []
        for name, v in self.vassals.items():
            for p in (v.current, v.successor):
                if p is not None and p.kind == Kind.BASE and p.state == ProcState.STARTING \
                        and p.started_at is not None:
                    h = self.procs.get((name, p.seq))
                    times.append(max(p.started_at + PROBE_AFTER, h.next_probe if h else 0))
            if v.phase == Phase.WAITING_FOR_BASE and self.opts.use_fork_server and not self._base():
                times.append(self.external_next_probe)
        return times

    def _probe_bases(self, now: float) -> None:
        """A base that sends no byte 1 (uWSGI's) is ready once its socket accepts."""
        for name, v in self.vassals.items():
            for p in (v.current, v.successor):
                if p is None or p.kind != Kind.BASE or p.state != ProcState.STARTING:
                    continue
                h = self.procs.get((name, p.seq))
                if h is None or p.started_at is None:
                    continue
                if now < p.started_at + PROBE_AFTER or now < h.next_probe:
                    continue
                h.next_probe = now + PROBE_EVERY
                # its own generation's socket: during a deploy, the old
                # generation's accepts too, which says nothing about this one
                path = h.fork_server or self.opts.use_fork_server
                if path is not None and adoption.probe(path):  # never raises
                    if v.mark_ready(now, p.seq):
                        ms = (now - p.started_at) * 1000
                        self.log(f"fork server {path} accepts (pid {p.pid}, {ms:.1f} ms)", name)


    def reload_base(self) -> None:
        """A code deploy: a new base generation, then every adopted vassal moves."""
        base = self._base()
        now = time.monotonic()
        if base is None or base.current is None:
            self.log("reload-base: no running base vassal")
            self.deploys.refused(now, "no running base vassal")
            return
        base.request_deploy()
        self.deploys.requested(now, base)
        self.log(f"code deploy: base generation {base.want_base_generation}", base.name)



WEDGED_AFTER = 3  # adoptions in a row with no reply: the base is wedged


@dataclass
class WedgeWatch:
    """Judges bases by their adoptions. A base that is stopped (SIGSTOP),
    deadlocked or swapped to death still exists: no exit to reap, no error,
    and every adoption from it times out, forever. After `after` timeouts
    in a row from one generation (any reply in between resets the count)
    the base is wedged: the Emperor SIGKILLs it, and the base's ordinary
    restart (then `_base_back`) brings the waiting vassals back."""

    after: int = WEDGED_AFTER
    timeouts: dict[int, int] = field(default_factory=dict)  # generation -> in a row
    killed: dict[int, str] = field(default_factory=dict)  # pid -> why (until reaped)

    def replied(self, generation: int) -> None:
        self.timeouts.pop(generation, None)

    def timed_out(self, base: Vassal | None, generation: int,
                  adopt_timeout: float) -> tuple[int, str] | None:
        """One adoption from `generation` got no reply: (pid, why) of the
        base process to replace when that makes it wedged, else None."""
        n = self.timeouts[generation] = self.timeouts.get(generation, 0) + 1
        if n < self.after or base is None:
            return None
        for p in base.procs():
            if p.kind == Kind.BASE and p.base_generation == generation and p.pid is not None \
                    and p.pid not in self.killed:
                del self.timeouts[generation]
                why = (f"wedged: {n} adoptions in a row got no reply within {adopt_timeout:g} s "
                       f"(pid {p.pid}, generation {generation}): SIGKILL, replaced")
                self.killed[p.pid] = why
                return p.pid, why
        return None

    def exited(self, pid: int) -> str | None:
        """The reason a base that just exited was killed as wedged, if it was."""
        return self.killed.pop(pid, None)
