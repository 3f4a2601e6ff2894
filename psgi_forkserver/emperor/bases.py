"""The fork servers: the base vassal, its generations' sockets, readiness, deploys, wedges.

Sockets: base generation 1 serves on the configured fork-server path
(`--use-fork-server SOCK`, else the base file's `fork-server`); a code
deploy's generation N > 1 on PATH.genN, so that it never clashes with the
old generation, which keeps serving until its last adopted vassal moved.
Every adoption goes to the socket of the generation its process record
names (`Proc.base_generation`), never to "the" fork-server path: during a
deploy two generations listen, and after it only the new one does. This
module is the one place that knows these paths (`ForkServers.socket_of`,
`path_for`, `lock_paths`).

`ForkServers` is the Emperor's part for them: which vassal is the base,
whether the fork server is ready (a base that sends no byte 1, e.g.
uWSGI's, is probed: a measurement, read with the turn's facts), the deploy
requests (SIGUSR1) and their records (deploys.py), and the bases judged
wedged (`WedgeWatch`), which the plan then kills.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config as cfgmod
from .. import adoption
from ..config.render import render_with_deadline
from ..options import Options
from ..proc import CODE_DEPLOY, ForkServer, Kind, Phase, Proc, ProcState
from .deploys import DeployTracker
from .vassal import Vassal

PROBE_AFTER = 0.2  # a base that sent no byte 1 is probed after this long
PROBE_EVERY = 0.1


def socket_path(root: Path | None, generation: int) -> Path | None:
    """The fork-server socket of base generation `generation`, `root` being
    generation 1's (None: no fork server)."""
    if root is None or generation <= 1:
        return root
    return root.with_name(f"{root.name}.gen{generation}")


class ForkServers:
    """The Emperor's fork servers: its base vassal and generations."""

    def __init__(self, opts: Options, vassals: dict[str, Vassal], vassals_dir: Path,
                 base_files: cfgmod.BaseSelector, log: Callable[..., None],
                 our_program: bool, base_names: set[str] | None = None) -> None:
        self.opts = opts
        self.vassals = vassals  # the fleet (VassalFiles.vassals), read only
        # the names whose file said base (VassalFiles.base_names), read only:
        # every pass over bases looks at these, not at the fleet; a vassal
        # runs a base process only if its file said so when it started.
        # None: every vassal is looked at.
        self.base_names = base_names
        self.dir = vassals_dir
        self.base_files = base_files
        self.log = log
        self.our_program = our_program
        self.deploys = DeployTracker(log)
        self.wedges = WedgeWatch()  # bases whose adoptions time out
        self.seen = ForkServer.NONE  # what base_back saw last turn
        self.external_ready = False  # --use-fork-server: its socket accepts
        self.external_next_probe = 0.0
        self.next_probe: dict[tuple[str, int], float] = {}  # starting base process -> when
        self.told_foreign = False  # adoptions through a fork server we do not run: said once

    # -- which base, which socket ------------------------------------------------

    def _candidates(self) -> Iterable[str]:
        return self.vassals if self.base_names is None else self.base_names

    def base(self) -> Vassal | None:
        """The base vassal adopted vassals are forked from (first by name)."""
        for name in sorted(self._candidates()):
            v = self.vassals.get(name)
            if v is None:
                continue
            if (v.is_base and v.config is not None) or v.kind == Kind.BASE and v.has_process:
                return v
        return None

    def lock_paths(self) -> list[Path]:
        """The fork-server sockets this Emperor will use (locks.claim):
        --use-fork-server, or the sockets its base files name now."""
        if self.opts.use_fork_server is not None:
            return [self.opts.use_fork_server]
        out: list[Path] = []
        try:
            found = cfgmod.discover(self.dir)
        except OSError:
            return out
        for path in found.values():
            cfg = cfgmod.load(path, render=render_with_deadline)
            if cfg is None or cfg.error or not self.base_files.is_base(cfg):
                continue
            sock = cfg.fork_server_path()
            if sock is not None and sock not in out:
                out.append(sock)
        return out

    def socket_of(self, cfg: cfgmod.VassalConfig | None, generation: int) -> Path | None:
        """The socket base generation `generation` serves (socket_path);
        generation 1's is `--use-fork-server SOCK`, else the file's `fork-server`."""
        root = self.opts.use_fork_server
        if root is None and cfg is not None:
            root = cfg.fork_server_path()
        return socket_path(root, generation)

    def spawn_args(self, p: Proc) -> list[str]:
        """What a base process is told besides its file: a later generation
        serves on its own socket."""
        path = self.socket_of(p.config, p.base_generation) if p.kind == Kind.BASE else None
        if p.base_generation > 1 and path is not None:
            return ["--fork-server", str(path)]
        return []

    def path_for(self, generation: int | None = None) -> Path | None:
        """Where to send an adoption for base generation `generation` (None:
        the generation that serves now)."""
        base = self.base()
        if base is None:
            return self.opts.use_fork_server  # an external fork server: one generation
        cur = base.current
        if generation is None:
            generation = cur.base_generation if cur is not None and cur.kind == Kind.BASE else 1
        for p in base.procs():  # the base process of that generation: the socket it was given
            if p.kind == Kind.BASE and p.base_generation == generation and p.pid is not None:
                path = self.socket_of(p.config, generation)
                if path is not None:
                    return path
        return self.socket_of(base.config or base.running, generation)

    def adoptions_ours(self) -> bool:
        """Adoptions come from our own vassal program: a base this Emperor
        runs (its file here; with `--use-fork-server` too, as with
        `--vassal-fork-base`). Its adopted vassals take their output pipe
        and config from us, so their lines, `logto` and last words are
        theirs. A foreign fork server's (another program's) keep its
        stderr: said once."""
        if not self.our_program:
            return False
        if self.opts.use_fork_server is None or self.base() is not None:
            return True
        if not self.told_foreign:
            self.told_foreign = True
            self.log(f"adopting through {self.opts.use_fork_server}, a fork server this "
                     "Emperor does not run: its vassals' output stays on its stderr, "
                     "not attributed to them (no logto)")
        return False

    def clones_into_cgroups(self) -> bool:
        """The fork server is the base this Emperor started, of this very
        version: it may be sent a cgroup's directory to clone each vassal
        into (MASK_CGROUP). The one behind `--use-fork-server` may be of an
        earlier version (started before an upgrade) and refuse the bit:
        its vassals are moved by the Emperor, as a uWSGI base's are."""
        return self.opts.use_fork_server is None and self.adoptions_ours()

    # -- readiness ---------------------------------------------------------------

    def state(self, now: float) -> tuple[ForkServer, int]:
        """(the fork server's state, the generation that serves) for the plan."""
        base = self.base()
        if base is not None:
            if self.path_for() is None:
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

    def adoption_refused(self) -> None:
        """An adoption request could not be sent: an external fork server is
        probed again before the next one."""
        self.external_ready = False

    def probe_times(self) -> list[float]:
        """When a starting base (or an external fork server) is probed next."""
        times = []
        for name, v in self._bases():
            for p in (v.current, v.successor):
                if p is not None and p.kind == Kind.BASE and p.state == ProcState.STARTING \
                        and p.started_at is not None:
                    times.append(max(p.started_at + PROBE_AFTER,
                                     self.next_probe.get((name, p.seq), 0)))
        if self.opts.use_fork_server and self.base() is None and any(
                v.phase == Phase.WAITING_FOR_BASE for v in self.vassals.values()):
            times.append(self.external_next_probe)
        return times

    def _bases(self) -> Iterable[tuple[str, Vassal]]:
        """(name, vassal) of every vassal that may run a base process."""
        for name in self._candidates():
            v = self.vassals.get(name)
            if v is not None:
                yield name, v

    def probe(self, now: float) -> None:
        """A base that sends no byte 1 (uWSGI's) is ready once its socket accepts."""
        starting: set[tuple[str, int]] = set()
        for name, v in list(self._bases()):
            for p in (v.current, v.successor):
                if p is None or p.kind != Kind.BASE or p.state != ProcState.STARTING \
                        or p.pid is None or p.started_at is None:
                    continue
                key = (name, p.seq)
                starting.add(key)
                if now < p.started_at + PROBE_AFTER or now < self.next_probe.get(key, 0.0):
                    continue
                self.next_probe[key] = now + PROBE_EVERY
                # its own generation's socket: during a deploy, the old
                # generation's accepts too, which says nothing about this one
                path = self.socket_of(p.config, p.base_generation)
                if path is not None and adoption.probe(path):  # never raises
                    # the same line as when its byte 1 comes first: which one
                    # the Emperor sees first is a matter of scheduling
                    who = "successor " if p is v.successor else ""
                    if v.mark_ready(now, p.seq):
                        ms = (now - p.started_at) * 1000
                        self.log(f"{who}ready (pid {p.pid}, {ms:.1f} ms after start; "
                                 f"fork server {path} accepts)", name)
        for key in set(self.next_probe) - starting:
            del self.next_probe[key]

    def base_back(self, now: float, fs: ForkServer, others: Iterable[Vassal]) -> None:
        """The fork server is ready again (a removed or crashed base is
        back): vassals that were waiting for it in a crash-loop backoff (a
        plain start that could not load the base's code, a failed adoption)
        are told so, and adopted now, not after a backoff of up to `backoff_max`."""
        if fs == ForkServer.READY and self.seen != ForkServer.READY:
            for v in others:
                if v.fork_server_back(now):
                    self.log("fork server ready: starting now, not after the back-off", v.name)
        self.seen = fs

    # -- deploys -------------------------------------------------------------------

    def reload(self) -> None:
        """A code deploy: a new base generation, then every adopted vassal moves."""
        base = self.base()
        now = time.monotonic()
        if base is None or base.current is None:
            self.log("reload-base: no running base vassal")
            self.deploys.refused(now, "no running base vassal")
            return
        base.request_deploy()
        self.deploys.requested(now, base)
        self.log(f"code deploy: base generation {base.want_base_generation}", base.name)

    def wanted_generation(self) -> int | None:
        base = self.base()
        return base.want_base_generation if base is not None else None

    def start_failed(self, v: Vassal, seq: int, now: float, why: str) -> None:
        """A successor failed to start or died before taking over: if a code
        deploy started it, the deploy learns it (a base: the deploy failed;
        an adopted vassal: its move failed)."""
        p = v.proc(seq)
        if p is None or p is not v.successor or p.superseded:
            return
        if p.kind == Kind.BASE:  # a new base is a new generation, whatever the reason
            self.deploys.base_failed(now, v.name, p.base_generation,
                                     f"new base {why} before it was ready", p.config.fingerprint)
        elif p.reason == CODE_DEPLOY:
            self.deploys.move_failed(v.name, why)

    def observe(self, now: float, others: Iterable[Vassal], shutting_down: bool) -> None:
        """Once per turn, after the vassals stepped: the deploy in progress."""
        self.deploys.observe(now, self.base(), others, shutting_down)

    def deploy_status(self) -> dict[str, Any]:
        """The deploys in the stats document (`emperor.deploy`): what
        `emperor reload-base --wait` waits on."""
        return self.deploys.as_dict(time.monotonic(), self.base())

    # -- wedges ----------------------------------------------------------------------

    def adoption_replied(self, generation: int) -> None:
        self.wedges.replied(generation)

    def adoption_timed_out(self, generation: int) -> None:
        """An adoption from base `generation` got no reply: counted; a base
        judged wedged is in `wedged()` until the plan's kill is carried out."""
        self.wedges.timed_out(self.base(), generation, self.opts.adopt_timeout)

    def wedged(self) -> list[tuple[int, str]]:
        """(pid, why) of the base processes judged wedged, not killed yet."""
        return list(self.wedges.to_kill.items())

    def kill_wedged(self, pid: int, why: str) -> None:
        """SIGKILL a wedged base, alone: its adopted vassals keep serving, and
        its ordinary restart (then `base_back`) replaces it."""
        self.wedges.to_kill.pop(pid, None)
        base = self.base()
        if base is not None:
            base.note_error(why)
            self.log(f"base {why}", base.name)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def exited(self, pid: int) -> str | None:
        """Why a base process that just exited was killed, if it was judged wedged."""
        return self.wedges.exited(pid)


WEDGED_AFTER = 3  # adoptions in a row with no reply: the base is wedged


@dataclass
class WedgeWatch:
    """Judges bases by their adoptions. A base that is stopped (SIGSTOP),
    deadlocked or swapped to death still exists: no exit to reap, no error,
    and every adoption from it times out, forever. After `after` timeouts
    in a row from one generation (any reply in between resets the count)
    the base is wedged: the plan kills it (KillWedged), and the base's ordinary
    restart (then `_base_back`) brings the waiting vassals back."""

    after: int = WEDGED_AFTER
    timeouts: dict[int, int] = field(default_factory=dict)  # generation -> in a row
    killed: dict[int, str] = field(default_factory=dict)  # pid -> why (until reaped)
    to_kill: dict[int, str] = field(default_factory=dict)  # judged wedged, not killed yet

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
                self.killed[p.pid] = self.to_kill[p.pid] = why
                return p.pid, why
        return None

    def exited(self, pid: int) -> str | None:
        """The reason a base that just exited was killed as wedged, if it was."""
        return self.killed.pop(pid, None)
