"""The Emperor: one selectors loop that reconciles vassal files with processes.

Events (inotify, SIGCHLD, pipe bytes, adoption replies, timers) only record
facts; each loop turn then lets every vassal's state machine decide
(`Vassal.step`) and carries out the actions. Every child is reaped in one
place (`_reap`), adopted vassals included: the Emperor is a child subreaper.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import selectors
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from . import config as cfgmod
from . import forkserver
from .forkserver import AdoptionError, PendingAdoption
from .protocol import EmperorByte
from .vassal import (
    Adopt,
    Context,
    Forget,
    ForkServer,
    Kill,
    Kind,
    Phase,
    Policy,
    Send,
    Spawn,
    Vassal,
)
from .watcher import Watcher

PR_SET_CHILD_SUBREAPER = 36

PROBE_AFTER = 0.2  # a base that sent no byte 1 is probed after this long
PROBE_EVERY = 0.1
SETTLE = 0.5  # IN_CREATE alone: wait for the writer to close the file


def set_child_subreaper() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(e)}")


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    return f"status {status:#x}"


def program_argv(program: str) -> list[str]:
    """How to exec the vassal program: directly, or with perl if not executable."""
    if os.sep not in program:
        found = shutil.which(program)
        if found:
            return [found]
    if os.access(program, os.X_OK):
        return [program]
    return [shutil.which("perl") or "/usr/bin/perl", program]


@dataclass
class Options:
    vassals_dir: Path
    program: str
    use_fork_server: Path | None = None
    fork_bases: tuple[str, ...] = ()
    mercy: float = 30.0
    adopt_timeout: float = 10.0
    rescan_interval: float = 10.0
    backoff_first: float = 0.1
    backoff_max: float = 30.0


@dataclass
class Handles:
    """The live OS objects of one vassal (the state is in Vassal)."""

    pipe: socket.socket | None = None
    adoption: PendingAdoption | None = None
    next_probe: float = 0.0


@dataclass
class Emperor:
    opts: Options
    vassals: dict[str, Vassal] = field(default_factory=dict)
    handles: dict[str, Handles] = field(default_factory=dict)
    pids: dict[int, str] = field(default_factory=dict)
    # pids reaped before we knew them (an adopted vassal may die before its
    # pid reaches us): pid -> (status, when)
    early_exits: dict[int, tuple[int, float]] = field(default_factory=dict)
    # orphans (e.g. workers of a vassal that was SIGKILLed) we asked to go
    orphans: dict[int, float] = field(default_factory=dict)
    shutting_down: bool = False
    shutdown_deadline: float = 0.0
    no_children: bool = False

    def __post_init__(self) -> None:
        self.dir = self.opts.vassals_dir.resolve()
        self.argv0 = program_argv(self.opts.program)
        self.policy = Policy(
            mercy=self.opts.mercy,
            backoff_first=self.opts.backoff_first,
            backoff_max=self.opts.backoff_max,
        )
        self.bases = cfgmod.BaseSelector.from_names(self.opts.fork_bases)
        self.sel = selectors.DefaultSelector()
        self.watcher: Watcher | None = None
        self.due: dict[str, float] = {}  # file names to re-read, and when
        self.next_rescan = 0.0
        self.signals: list[int] = []
        self.external_ready = False
        self.external_next_probe = 0.0
        self.next_straggler_kill = 0.0

    # -- logging -------------------------------------------------------------

    def log(self, msg: str, name: str | None = None) -> None:
        prefix = f"emperor: [{name}] " if name else "emperor: "
        try:
            sys.stderr.write(prefix + msg + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    # -- set-up --------------------------------------------------------------

    def _setup(self) -> None:
        set_child_subreaper()  # before anything is started
        os.chdir(self.dir)  # vassals inherit it as their working directory
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wakeup)
        try:
            self.watcher = Watcher(self.dir)
            self.sel.register(self.watcher.fileno(), selectors.EVENT_READ, self._on_inotify)
        except OSError as e:
            self.log(f"inotify unavailable ({e}); rescanning every {self.opts.rescan_interval:g} s")
        self.log(
            f"watching {self.dir} (vassal program {' '.join(self.argv0)}, pid {os.getpid()})"
        )

    def _on_signal(self, signum: int, frame: object) -> None:
        # The C handler already wrote signum to the wakeup fd; nothing to do.
        pass

    # -- events: record facts ------------------------------------------------

    def _on_wakeup(self, now: float) -> None:
        try:
            data = self._wake_r.recv(4096)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                if self.shutting_down:
                    self.log(f"{signal.Signals(signum).name} again: killing everything now")
                    self.shutdown_deadline = now
                else:
                    self.log(f"{signal.Signals(signum).name}: stopping every vassal")
                    self.shutting_down = True
                    self.shutdown_deadline = now + self.opts.mercy
            elif signum == signal.SIGHUP:
                self.next_rescan = now

    def _on_inotify(self, now: float) -> None:
        assert self.watcher is not None
        for ev in self.watcher.read():
            if ev.overflow or ev.directory_gone:
                self.next_rescan = now
                if ev.directory_gone:
                    self.log("vassals directory moved or deleted")
                continue
            if not cfgmod.is_vassal_file(ev.name):
                continue
            when = now + SETTLE if ev.created_only else now
            self.due[ev.name] = min(self.due.get(ev.name, when), when)

    def _on_pipe(self, name: str, now: float) -> None:
        h = self.handles.get(name)
        v = self.vassals.get(name)
        if h is None or h.pipe is None:
            return
        try:
            data = h.pipe.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_pipe(name)
            return
        if v is None:
            return
        for b in data:
            note = v.on_byte(b, now)
            if note:
                ms = (now - v.started_at) * 1000 if v.started_at is not None else 0.0
                self.log(f"{note} (pid {v.pid}, {ms:.1f} ms after start)", name)

    def _on_adoption(self, name: str, now: float) -> None:
        h = self.handles[name]
        v = self.vassals[name]
        pending = h.adoption
        assert pending is not None
        try:
            pid = pending.on_readable()
        except AdoptionError as e:
            self._adoption_failed(name, now, str(e))
            return
        if pid is None:
            return
        self._finish_adoption(name)
        v.adopted(pid, now)
        self.pids[pid] = name
        self.log(f"adopted pid {pid} from base ({pending.elapsed_ms(now):.1f} ms)", name)
        if h.pipe is not None:
            self.sel.register(h.pipe, selectors.EVENT_READ, lambda t, n=name: self._on_pipe(n, t))
        early = self.early_exits.pop(pid, None)
        if early is not None:
            self.pids.pop(pid, None)
            self._vassal_exited(name, pid, early[0], now)

    def _finish_adoption(self, name: str) -> None:
        h = self.handles[name]
        if h.adoption is not None:
            try:
                self.sel.unregister(h.adoption.sock)
            except (KeyError, ValueError):
                pass
            h.adoption.close()
            h.adoption = None

    def _adoption_failed(self, name: str, now: float, reason: str) -> None:
        self._finish_adoption(name)
        self._close_pipe(name)  # a vassal forked anyway sees EOF and stops
        v = self.vassals[name]
        v.start_failed(now, reason)
        self.log(f"adoption failed: {reason}; retry in {v.backoff:.1f} s", name)

    def _reap(self, now: float) -> None:
        """The one place where children are reaped."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.no_children = True
                return
            except InterruptedError:
                continue
            if pid == 0:
                self.no_children = False
                return
            name = self.pids.pop(pid, None)
            if name is not None:
                self._vassal_exited(name, pid, status, now)
            else:
                self.orphans.pop(pid, None)
                self.early_exits[pid] = (status, now)
                self.log(f"reaped pid {pid} ({describe_status(status)})")

    def _vassal_exited(self, name: str, pid: int, status: int, now: float) -> None:
        v = self.vassals[name]
        expected = v.phase == Phase.STOPPING
        self._close_pipe(name)
        v.exited(status, now)
        if expected:
            self.log(f"pid {pid} stopped ({describe_status(status)})", name)
        else:
            self.log(
                f"pid {pid} died ({describe_status(status)}); respawn in {v.backoff:.1f} s",
                name,
            )
            self._sweep_orphans(now)

    def _close_pipe(self, name: str) -> None:
        h = self.handles.get(name)
        if h is None or h.pipe is None:
            return
        try:
            self.sel.unregister(h.pipe)
        except (KeyError, ValueError):
            pass
        h.pipe.close()
        h.pipe = None

    # -- desired state: the files ---------------------------------------------

    def _rescan(self, now: float) -> None:
        found = cfgmod.discover(self.dir)
        for name in set(found) | set(self.vassals):
            path = found.get(name)
            self._apply(name, cfgmod.load(path) if path else None)
        self.next_rescan = now + self.opts.rescan_interval

    def _reload_due(self, now: float) -> None:
        for fname, when in list(self.due.items()):
            if when <= now:
                del self.due[fname]
                self._apply(cfgmod.vassal_name(fname), cfgmod.load(self.dir / fname))

    def _apply(self, name: str, cfg: cfgmod.VassalConfig | None) -> None:
        v = self.vassals.get(name)
        if cfg is not None and cfg.error:
            if v is None or v.config is None or v.config.fingerprint != cfg.fingerprint:
                self.log(f"bad config {cfg.path}: {cfg.error}", name)
        is_base = cfg is not None and self.bases.is_base(cfg)
        if v is None:
            if cfg is None:
                return
            v = Vassal(name, cfg, is_base=is_base, policy=self.policy)
            self.vassals[name] = v
            self.handles[name] = Handles()
            return
        if v.update_config(cfg, is_base):
            if cfg is None:
                self.log("file removed", name)
            elif v.has_process:
                self.log("file changed", name)

    # -- the fork server --------------------------------------------------------

    def _base(self) -> Vassal | None:
        """The base vassal adopted vassals are forked from (first by name)."""
        for name in sorted(self.vassals):
            v = self.vassals[name]
            if (v.is_base and v.config is not None) or (
                v.kind == Kind.BASE and v.pid is not None
            ):
                return v
        return None

    def _fork_server_path(self) -> Path | None:
        if self.opts.use_fork_server is not None:
            return self.opts.use_fork_server
        base = self._base()
        cfg = base.config or base.running if base else None
        return cfg.fork_server_path() if cfg else None

    def _fork_server_state(self, now: float) -> ForkServer:
        base = self._base()
        if base is not None:
            if self._fork_server_path() is None:
                return ForkServer.NONE
            ready = base.kind == Kind.BASE and base.phase in (Phase.RUNNING, Phase.LOYAL)
            return ForkServer.READY if ready else ForkServer.WAITING
        if self.opts.use_fork_server is None:
            return ForkServer.NONE
        # an external fork server (e.g. a uWSGI base we do not run)
        if not self.external_ready and now >= self.external_next_probe:
            self.external_ready = forkserver.probe(self.opts.use_fork_server)
            self.external_next_probe = now + PROBE_EVERY
        return ForkServer.READY if self.external_ready else ForkServer.WAITING

    def _probe_bases(self, now: float) -> None:
        """A base that sends no byte 1 (uWSGI's) is ready once its socket accepts."""
        path = self._fork_server_path()
        for name, v in self.vassals.items():
            if v.kind != Kind.BASE or v.phase != Phase.STARTING or v.started_at is None:
                continue
            h = self.handles[name]
            if now < v.started_at + PROBE_AFTER or now < h.next_probe:
                continue
            h.next_probe = now + PROBE_EVERY
            cfg = v.running or v.config
            p = self.opts.use_fork_server or (cfg.fork_server_path() if cfg else None) or path
            if p is not None and forkserver.probe(p):
                if v.mark_ready(now):
                    ms = (now - v.started_at) * 1000
                    self.log(f"fork server {p} accepts (pid {v.pid}, {ms:.1f} ms)", name)

    # -- actions -----------------------------------------------------------------

    def _spawn(self, v: Vassal, kind: Kind, now: float) -> None:
        h = self.handles[v.name]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env.pop("UWSGI_EMPEROR_FD_CONFIG", None)
        env["UWSGI_EMPEROR_FD"] = str(theirs.fileno())
        argv = [*self.argv0, "--ini", v.config.path.name if v.config else f"{v.name}.ini"]
        try:
            os.set_inheritable(theirs.fileno(), True)
            pid = os.posix_spawn(
                argv[0],
                argv,
                env,
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)],
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                setsigmask=(),
            )
        except OSError as e:
            ours.close()
            v.start_failed(now, str(e))
            self.log(f"cannot start {argv[0]}: {e.strerror}; retry in {v.backoff:.1f} s", v.name)
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        h.pipe = ours
        self.sel.register(ours, selectors.EVENT_READ, lambda t, n=v.name: self._on_pipe(n, t))
        v.spawned(pid, now)
        self.pids[pid] = v.name
        self.log(f"started {kind} vassal, pid {pid}", v.name)

    def _adopt(self, v: Vassal, now: float) -> None:
        h = self.handles[v.name]
        path = self._fork_server_path()
        assert v.config is not None and path is not None
        argv = [self.opts.program, "--ini", str(v.config.path)]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pending = forkserver.start_adoption(
                path, argv, theirs.fileno(), timeout=self.opts.adopt_timeout
            )
        except AdoptionError as e:
            ours.close()
            self.external_ready = False
            v.start_failed(now, str(e))
            self.log(f"adoption failed: {e}; retry in {v.backoff:.1f} s", v.name)
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        h.pipe = ours
        h.adoption = pending
        self.sel.register(pending.sock, selectors.EVENT_READ, lambda t, n=v.name: self._on_adoption(n, t))

    def _send(self, v: Vassal, byte: EmperorByte) -> None:
        h = self.handles[v.name]
        if h.pipe is None:
            return
        try:
            h.pipe.send(bytes([byte]))
        except OSError:
            pass  # it is exiting anyway; reaping will tell

    def _kill_tree(self, pid: int) -> None:
        try:
            proc = psutil.Process(pid)
            victims = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            victims = []
        for p in victims:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass

    def _sweep_orphans(self, now: float) -> None:
        """Children we never started (workers whose vassal died) get SIGTERM,
        then SIGKILL after the mercy timeout. Processes born after an
        adoption in flight began may be that vassal: they are spared."""
        pending_since = [
            h.adoption.started for h in self.handles.values() if h.adoption is not None
        ]
        # psutil create_time is wall clock; compare with a margin
        spare_after = (
            time.time() - (now - min(pending_since)) - 0.05 if pending_since else None
        )
        try:
            children = psutil.Process().children()
        except psutil.Error:
            return
        for c in children:
            if c.pid in self.pids or c.pid in self.orphans:
                continue
            try:
                if spare_after is not None and c.create_time() >= spare_after:
                    continue
                c.send_signal(signal.SIGTERM)
            except psutil.Error:
                continue
            self.orphans[c.pid] = now + self.opts.mercy
            self.log(f"orphan pid {c.pid} ({c.name()}) sent SIGTERM")

    def _kill_orphans(self, now: float) -> None:
        for pid, deadline in list(self.orphans.items()):
            if now >= deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                del self.orphans[pid]

    def _execute(self, v: Vassal, actions: list, now: float) -> None:
        for a in actions:
            match a:
                case Spawn(kind=kind):
                    self._spawn(v, kind, now)
                case Adopt():
                    self._adopt(v, now)
                case Send(byte=byte):
                    self.log(f"stopping pid {v.pid} ({v.stop_reason})", v.name)
                    self._send(v, byte)
                case Kill(reason=reason):
                    self.log(f"SIGKILL pid {v.pid}: {reason}", v.name)
                    if v.pid is not None:
                        self._kill_tree(v.pid)
                case Forget():
                    self._close_pipe(v.name)
                    del self.vassals[v.name]
                    del self.handles[v.name]

    # -- the loop ------------------------------------------------------------------

    def _reconcile(self, now: float) -> None:
        for name, h in list(self.handles.items()):
            if h.adoption is not None and h.adoption.expired(now):
                self._adoption_failed(
                    name, now, f"no reply within {self.opts.adopt_timeout:g} s"
                )
        self._probe_bases(now)
        fs = self._fork_server_state(now)
        def runs_as_base(v: Vassal) -> bool:
            return v.kind == Kind.BASE if v.has_process else v.is_base

        # non-bases first: during a shutdown the bases wait for them
        others = [v for v in self.vassals.values() if not runs_as_base(v)]
        bases = [v for v in self.vassals.values() if runs_as_base(v)]
        for v in sorted(others, key=lambda v: v.name):
            self._execute(v, v.step(Context(now, fs, self.shutting_down)), now)
        hold_bases = self.shutting_down and any(
            not runs_as_base(v) for v in self.vassals.values()
        )
        for v in sorted(bases, key=lambda v: v.name):
            self._execute(v, v.step(Context(now, fs, self.shutting_down, hold_bases)), now)
        self._kill_orphans(now)

    def _timeout(self, now: float) -> float:
        times = [self.next_rescan]
        times += self.due.values()
        for name, v in self.vassals.items():
            t = v.next_wakeup()
            if t is not None:
                times.append(t)
            h = self.handles[name]
            if h.adoption is not None:
                times.append(h.adoption.deadline)
            if v.kind == Kind.BASE and v.phase == Phase.STARTING and v.started_at is not None:
                times.append(max(v.started_at + PROBE_AFTER, h.next_probe))
            if v.phase == Phase.WAITING_FOR_BASE and self.opts.use_fork_server and not self._base():
                times.append(self.external_next_probe)
        times += self.orphans.values()
        if self.shutting_down:
            times.append(self.shutdown_deadline)
            times.append(now + 0.5)  # keep polling for the last children
        return max(0.0, min(times) - now)

    def run(self) -> int:
        self._setup()
        now = time.monotonic()
        self._rescan(now)
        while True:
            now = time.monotonic()
            self._reap(now)
            if now >= self.next_rescan:
                self._rescan(now)
            self._reload_due(now)
            self._reconcile(now)
            if self.shutting_down:
                if self._shutdown_step(now):
                    break
            for key, _ in self.sel.select(self._timeout(time.monotonic())):
                key.data(time.monotonic())
            self._prune(now)
        self.log("bye")
        return 0

    def _shutdown_step(self, now: float) -> bool:
        """True when everything is gone."""
        if not self.vassals:
            self._reap(now)
            if self.no_children:
                return True
            if not self.orphans:
                self._sweep_orphans(now)
        if now >= self.shutdown_deadline and now >= self.next_straggler_kill:
            self.next_straggler_kill = now + 1.0
            try:
                victims = psutil.Process().children(recursive=True)
            except psutil.Error:
                victims = []
            for p in victims:
                try:
                    p.send_signal(signal.SIGKILL)
                    self.log(f"SIGKILL straggler pid {p.pid}")
                except psutil.Error:
                    pass
            if now >= self.shutdown_deadline + 10:
                self.log("giving up waiting for children")
                return True
        return False

    def _prune(self, now: float) -> None:
        for pid, (_, when) in list(self.early_exits.items()):
            if now - when > 60:
                del self.early_exits[pid]
