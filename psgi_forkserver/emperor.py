"""The Emperor: one selectors loop that reconciles vassal files with processes.

Events (inotify, SIGCHLD, SIGUSR1, pipe bytes, adoption replies, readable
on-demand sockets, timers) only record facts; each loop turn then lets every vassal's state machine decide
(`Vassal.step`) and carries out the actions. Every child is reaped in one
place (`_reap`), adopted vassals included: the Emperor is a child subreaper.
The system calls behind the actions (posix_spawn, pipes, SIGKILL, prctl)
are in launch.py; this module keeps the loop and the bookkeeping.

The Emperor binds every vassal's `http-socket` itself (sockets.py) and
passes it to each of the vassal's processes (mask 0x04), so restarts,
gap-free reloads (a successor process is started, and the old one stopped
once the new one is loyal) and code deploys (a new base generation, then
every adopted vassal moved onto it, `deploy_parallel` at a time) never close
the port.

Code deploys and the fork-server socket: base generation 1 serves on its
configured path (`--use-fork-server SOCK`, else its `fork-server`);
generation N > 1 is started with the argv override `--fork-server
PATH.genN`, so the new base never clashes with the old one, which keeps
listening until the last adopted vassal has moved. Every adoption goes to
the socket of the generation it names (bases.py). Each base unlinks only
its own socket on exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
from collections import deque
import os
import selectors
import signal
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from . import config as cfgmod
from .config import render
from . import bases as basesmod
from . import adoption as forkserver, launch, logs, notify, protocol, sockets
from . import status as statusmod
from .frontdoor import FrontDoor, FrontDoorOptions, Route, nginx_target
from .metrics import EmperorMetrics
from .adoption import AdoptionError, PendingAdoption
from .launch import describe_status, program_argv
from .orphans import EndedSessions, classify_orphans, scan_proc, spare_of
from .protocol import EmperorByte, ProtocolError, VassalByte
from .sockets import Listener
from .vassal import (
    EMPEROR_KEYS,
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

PROBE_AFTER = 0.2  # a base that sent no byte 1 is probed after this long
PROBE_EVERY = 0.1
SETTLE = 0.5  # IN_CREATE alone: wait for the writer to close the file
RETRY_READ = 1.0  # a vassal file that could not be read for lack of descriptors
RECENT_LINES = 50  # log lines kept per vassal for the status page (/log/NAME)
# The descriptor budget: what the Emperor keeps per vassal (its Emperor pipe,
# its config pipe, its http-socket), and what it needs besides (its own
# files, the status server's clients, adoptions in flight, a successor's
# pipes during reloads).
FDS_PER_VASSAL = 4  # ... and the read end of its output pipe (logs.py)
FDS_RESERVED = 32


def _comm(pid: int) -> str:
    """A process's command name, for a log line; '?' if it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


class StartupError(Exception):
    """The Emperor cannot start (another one holds its directory, pidfile or
    fork-server socket; a path it cannot use): str() is the one line to print."""


def lock_holder(fd: int) -> int | None:
    """The pid holding a flock on the file open as `fd` (from /proc/locks)."""
    st = os.fstat(fd)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" ("->" marks waiters)
                if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
                    continue
                if parts[5] == want:
                    return int(parts[4])
    except (OSError, ValueError):
        pass
    return None


def take_lock(path: Path, what: str, *, create: bool = False, directory: bool = False,
              shown: Path | None = None) -> int:
    """An exclusive flock on `path` (held until the Emperor exits: the
    descriptor is kept open); StartupError, naming `shown` (default: `path`),
    when another process holds it."""
    shown = path if shown is None else shown
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    if directory:
        flags |= os.O_DIRECTORY
    if create:
        flags |= os.O_CREAT
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        raise StartupError(f"{what} {shown}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(fd)
        os.close(fd)
        by = f" (pid {holder})" if holder else ""
        raise StartupError(f"{what} {shown} is in use by another Emperor{by}: "
                           "not starting a second one")
    except OSError as e:
        os.close(fd)
        raise StartupError(f"{what} {shown}: cannot lock: {e.strerror or e}") from None
    return fd


def fork_server_lock_path(sock: Path) -> Path:
    """The lock file of a fork-server socket (a socket cannot be flocked
    before it exists, and every base generation's socket shares it)."""
    return sock.with_name(f".{sock.name}.lock")


def write_pidfile(path: Path, pid: int, lock: bool = False) -> int | None:
    """Write `pid` to `path` atomically, following no symlink.

    The temporary file is created with O_EXCL | O_NOFOLLOW: in a directory
    others may write to (/tmp, /run/user), a symlink planted at its
    (predictable) name makes this fail instead of overwriting the file it
    points to. os.replace() renames over `path` itself, never through a
    symlink there.
    """
    tmp = path.with_name(f".{path.name}.{pid}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"{pid}\n".encode())
        if lock:
            # locked before it appears under its name: `reload-base` and a
            # second Emperor see a pidfile that is held, or a stale one
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    if not lock:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        os.unlink(tmp)
        if lock:
            os.close(fd)
        raise
    return fd if lock else None


def pidfile_is_held(path: Path) -> bool:
    """True when a running Emperor holds the lock on the pidfile `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@dataclass
class Options:
    vassals_dir: Path
    program: str
    use_fork_server: Path | None = None
    fork_bases: tuple[str, ...] = ()
    mercy: float = 30.0
    adopt_timeout: float = 10.0
    template_timeout: float = render.DEFAULT_TIMEOUT  # a template rendering longer is killed
    rescan_interval: float = 10.0
    backoff_first: float = 1.0
    backoff_max: float = 180.0
    stable_after: float = 10.0
    reload_grace: float = 1.0
    deploy_parallel: int = 4
    adopt_parallel: int = 8  # adoption requests in flight at once
    # bind every vassal's http-socket in the Emperor; None: only when the
    # vassal program is ours (a uWSGI 2.0 vassal would bind its own)
    own_sockets: bool | None = None
    pidfile: Path | None = None
    status: Any = None  # status.StatusServer, sockets bound (cli --stats/--status-http)
    log: logs.Log | None = None  # where lines go (cli --log-format, --logto); default stderr
    # sockets of vassals with `domain` and no http-socket (run_dir/sockets),
    # the embedded nginx's files (run_dir/nginx)
    run_dir: Path | None = None
    front: FrontDoorOptions | None = None  # --http / --nginx-include


@dataclass
class ProcHandles:
    """The live OS objects of one process of a vassal (its state is a Proc)."""

    pipe: socket.socket | None = None
    config_pipe: socket.socket | None = None
    config_text: bytes | None = None
    adoption: PendingAdoption | None = None
    next_probe: float = 0.0
    fork_server: Path | None = None  # base: the socket it serves
    output: logs.OutputPipe | None = None  # adopted: its output pipe, passed with its config


@dataclass(frozen=True)
class ForVassal:
    """A selector callback about one vassal (its pipe, its adoption, its
    on-demand socket): whatever goes wrong in it is that vassal's failure."""

    name: str
    seq: int | None
    fn: Callable[[float], None]


def emperor_only_stripped(text: str) -> str:
    """The vassal file text without the keys only the Emperor reads."""
    out = []
    section = ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("[") and s.endswith("]"):
            section = s[1:-1].strip()
        elif section == cfgmod.SECTION and s and s[0] not in ";#":
            if s.partition("=")[0].strip() in EMPEROR_KEYS:
                continue
        out.append(line)
    return "\n".join(out) + "\n"


def is_our_program(program: str) -> bool:
    return os.path.basename(program) == "ForkServer.pm"


@dataclass
class Emperor:
    opts: Options
    vassals: dict[str, Vassal] = field(default_factory=dict)
    procs: dict[tuple[str, int], ProcHandles] = field(default_factory=dict)
    pids: dict[int, tuple[str, int]] = field(default_factory=dict)
    listeners: dict[str, Listener] = field(default_factory=dict)
    # pids reaped before we knew them (an adopted vassal may die before its
    # pid reaches us): pid -> (status, when)
    early_exits: dict[int, tuple[int, float]] = field(default_factory=dict)
    # orphans (e.g. workers of a vassal that was SIGKILLed) we asked to go:
    # pid -> when SIGKILL follows
    orphans: dict[int, float] = field(default_factory=dict)
    # sessions of vassal processes that ended: whatever is still in one of
    # them is an orphan of that process (orphans.py)
    ended: EndedSessions = field(default_factory=EndedSessions)
    # children in no vassal's session, logged once each
    unattributed: set[int] = field(default_factory=set)
    # a vassal process (or an orphan we stopped) ended since the last sweep:
    # what it left behind may be ours now
    sweep_due: bool = False
    swept_at_shutdown: bool = False
    shutting_down: bool = False
    shutdown_deadline: float = 0.0
    no_children: bool = False

    def __post_init__(self) -> None:
        # absolute, symlinks kept: a directory swapped under the same name
        # (`mv`, a symlink flipped, removed and re-created) is the one we
        # serve; its identity (_check_dir) tells when it was swapped
        self.dir = Path(os.path.abspath(self.opts.vassals_dir))
        self.dir_id: tuple[int, int] | None = None
        self.dir_missing = False
        self.argv0 = program_argv(self.opts.program)
        self.own_sockets = (
            self.opts.own_sockets if self.opts.own_sockets is not None
            else is_our_program(self.opts.program)
        )
        # vassal files are judged against our option table only when our
        # program reads them (uWSGI's vassals have uWSGI's options)
        self.judge = is_our_program(self.opts.program) and self.opts.use_fork_server is None
        self.policy = Policy(
            mercy=self.opts.mercy,
            backoff_first=self.opts.backoff_first,
            backoff_max=self.opts.backoff_max,
            stable_after=self.opts.stable_after,
            reload_grace=self.opts.reload_grace,
        )
        self.bases = cfgmod.BaseSelector.from_names(self.opts.fork_bases)
        self.sel = selectors.DefaultSelector()
        self.watcher: Watcher | None = None
        self.due: dict[str, float] = {}  # file names to re-read, and when
        self.next_rescan = 0.0
        self.external_ready = False
        self.external_next_probe = 0.0
        self.next_straggler_kill = 0.0
        self.bind_errors: dict[str, str] = {}  # last bind error logged, per vassal
        self.read_errors: dict[str, str] = {}  # transient read error logged, per vassal
        self.on_demand_registered: set[str] = set()
        self.lock_fds: list[int] = []  # flocks held while we run (claim())
        self.logbook = self.opts.log if self.opts.log is not None else logs.Log()
        self.relay = logs.Relay(self.logbook, self.sel)
        self.logbook.keep = lambda name, msgs: (
            self._remember(name, msgs) if name in self.vassals else None)
        self.start_progress = logs.StartProgress(self.log)
        self.deploys = basesmod.DeployTracker(self.log)
        self.wedges = basesmod.WedgeWatch()  # bases whose adoptions time out
        # templates render in children with a deadline; the file is read
        # again when a render ends
        self.renderer = render.Renderer(self.sel, lambda path: self.due.__setitem__(path.name, 0.0),
                                        timeout=self.opts.template_timeout)
        # the vassals must step again at once (the fork server changed, or a
        # deploy slot came free): the loop does not wait for the next event
        self.again = False
        self.fork_server_seen = ForkServer.NONE
        # the cockpit: recent log lines per vassal, metrics, systemd notify
        self.recent: dict[str, deque[str]] = {}
        self.metrics = EmperorMetrics()
        self.notifier = notify.Notifier.from_env(self.log)
        # vassals whose handling failed for a reason the same file would
        # meet again: name -> (fingerprint, reason); cleared when it changes
        self.failed: dict[str, tuple[str, str]] = {}
        self.mtimes: dict[str, int] = {}  # file mtime per vassal: `touch` reloads
        self.fds: launch.Descriptors | None = None
        self.max_vassals = 1 << 30  # set from the descriptor limit at start
        self.admitted: set[str] = set()  # vassals counted in the budget (bases are not)
        self.n_refused = 0
        self.socket_dir = self.opts.run_dir / "sockets" if self.opts.run_dir else None
        # `domain` names: a vassal refused for a name another one serves ->
        # that other one (its file is read again when the other lets go)
        self.domain_refused: dict[str, str] = {}
        self.front: FrontDoor | None = None
        if self.opts.front is not None:
            self.front = FrontDoor(self.opts.front, lambda m: self.log(m, "front"),
                                   watch=lambda fd, cb: self.sel.register(
                                       fd, selectors.EVENT_READ,
                                       lambda t, cb=cb: self._front_safely(cb, t)),
                                   unwatch=self._unwatch)

    # -- logging -------------------------------------------------------------

    def log(self, msg: str, name: str | None = None) -> None:
        if name:
            self._remember(name, [msg])
        self.logbook.emit(msg, name)

    def _remember(self, name: str, msgs: list[str]) -> None:
        """A vassal's recent lines (the status page shows them): the
        Emperor's about it and, relayed, its own (logs.Log.keep)."""
        lines = self.recent.get(name)
        if lines is None:
            lines = self.recent[name] = deque(maxlen=RECENT_LINES)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S ")
        lines.extend(stamp + m for m in msgs)

    # -- one exception boundary per vassal -------------------------------------

    def _dispatch(self, callback: Callable[[float], None], now: float) -> None:
        if isinstance(callback, ForVassal):
            with self._boundary(callback.name, now, callback.seq):
                callback.fn(now)
        else:
            callback(now)

    @contextlib.contextmanager
    def _boundary(self, name: str, now: float, seq: int | None = None) -> Iterator[None]:
        """Whatever goes wrong while handling one vassal (reading, rendering,
        sending its config, adopting, spawning, its bytes) is that vassal's
        failure: logged with the reason, and the loop goes on."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - the boundary: nothing of one vassal stops the fleet
            self._vassal_failed(name, seq, now, e)

    def _vassal_failed(self, name: str, seq: int | None, now: float, exc: Exception) -> None:
        """An OSError says something about the Emperor's resources (EMFILE,
        ENOMEM): throttled, tried again after the backoff. Anything else
        (a config too large for one packet, a name that cannot be encoded,
        a bug) would happen again with the same file: `config-error` until
        the file changes or is touched."""
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        why = str(exc) if isinstance(exc, (OSError, ProtocolError)) else f"{type(exc).__name__}: {exc}"
        where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
        v = self.vassals.get(name)
        if v is None:
            self.log(f"error: {why} (at {where})", name)
            return
        # a process whose start was under way: its handles closed (a vassal
        # forked anyway sees EOF on its pipe and stops), its start failed
        for p in v.procs():
            if p.pid is None:
                self._finish_adoption(name, p.seq)
                self._drop_proc(name, p.seq)
                v.start_failed(now, why, p.seq)
        if isinstance(exc, OSError):
            if v.current is None and v.phase != Phase.THROTTLED:
                v._throttle(now)
            self.log(f"cannot handle: {why} (at {where}); retry in "
                     f"{max(0.0, v.not_before - now):.1f} s", name)
            return
        again = self.failed.get(name, ("", ""))[1] == why
        if v.config is not None:
            self.failed[name] = (v.config.fingerprint, why)
            v.config = dataclasses.replace(v.config, error=why)
        if not v.has_process:
            self._close_listener(name)  # connections refused, not left in its backlog
        if not again:  # one line, not one per loop turn
            self.log(f"cannot handle: {why} (at {where}); config-error until its file "
                     "changes", name)

    # -- set-up --------------------------------------------------------------

    def _setup(self) -> None:
        self.claim()  # before anything starts (the CLI has usually done it)
        launch.set_child_subreaper()  # before anything is started
        self._descriptor_budget()
        os.chdir(self.dir)  # vassals inherit it as their working directory
        st = os.stat(".")
        self.dir_id = (st.st_dev, st.st_ino)
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                    signal.SIGUSR2):
            signal.signal(sig, self._on_signal)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wakeup)
        try:
            self.watcher = Watcher(self.dir)
            self.sel.register(self.watcher.fileno(), selectors.EVENT_READ, self._on_inotify)
        except OSError as e:
            self.log(f"inotify unavailable ({e}); rescanning every {self.opts.rescan_interval:g} s")
        if self.opts.status is not None:
            self.opts.status.attach(self)  # stats socket / status page in our selector
        if self.socket_dir is not None:
            try:
                self.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
            except OSError as e:
                self.log(f"cannot create {self.socket_dir}: {e.strerror or e}")
        self.log(
            f"watching {self.dir} (vassal program {' '.join(self.argv0)}, pid {os.getpid()})"
        )

    def claim(self) -> None:
        """Lock the vassals directory, the fork-server socket and the
        pidfile (then write it), so that a second Emperor on any of them
        refuses to start instead of fighting this one over ports and
        deleting its pidfile. Idempotent; StartupError is one line."""
        if self.lock_fds:
            return
        try:
            self.lock_fds.append(take_lock(self.dir, "vassals directory", directory=True))
            for sock in self._fork_server_sockets():
                if not sock.parent.is_dir():
                    continue  # the base's config error (config.judge_options), not ours
                self.lock_fds.append(take_lock(fork_server_lock_path(sock), "fork-server socket",
                                               create=True, shown=sock))
            pf = self.opts.pidfile
            if pf is not None:
                if os.path.lexists(pf) and not os.path.isdir(pf):
                    try:
                        held = pidfile_is_held(pf)
                    except OSError:
                        held = False  # a dangling symlink, say: replaced below
                    if held:
                        raise StartupError(f"pidfile {pf} is held by a running Emperor "
                                           f"(pid {pf.read_text().strip()}): not starting a second one")
                try:
                    fd = write_pidfile(pf, os.getpid(), lock=True)
                except OSError as e:
                    raise StartupError(f"pidfile {pf}: {e.strerror or e}") from None
                assert fd is not None
                self.lock_fds.append(fd)
        except StartupError:
            self.release()
            raise

    def release(self) -> None:
        for fd in self.lock_fds:
            os.close(fd)
        self.lock_fds.clear()

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
            cfg = cfgmod.load(path, render=render.render_with_deadline)
            if cfg is None or cfg.error or not self.bases.is_base(cfg):
                continue
            sock = cfg.fork_server_path()
            if sock is not None and sock not in out:
                out.append(sock)
        return out
    def _descriptor_budget(self) -> None:
        """Raise the soft descriptor limit to the hard one, and admit only as
        many vassals as it leaves room for: the others are `refused` (and
        admitted once room is made), rather than failing at random."""
        fds = self.fds = launch.raise_nofile()
        reserved = FDS_RESERVED + self.opts.adopt_parallel
        self.max_vassals = max(1, (fds.soft - reserved) // FDS_PER_VASSAL)
        raised = f" (raised from {fds.inherited})" if fds.soft > fds.inherited else ""
        self.log(f"descriptors: limit {fds.soft}{raised}, hard limit {fds.hard}: room for "
                 f"{self.max_vassals} vassals ({FDS_PER_VASSAL} each, {reserved} reserved)")

    def _admit(self, v: Vassal, is_base: bool) -> None:
        """A vassal new to the Emperor: admitted if the budget has room. A
        base always is (every adopted vassal needs it), within the reserve."""
        if is_base:
            return
        if len(self.admitted) < self.max_vassals:
            self.admitted.add(v.name)
            return
        v.refused = (f"refused: no descriptors to spare (limit {self.fds.soft if self.fds else '?'}"
                     f": room for {self.max_vassals} vassals)")
        self.n_refused += 1
        if self.n_refused == 1 or self.n_refused % 100 == 0:  # not one line each
            self.log(f"{v.refused}; {self.n_refused} vassal(s) refused now, "
                     "admitted once others go", v.name)

    def _admit_refused(self) -> None:
        """Room was made (vassals removed): admit the refused, by name."""
        for v in sorted(self.vassals.values(), key=lambda v: v.name):
            if self.n_refused == 0 or len(self.admitted) >= self.max_vassals:
                return
            if v.refused:
                v.refused = None
                self.n_refused -= 1
                self.admitted.add(v.name)
                self.log("admitted: descriptors to spare again", v.name)

    def _teardown(self) -> None:
        self.relay.close()
        self.renderer.close()
        if self.front is not None:
            self.front.close()
        for name in list(self.listeners):
            self._close_listener(name)
        if self.opts.pidfile is not None:
            try:
                if self.opts.pidfile.read_text().strip() == str(os.getpid()):
                    self.opts.pidfile.unlink()
            except OSError:
                pass
        self.release()

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
                    self.renderer.close()  # no template matters any more
            elif signum == signal.SIGHUP:
                self.next_rescan = now
            elif signum == signal.SIGUSR1:
                self.reload_base()
            elif signum == signal.SIGUSR2:
                self.reopen_logs()

    def reopen_logs(self) -> list[str]:
        """SIGUSR2, `emperor reopen-logs`: every log file reopened by its
        path (logrotate renamed it); the reasons of those that could not be."""
        errors = self.logbook.reopen()
        for err in errors:
            self.log(f"reopen-logs: {err}")
        self.log("reopen-logs: log files reopened")
        return errors

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

    def _on_inotify(self, now: float) -> None:
        assert self.watcher is not None
        for ev in self.watcher.read():
            if ev.rescan or ev.directory_gone:
                self.next_rescan = now
                if ev.directory_gone:
                    self.log("vassals directory moved or deleted")
                continue
            if not cfgmod.is_vassal_file(ev.name):
                continue
            when = now + SETTLE if ev.created_only else now
            self.due[ev.name] = min(self.due.get(ev.name, when), when)

    def _on_pipe(self, name: str, seq: int, now: float) -> None:
        h = self.procs.get((name, seq))
        if h is None or h.pipe is None:
            return
        try:
            data = h.pipe.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_pipe(name, seq)
            return
        v = self.vassals.get(name)
        if v is None:
            return
        p = v.proc(seq)
        for b in data:
            if b == VassalByte.CONFIG_AGAIN and h.config_pipe is not None and h.config_text:
                self._send_config(h)
                continue
            note = v.on_byte(b, now, seq)
            if note and p is not None:
                ms = (now - p.started_at) * 1000 if p.started_at is not None else 0.0
                self.log(f"{note} (pid {p.pid}, {ms:.1f} ms after start)", name)

    def _on_listener(self, name: str, now: float) -> None:
        v = self.vassals.get(name)
        if v is not None and not v.woken:
            v.on_connection(now)
            self.log("connection waiting: starting on demand", name)
        self._unregister_listener(name)

    def _on_adoption(self, name: str, seq: int, now: float) -> None:
        h = self.procs[(name, seq)]
        v = self.vassals[name]
        pending = h.adoption
        assert pending is not None
        try:
            pid = pending.on_readable()
        except AdoptionError as e:
            self._adoption_failed(name, seq, now, str(e))
            return
        if pid is None:
            return
        self._finish_adoption(name, seq)
        self.metrics.adopted(pending.elapsed_ms(now) / 1000)
        v.adopted(pid, now, seq)
        if (p := v.proc(seq)) is not None:
            self.wedges.replied(p.base_generation)
        self.pids[pid] = (name, seq)
        p = v.proc(seq)
        what = "successor " if p is v.successor else ""
        gen = f", base generation {p.base_generation}" if p else ""
        self.log(f"adopted {what}pid {pid} from base ({pending.elapsed_ms(now):.1f} ms{gen})", name)
        if h.pipe is not None:
            self.sel.register(h.pipe, selectors.EVENT_READ,
                              ForVassal(name, seq, lambda t, n=name, q=seq: self._on_pipe(n, q, t)))
        early = self.early_exits.pop(pid, None)
        if early is not None:
            self.pids.pop(pid, None)
            self._vassal_exited(name, seq, pid, early[0], now)

    def _finish_adoption(self, name: str, seq: int) -> None:
        h = self.procs.get((name, seq))
        if h is not None and h.adoption is not None:
            try:
                self.sel.unregister(h.adoption.sock)
            except (KeyError, ValueError):
                pass
            h.adoption.close()
            h.adoption = None

    def _adoption_failed(self, name: str, seq: int, now: float, reason: str) -> None:
        self.metrics.adoption_failed()
        self._finish_adoption(name, seq)
        self._drop_proc(name, seq)  # a vassal forked anyway sees EOF and stops
        v = self.vassals[name]
        self._start_failed_for_deploy(v, seq, now, f"adoption failed: {reason}")
        v.start_failed(now, reason, seq)
        v.last_error = f"adoption failed: {reason}"
        self.log(f"adoption failed: {reason}; retry in {max(0, v.not_before - now):.1f} s", name)

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
            owner = self.pids.pop(pid, None)
            if owner is not None:
                with self._boundary(owner[0], now):
                    self._vassal_exited(owner[0], owner[1], pid, status, now)
            elif self.renderer.reaped(pid):
                continue
            elif self.front is not None and self.front.owns(pid):
                self.front.exited(pid, status, now, describe_status)
            else:
                if self.orphans.pop(pid, None) is not None:
                    self.sweep_due = True  # its own children came to us
                self.unattributed.discard(pid)
                self.early_exits[pid] = (status, now)
                self.log(f"reaped pid {pid} ({describe_status(status)})")

    def _vassal_exited(self, name: str, seq: int, pid: int, status: int, now: float) -> None:
        v = self.vassals[name]
        self._drop_proc(name, seq)
        # what it forked and left behind is ours now: swept once this turn
        self.ended.add(pid, name)
        self.sweep_due = True
        st = describe_status(status)
        statusmod.forget_requests(pid)  # its requests file, if it wrote one
        p = v.proc(pid=pid)
        if p is not None and p is v.successor:
            self._start_failed_for_deploy(v, p.seq, now, f"pid {pid} died ({st})")
        what = v.exited(status, now, pid)
        if what == "retired":
            self.log(f"old pid {pid} stopped ({st})", name)
        elif what == "stopped":
            self.log(f"pid {pid} stopped ({st})", name)
        elif what == "successor died":
            v.last_error = f"new pid {pid} died ({st})"
            self.log(f"new pid {pid} died ({st}); old one keeps serving; retry in "
                     f"{max(0.0, v.not_before - now):.1f} s", name)
        elif what == "died (successor took over)":
            self.log(f"pid {pid} died ({st}); its successor pid {v.pid} takes over", name)
        else:
            # a base killed as wedged keeps that reason in the status
            v.last_error = self.wedges.exited(pid) or f"pid {pid} died ({st})"
            self.log(f"pid {pid} died ({st}); respawn in {v.backoff:.1f} s"
                     + (" (throttled)" if v.failures > 0 else ""), name)

    def _drop_proc(self, name: str, seq: int) -> None:
        self._close_pipe(name, seq)
        h = self.procs.pop((name, seq), None)
        if h is not None and h.config_pipe is not None:
            h.config_pipe.close()
            h.config_pipe = None

    def _close_pipe(self, name: str, seq: int) -> None:
        h = self.procs.get((name, seq))
        if h is None or h.pipe is None:
            return
        try:
            self.sel.unregister(h.pipe)
        except (KeyError, ValueError):
            pass
        h.pipe.close()
        h.pipe = None

    # -- desired state: the files ---------------------------------------------

    def _check_dir(self, now: float) -> bool:
        """Is the vassals directory the one we watch? A new directory under
        its name (removed and re-created, `mv new dir`, a symlink flipped):
        it becomes our working directory and is watched, and the caller
        rereads every file (vassals whose config is the same keep running).
        False while there is no directory: the fleet is left as it is (a
        removed file stops its vassal; a directory moved away removes
        nothing) and the name is looked at again soon."""
        try:
            st = os.stat(self.dir)
        except OSError as e:
            if not self.dir_missing:
                self.log(f"vassals directory {self.dir}: {e.strerror or e}; the fleet is "
                         f"left as it is, looking again every {RETRY_READ:g} s")
            self.dir_missing = True
            self.next_rescan = now + RETRY_READ
            return False
        self.dir_missing = False
        ident = (st.st_dev, st.st_ino)
        if ident == self.dir_id:
            return True
        self.dir_id = ident
        self.log(f"vassals directory {self.dir} is a new directory: watching it, "
                 "reading every file again")
        try:
            os.chdir(self.dir)
        except OSError as e:
            self.log(f"cannot enter {self.dir}: {e.strerror or e}")
        self._rewatch()
        self.mtimes.clear()  # its files are new files, not touched ones
        for v in self.vassals.values():
            # a base serving on a socket in the old directory (a relative
            # `fork-server`): a new generation in this one, every adopted
            # vassal moving onto it without closing its port
            cur = v.current
            fs = cur.config.fork_server if cur is not None else None
            if cur is not None and cur.kind == Kind.BASE and fs and not os.path.isabs(fs):
                v.request_deploy()
                self.log("its fork-server socket was in the old directory: "
                         f"base generation {v.want_base_generation}", v.name)
        return True

    def _rewatch(self) -> None:
        """inotify on the directory now under our name (the old watch died
        with the old directory, or watches one moved elsewhere)."""
        if self.watcher is not None:
            try:
                self.sel.unregister(self.watcher.fileno())
            except (KeyError, ValueError):
                pass
            self.watcher.close()
            self.watcher = None
        try:
            self.watcher = Watcher(self.dir)
            self.sel.register(self.watcher.fileno(), selectors.EVENT_READ, self._on_inotify)
        except OSError as e:
            self.log(f"inotify unavailable ({e}); rescanning every {self.opts.rescan_interval:g} s")

    def _rescan(self, now: float) -> None:
        if not self._check_dir(now):
            return
        try:
            found = cfgmod.discover(self.dir)
        except OSError as e:  # EMFILE, ENOMEM, ...: keep what we know, try again
            self.log(f"cannot scan {self.dir}: {e.strerror or e}; retry in {RETRY_READ:g} s")
            self.next_rescan = now + RETRY_READ
            return
        # by name: of two files claiming one `domain`, the first keeps it;
        # refusals: the last by name
        for name in sorted(set(found) | set(self.vassals)):
            path = found.get(name)
            with self._boundary(name, now):
                self._load(name, path, now)
        self.next_rescan = now + self.opts.rescan_interval

    def _reload_due(self, now: float) -> None:
        for fname, when in list(self.due.items()):
            if when <= now:
                del self.due[fname]
                name = cfgmod.vassal_name(fname)
                with self._boundary(name, now):
                    self._load(name, self.dir / fname, now)

    def _load(self, name: str, path: Path | None, now: float) -> None:
        cfg = (cfgmod.load(path, judge=self.judge, render=self.renderer.render)
               if path is not None else None)
        if cfg is not None and cfg.pending:
            return  # a template rendering: read again when it ends (self.renderer)
        if cfg is not None and cfg.transient:
            # out of descriptors or memory: says nothing about the file;
            # keep the vassal as it is and read the file again soon
            if self.read_errors.get(name) != cfg.error:
                self.log(f"cannot read {cfg.path.name}: {cfg.error}; retrying every "
                         f"{RETRY_READ:g} s", name)
            self.read_errors[name] = cfg.error or ""
            assert path is not None
            self.due[path.name] = min(self.due.get(path.name, now + RETRY_READ), now + RETRY_READ)
            return
        if self.read_errors.pop(name, None) is not None:
            self.log(f"{path.name if path else name} read again", name)
        self._apply(name, cfg, self._touched(name, cfg))

    def _touched(self, name: str, cfg: cfgmod.VassalConfig | None) -> bool:
        """The file's mtime changed while its content did not (`touch
        app.ini`): uWSGI reloads the vassal then, and so do we."""
        mtime = None
        if cfg is not None:
            try:
                mtime = os.stat(cfg.path).st_mtime_ns
            except OSError:
                pass
        old = self.mtimes.pop(name, None)
        if mtime is None:
            return False
        self.mtimes[name] = mtime
        v = self.vassals.get(name)
        return (old is not None and old != mtime and v is not None and v.config is not None
                and v.config.fingerprint == cfg.fingerprint)

    def _apply(self, name: str, cfg: cfgmod.VassalConfig | None, touched: bool = False) -> None:
        v = self.vassals.get(name)
        failed = self.failed.get(name)
        if failed is not None and cfg is not None:
            if touched or cfg.fingerprint != failed[0]:
                del self.failed[name]  # changed or touched: try it again
                if v is not None and v.config is not None and v.config.error == failed[1]:
                    v.config = dataclasses.replace(v.config, error=None)
            elif cfg.error is None:
                cfg = dataclasses.replace(cfg, error=failed[1])
        elif cfg is None:
            self.failed.pop(name, None)
        if cfg is not None and not cfg.error:
            cfg = self._claim_domains(name, cfg)
        for other, blocker in list(self.domain_refused.items()):
            if blocker == name and other != name:  # it may be free now: read again
                ov = self.vassals.get(other)
                if ov is not None and ov.config is not None:
                    self.due[ov.config.path.name] = time.monotonic()
        if cfg is not None and cfg.error:
            if v is None or v.config is None or v.config.fingerprint != cfg.fingerprint:
                self.log(f"bad config {cfg.path}: {cfg.error}", name)
        is_base = cfg is not None and self.bases.is_base(cfg)
        if v is None:
            if cfg is None:
                return
            v = Vassal(name, cfg, is_base=is_base, policy=self.policy)
            self.vassals[name] = v
            self._admit(v, is_base)
            return
        if v.update_config(cfg, is_base):
            if cfg is None:
                self.log("file removed", name)
                self._close_listener(name)  # the running process keeps its copy
            elif v.has_process:
                self.log("file changed", name)
        elif touched and cfg is not None and cfg.error is None:
            v.touch()
            if v.has_process:
                self.log("file touched: reloading", name)

    # -- Emperor-owned sockets ------------------------------------------------

    def _listener(self, v: Vassal, now: float) -> tuple[bool, Listener | None]:
        """(ok, the socket to pass) for starting a process of v."""
        if not self.own_sockets or v.is_base or v.config is None:
            return True, None
        want = sockets.wanted_address(v.config, self.socket_dir)
        if want is None:
            return True, None
        addr, backlog = want
        owner = self._socket_owner(v.config) if sockets.is_unix_address(addr) else (None, None)
        old = self.listeners.get(v.name)
        if old is not None and old.addr == addr and old.backlog == backlog \
                and old.owner == owner:
            return True, old
        if old is not None and old.addr == addr:
            self._close_listener(v.name)  # the same path, bound anew
            old = None
        try:
            sock = sockets.bind_listener(addr, backlog, *owner)
        except (OSError, ValueError) as e:
            msg = f"cannot bind http-socket {addr}: {getattr(e, 'strerror', None) or e}"
            if self.bind_errors.get(v.name) != msg:
                self.log(msg, v.name)
            self.bind_errors[v.name] = msg
            v.last_error = msg
            return False, None
        self.bind_errors.pop(v.name, None)
        if old is not None:
            self._close_listener(v.name)
            self.log(f"address changed: {old.addr} closed, {addr} bound", v.name)
        if sockets.is_unix_address(addr):
            mode = v.config.get("chmod-socket")
            if mode:
                try:
                    os.chmod(addr, int(mode, 8))
                except (OSError, ValueError):
                    pass
        lst = Listener(addr, backlog, sock, owner)
        self.listeners[v.name] = lst
        return True, lst

    @staticmethod
    def _socket_owner(cfg: cfgmod.VassalConfig) -> tuple[int | None, int | None]:
        """uid, gid a vassal's UNIX socket belongs to: `chown-socket`, else
        its `uid`/`gid`."""
        chown = cfg.get("chown-socket")
        if chown:
            try:
                return cfgmod.parse_owner(chown)
            except ValueError:
                pass
        out: list[int | None] = []
        for key, conv in (("uid", cfgmod.CHECKERS["user"]), ("gid", cfgmod.CHECKERS["group"])):
            raw = cfg.get(key)
            try:
                out.append(int(conv(raw)) if raw else None)  # type: ignore[arg-type]
            except ValueError:
                out.append(None)
        return out[0], out[1]

    # -- the front door -------------------------------------------------------

    def _claim_domains(self, name: str, cfg: cfgmod.VassalConfig) -> cfgmod.VassalConfig:
        """`cfg`, or a config error naming the vassal that already serves one
        of its `domain` names (exact names: a wildcard and a name under it
        may live side by side, the exact one wins)."""
        mine = {d.lower() for d in cfg.get_all("domain")}
        if not mine:
            self.domain_refused.pop(name, None)
            return cfg
        for other in sorted(self.vassals):
            oc = self.vassals[other].config
            if other == name or oc is None or oc.error:
                continue
            both = mine & {d.lower() for d in oc.get_all("domain")}
            if both:
                d = min(both)
                line = next((n for n, k, val in cfgmod.parse_ini_lines(cfg.text)[0]
                             if k == "domain" and val.lower() == d), 0)
                where = f"{cfg.path.name} (rendered)" if cfg.rendered else cfg.path.name
                self.domain_refused[name] = other
                return dataclasses.replace(
                    cfg, options=(), fingerprint=cfg.fingerprint + ":domain",
                    error=f"{where}:{line}: domain {d} is already served by vassal "
                          f"{other} ({oc.path.name})")
        self.domain_refused.pop(name, None)
        return cfg

    def routes(self) -> list[Route]:
        """The routing facts of every vassal with a `domain`: its socket,
        and whether it can answer (a throttled vassal, or one whose socket
        is not bound, is answered by the front door with 503)."""
        out = []
        for v in self.vassals.values():
            if v.is_base:
                continue
            cfg = v.config if v.config is not None and not v.config.error else v.running
            if cfg is None:
                continue
            domains = tuple(sorted({d.lower() for d in cfg.get_all("domain")}))
            if not domains:
                continue
            lst = self.listeners.get(v.name)
            addr = lst.addr if lst is not None else None
            if addr is None and not self.own_sockets:
                want = sockets.wanted_address(cfg, self.socket_dir)
                addr = want[0] if want is not None and v.has_process else None
            # stopped (`emperor stop`) or refused (no descriptors): its
            # clients would wait in the backlog; better told to come back
            down = addr is None or v.phase in (Phase.THROTTLED, Phase.CONFIG_ERROR,
                                               Phase.STOPPED, Phase.REFUSED)
            retry = math.ceil(v.backoff) if v.phase == Phase.THROTTLED else 1
            out.append(Route(v.name, domains, nginx_target(addr) if addr else "",
                             up=not down, retry_after=retry,
                             protocol="uwsgi" if cfg.get("socket") else "http"))
        return out

    def _front_turn(self, now: float) -> None:
        assert self.front is not None
        if not self.shutting_down:
            self.front.update(self.routes(), now)
        self.front.poll(now)

    def _front_safely(self, fn, now: float) -> None:
        """The front door's boundary: what goes wrong there is logged, and
        the vassals go on (they serve on their sockets without it)."""
        try:
            fn(now)
        except Exception as e:  # noqa: BLE001 - the boundary
            frame = traceback.extract_tb(e.__traceback__)[-1]
            self.log(f"error: {type(e).__name__}: {e} (at {os.path.basename(frame.filename)}:"
                     f"{frame.lineno})", "front")

    def _unwatch(self, fd: int) -> None:
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _close_listener(self, name: str) -> None:
        self._unregister_listener(name)
        lst = self.listeners.pop(name, None)
        if lst is not None:
            lst.close()

    def _unregister_listener(self, name: str) -> None:
        if name in self.on_demand_registered:
            self.on_demand_registered.discard(name)
            lst = self.listeners.get(name)
            if lst is not None:
                try:
                    self.sel.unregister(lst.sock)
                except (KeyError, ValueError):
                    pass

    def _watch_on_demand(self, v: Vassal, now: float) -> None:
        """An on-demand vassal without process: its socket in the selector."""
        if v.phase != Phase.ON_DEMAND:
            self._unregister_listener(v.name)
            return
        if v.name in self.on_demand_registered:
            return
        ok, lst = self._listener(v, now)
        if lst is None:
            if not ok:  # port in use: throttle, like a failed start
                v.not_before = now
                v._throttle(now)
            return
        self.sel.register(lst.sock, selectors.EVENT_READ,
                          ForVassal(v.name, None, lambda t, n=v.name: self._on_listener(n, t)))
        self.on_demand_registered.add(v.name)
        self.log(f"on demand: waiting for a connection on {lst.addr}", v.name)

    def _config_text(self, cfg: cfgmod.VassalConfig, always: bool = False) -> bytes | None:
        """What to send on a config pipe: a rendered template, or a file with
        Emperor-only keys (the vassal program would reject them); else None.
        With `always`, any file's text: an adopted vassal of ours takes its
        output pipe from the config packet (logs.py)."""
        if getattr(cfg, "rendered", False):
            text = emperor_only_stripped(getattr(cfg, "text", "") or "")
        elif always or any(k in EMPEROR_KEYS for k, _ in cfg.options):
            raw = getattr(cfg, "text", None)
            if raw is None:
                try:
                    raw = cfg.path.read_text(errors="replace")
                except OSError:
                    raw = ""
            text = emperor_only_stripped(raw)
        else:
            return None
        data = text.encode("utf-8", "surrogateescape")
        if always and len(data) > protocol.MAX_BODY and not getattr(cfg, "rendered", False) \
                and not any(k in EMPEROR_KEYS for k, _ in cfg.options):
            return None  # it reads its file itself; its output stays the base's
        if len(data) > protocol.MAX_BODY:
            # checked before any pipe or process exists for it
            raise ProtocolError(f"config of {len(data)} bytes exceeds {protocol.MAX_BODY}: "
                                "it must fit one config packet")
        return data

    def _output(self, v: Vassal, cfg: cfgmod.VassalConfig) -> logs.OutputPipe | None:
        """A new process's output pipe (logs.py), its vassal's `logto` file
        (re)opened; None, logged, if the pipe cannot be made: the process
        then writes to the Emperor's stderr as it is."""
        logto = cfg.get("logto") if hasattr(cfg, "get") else None
        err = self.logbook.set_logto(v.name, self.dir / logto if logto else None)
        if err is not None:
            self.log(f"logto: {err}; its lines go to the Emperor's log", v.name)
        try:
            return logs.OutputPipe()
        except OSError as e:
            self.log(f"cannot make its output pipe: {e.strerror or e}; its output is "
                     "not attributed", v.name)
            return None

    def pid_of(self, name: str, seq: int) -> int | None:
        """A vassal process's pid, once known (for its relayed lines)."""
        v = self.vassals.get(name)
        p = v.proc(seq) if v is not None else None
        return p.pid if p is not None else None

    def _send_config(self, h: ProcHandles) -> None:
        assert h.config_pipe is not None and h.config_text is not None
        try:
            out = h.output.wfd if h.output is not None and h.output.wfd >= 0 else None
            launch.send_config(h.config_pipe, h.config_text, output_fd=out)
        except OSError as e:
            self.log(f"config pipe: {e}")

    # -- the fork server --------------------------------------------------------

    def _base(self) -> Vassal | None:
        """The base vassal adopted vassals are forked from (first by name)."""
        for name in sorted(self.vassals):
            v = self.vassals[name]
            if (v.is_base and v.config is not None) or v.kind == Kind.BASE and v.has_process:
                return v
        return None

    def base_socket_path(self, cfg: cfgmod.VassalConfig | None, generation: int) -> Path | None:
        """The socket base generation `generation` serves (bases.socket_path);
        generation 1's is `--use-fork-server SOCK`, else the file's `fork-server`."""
        root = self.opts.use_fork_server
        if root is None and cfg is not None:
            root = cfg.fork_server_path()
        return basesmod.socket_path(root, generation)

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
                Phase.RUNNING, Phase.LOYAL)
            return (ForkServer.READY, cur.base_generation) if ready else (ForkServer.WAITING, 0)
        if self.opts.use_fork_server is None:
            return ForkServer.NONE, 0
        # an external fork server (e.g. a uWSGI base we do not run)
        if not self.external_ready and now >= self.external_next_probe:
            self.external_ready = forkserver.probe(self.opts.use_fork_server)
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
        elif p.reason == basesmod.CODE_DEPLOY:
            self.deploys.move_failed(v.name, why)

    def deploy_status(self) -> dict[str, Any]:
        """The deploys in the stats document (`emperor.deploy`): what
        `emperor reload-base --wait` waits on."""
        return self.deploys.as_dict(time.monotonic(), self._base())

    def _base_timed_out(self, generation: int) -> None:
        """An adoption from base `generation` got no reply: a wedged base
        (bases.WedgeWatch) is killed; its ordinary restart replaces it."""
        base = self._base()
        wedged = self.wedges.timed_out(base, generation, self.opts.adopt_timeout)
        if base is None or wedged is None:
            return
        pid, why = wedged
        base.last_error = why
        self.log(f"base {why}", base.name)
        try:
            os.kill(pid, signal.SIGKILL)  # the base alone: its adopted vassals keep serving
        except ProcessLookupError:
            pass

    def _base_back(self, now: float, fs: ForkServer, others: list[Vassal]) -> None:
        """The fork server is ready again (a removed or crashed base is
        back): vassals that were waiting for it in a crash-loop backoff (a
        plain start that could not load the base's code, a failed adoption)
        are adopted now, not after a backoff of up to `backoff_max`."""
        if fs == ForkServer.READY and self.fork_server_seen != ForkServer.READY:
            for v in others:
                if v.phase == Phase.THROTTLED and not v.has_process and v.not_before > now:
                    v.failures = 0
                    v.not_before = now
                    self.log("fork server ready: starting now, not after the back-off", v.name)
        self.fork_server_seen = fs

    def _probe_bases(self, now: float) -> None:
        """A base that sends no byte 1 (uWSGI's) is ready once its socket accepts."""
        for name, v in self.vassals.items():
            for p in (v.current, v.successor):
                if p is None or p.kind != Kind.BASE or p.state != Phase.STARTING:
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
                if path is not None and forkserver.probe(path):  # never raises
                    if v.mark_ready(now, p.seq):
                        ms = (now - p.started_at) * 1000
                        self.log(f"fork server {path} accepts (pid {p.pid}, {ms:.1f} ms)", name)

    # -- actions -----------------------------------------------------------------

    def _spawn(self, v: Vassal, kind: Kind, seq: int, now: float) -> None:
        p = v.proc(seq)
        assert p is not None
        h = ProcHandles()
        ok, lst = self._listener(v, now)
        if not ok:
            v.start_failed(now, "bind", seq)
            return
        text = self._config_text(p.config)
        pairs = self._socketpairs(v, seq, now, text is not None)
        if pairs is None:
            return
        ours, pipe_fd, config_fd, to_close = self._split_pipes(h, pairs, text)
        out = self._output(v, p.config)
        argv = [*self.argv0, "--ini", str(p.config.path)]
        if kind == Kind.BASE:
            h.fork_server = self.base_socket_path(p.config, p.base_generation)
            if p.base_generation > 1 and h.fork_server is not None:
                argv += ["--fork-server", str(h.fork_server)]
        try:
            pid = launch.spawn_vassal(
                argv, os.environ, pipe_fd, config_fd,
                lst.fileno() if lst is not None else None,
                nofile=self.fds.inherited if self.fds is not None else None,
                output_fd=out.wfd if out is not None else None,
            )
        except OSError as e:
            if out is not None:
                out.close()
            self._start_failed_for_deploy(v, seq, now, f"cannot start {argv[0]}: {e.strerror}")
            self._abandon_start(v, seq, now, h, ours, str(e))
            self.log(f"cannot start {argv[0]}: {e.strerror}; retry in {v.backoff:.1f} s", v.name)
            return
        finally:
            for s in to_close:
                s.close()
        self._keep_pipes(v, seq, h, ours)
        if out is not None:
            self.relay.watch(out, v.name, lambda: pid)
        self.sel.register(ours, selectors.EVENT_READ,
                          ForVassal(v.name, seq, lambda t, n=v.name, q=seq: self._on_pipe(n, q, t)))
        v.spawned(pid, now, seq)
        self.pids[pid] = (v.name, seq)
        extra = f" ({p.reason})" if p.reason != "start" else ""
        gen = f", generation {p.base_generation}" if kind == Kind.BASE else ""
        self.log(f"started {kind} vassal, pid {pid}{gen}{extra}", v.name)

    @staticmethod
    def _split_pipes(h: ProcHandles, pairs: list[launch.Pipe], text: str | None
                     ) -> tuple[socket.socket, int, int | None, list[socket.socket]]:
        """Our end of the Emperor pipe (the config pipe's goes into `h`), the
        descriptors to pass, and the vassal's ends to close once passed."""
        ours, theirs = pairs[0]
        to_close = [theirs]
        config_fd = None
        if text is not None:
            h.config_pipe, ctheirs = pairs[1]
            h.config_text = text
            config_fd = ctheirs.fileno()
            to_close.append(ctheirs)
        return ours, theirs.fileno(), config_fd, to_close

    def _abandon_start(self, v: Vassal, seq: int, now: float, h: ProcHandles,
                       ours: socket.socket, why: str) -> None:
        """The spawn or adoption failed after its pipes were made: close our
        ends; the vassal retries after its backoff."""
        ours.close()
        if h.config_pipe is not None:
            h.config_pipe.close()
        v.start_failed(now, why, seq)
        v.last_error = f"cannot start: {why}"

    def _keep_pipes(self, v: Vassal, seq: int, h: ProcHandles, ours: socket.socket) -> None:
        """The new process exists (or its adoption is under way): its pipes
        are tracked from now on, and its config goes out on the config pipe."""
        if h.config_pipe is not None:
            self._send_config(h)
        ours.setblocking(False)
        h.pipe = ours
        self.procs[(v.name, seq)] = h

    def _socketpairs(self, v: Vassal, seq: int, now: float,
                     config: bool) -> list[launch.Pipe] | None:
        """The Emperor pipe (and the config pipe) for a new process; None,
        with the start failed, logged and retried after a backoff, when
        they cannot be created (out of descriptors: EMFILE, ENFILE)."""
        try:
            return launch.make_pipes(config)
        except OSError as e:
            v.start_failed(now, str(e), seq)
            self.log(f"cannot create the Emperor pipe: {e.strerror or e}; "
                     f"retry in {max(0.0, v.not_before - now):.1f} s", v.name)
            return None

    def _adopt(self, v: Vassal, seq: int, now: float) -> None:
        p = v.proc(seq)
        assert p is not None
        # the generation step() chose (Proc.base_generation): during a deploy
        # the old one listens too, and a moved vassal must come from the new one
        path = self._fork_server_path(p.base_generation)
        assert path is not None
        ok, lst = self._listener(v, now)
        if not ok:
            v.start_failed(now, "bind", seq)
            return
        h = ProcHandles()
        argv = [self.opts.program, "--ini", str(p.config.path)]
        text = self._config_text(p.config, always=self.judge)
        pairs = self._socketpairs(v, seq, now, text is not None)
        if pairs is None:
            return
        ours, pipe_fd, config_fd, to_close = self._split_pipes(h, pairs, text)
        if self.judge:  # our program takes its output pipe from the config packet
            h.output = self._output(v, p.config)
        try:
            pending = forkserver.start_adoption(
                path, argv, pipe_fd, config_fd=config_fd,
                on_demand_fd=lst.fileno() if lst is not None else None,
                timeout=self.opts.adopt_timeout,
            )
        except AdoptionError as e:
            if h.output is not None:
                h.output.close()
            self.external_ready = False
            self._start_failed_for_deploy(v, seq, now, f"adoption failed: {e}")
            self._abandon_start(v, seq, now, h, ours, str(e))
            self.log(f"adoption failed: {e}; retry in {max(0, v.not_before - now):.1f} s", v.name)
            return
        finally:
            for s in to_close:
                s.close()
        h.adoption = pending
        self._keep_pipes(v, seq, h, ours)
        if h.output is not None:
            self.relay.watch(h.output, v.name, lambda: self.pid_of(v.name, seq))
        self.sel.register(pending.sock, selectors.EVENT_READ,
                          ForVassal(v.name, seq, lambda t, n=v.name, q=seq: self._on_adoption(n, q, t)))
        if p.reason != "start":
            self.log(f"starting a successor ({p.reason})", v.name)

    def _send(self, v: Vassal, seq: int, byte: EmperorByte) -> None:
        h = self.procs.get((v.name, seq))
        if h is None or h.pipe is None:
            return
        try:
            launch.send_byte(h.pipe, byte)
        except OSError:
            pass  # it is exiting anyway; reaping will tell

    def _sweep_orphans(self, now: float, everything: bool = False) -> None:
        """Children in the session of a vassal process that ended get
        SIGTERM, then SIGKILL after the mercy timeout; children of running
        vassals are left alone, and so (until shutdown) are children in no
        vassal's session (orphans.py). With `everything` (shutdown, no
        vassal left), every child we did not start is stopped.

        One pass over /proc, called at most once per loop turn, and only
        after a vassal process ended (or an orphan, whose own children come
        to us then), never once per exit."""
        self.sweep_due = False
        try:
            scan = scan_proc(os.getpid())
        except OSError as e:  # out of descriptors: try again next turn
            self.sweep_due = True
            self.log(f"cannot look for orphans: {e.strerror or e}")
            return
        self.ended.prune(scan.sessions)
        live = self.pids if self.front is None else {**self.pids, **self.front.pids()}
        found = classify_orphans(scan.children, live, self.ended.by_sid)
        victims = dict(found.orphans)
        if everything:
            victims.update((pid, "") for pid in found.unknown)
        else:
            # A vassal adopted this turn leads its session before its pid
            # reply is read: not worth a line while an adoption is in flight.
            adopting = any(h.adoption is not None for h in self.procs.values())
            for pid in found.unknown - self.unattributed - self.renderer.pids:
                if spare_of(pid) is not None:
                    continue
                if adopting and scan.children.get(pid) == pid:
                    continue
                self.unattributed.add(pid)
                self.log(f"pid {pid} ({_comm(pid)}) is in no vassal's session "
                         f"(session {scan.children.get(pid)}): left alone until shutdown")
        for pid, name in victims.items():
            if pid in self.orphans:
                continue
            comm = _comm(pid)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:  # a zombie is still there: only exited ones go
                continue
            self.orphans[pid] = now + self.opts.mercy
            left_by = f", left by a process of {name}" if name else ""
            self.log(f"orphan pid {pid} ({comm}{left_by}) sent SIGTERM")

    def _kill_orphans(self, now: float) -> None:
        for pid, deadline in list(self.orphans.items()):
            if now >= deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    del self.orphans[pid]
                    continue
                # kept until reaped, which then sweeps for its own children
                self.orphans[pid] = math.inf

    def _execute(self, v: Vassal, actions: list, now: float) -> None:
        for a in actions:
            match a:
                case Spawn(kind=kind, seq=seq):
                    self._spawn(v, kind, seq, now)
                case Adopt(seq=seq):
                    self._adopt(v, seq, now)
                case Send(byte=byte, seq=seq):
                    p = v.proc(seq)
                    if p is not None:
                        self.log(f"stopping pid {p.pid} ({p.stop_reason})", v.name)
                    self._send(v, seq, byte)
                case Kill(reason=reason, seq=seq):
                    p = v.proc(seq)
                    pid = p.pid if p is not None else None
                    self.log(f"SIGKILL pid {pid}: {reason}", v.name)
                    if pid is not None:
                        launch.kill_tree(pid)
                case Forget():
                    for key in [k for k in self.procs if k[0] == v.name]:
                        self._drop_proc(*key)
                    self._close_listener(v.name)
                    self.bind_errors.pop(v.name, None)
                    self.logbook.set_logto(v.name, None)  # what its pipes still hold: the main log
                    self.recent.pop(v.name, None)
                    del self.vassals[v.name]
                    if v.refused:
                        self.n_refused -= 1
                    self.admitted.discard(v.name)

    # -- the loop ------------------------------------------------------------------

    def _reconcile(self, now: float) -> None:
        self.again = False
        if self.n_refused and len(self.admitted) < self.max_vassals:
            self._admit_refused()
        for (name, seq), h in list(self.procs.items()):
            if h.adoption is not None and h.adoption.expired(now):
                p = self.vassals[name].proc(seq)
                with self._boundary(name, now, seq):
                    self._adoption_failed(
                        name, seq, now, f"no reply within {self.opts.adopt_timeout:g} s"
                    )
                if p is not None:
                    self._base_timed_out(p.base_generation)
        self._probe_bases(now)
        fs, base_gen = self._fork_server_state(now)

        def runs_as_base(v: Vassal) -> bool:
            return v.kind == Kind.BASE if v.has_process else v.is_base

        for v in self.vassals.values():
            v.seamless = self.own_sockets and not v.is_base and (
                v.config is not None
                and sockets.wanted_address(v.config, self.socket_dir) is not None
            )
        others = [v for v in self.vassals.values() if not runs_as_base(v)]
        bases = [v for v in self.vassals.values() if runs_as_base(v)]
        self._base_back(now, fs, others)
        movers = {v.name: v.successor for v in others
                  if v.successor is not None and v.successor.reason == basesmod.CODE_DEPLOY}
        moving = len(movers)
        slots = max(0, self.opts.deploy_parallel - moving)
        in_flight = sum(1 for h in self.procs.values() if h.adoption is not None)
        adopt_slots = max(0, self.opts.adopt_parallel - in_flight)
        if self.sweep_due and not self.shutting_down:
            # during a shutdown, one sweep once every vassal is gone does it
            # all (_shutdown_step), not one per vassal that stops
            self._sweep_orphans(now)
        # non-bases first: during a shutdown the bases wait for them
        for v in sorted(others, key=lambda v: v.name):
            before = v.successor
            ctx = Context(now, fs, self.shutting_down, base_generation=base_gen,
                          deploy_slots=slots, adopt_slots=adopt_slots)
            try:  # the boundary (_boundary), inline: this runs per vassal per turn
                actions = v.step(ctx)
                if actions:
                    adopt_slots -= sum(1 for a in actions if isinstance(a, Adopt))
                    self._execute(v, actions, now)
                if v.name in self.vassals:
                    self._watch_on_demand(v, now)
            except Exception as e:  # noqa: BLE001 - one vassal's failure is its own
                self._vassal_failed(v.name, None, now, e)
            if v.successor is not None and v.successor is not before \
                    and v.successor.reason == "code deploy":
                slots -= 1
        hold_bases = self.shutting_down and any(
            not runs_as_base(v) for v in self.vassals.values()
        )
        users = frozenset(
            p.base_generation
            for v in self.vassals.values()
            for p in (v.current, v.successor)
            if p is not None and p.kind == Kind.ADOPTED
        )
        for v in sorted(bases, key=lambda v: v.name):
            ctx = Context(now, fs, self.shutting_down, hold_bases, base_generation=base_gen,
                          base_users=users)
            try:
                self._execute(v, v.step(ctx), now)
            except Exception as e:  # noqa: BLE001 - one vassal's failure is its own
                self._vassal_failed(v.name, None, now, e)
        # A new base generation took over (its successor was promoted just
        # now), or a vassal's move ended and freed a deploy slot: nothing
        # else may wake the loop before the next rescan, so step again now.
        if self._fork_server_state(now) != (fs, base_gen) or any(
            self.vassals.get(n) is None or self.vassals[n].successor is not s
            for n, s in movers.items()
        ):
            self.again = True
        self.deploys.observe(now, self._base(), [v for v in self.vassals.values()
                                                 if not runs_as_base(v)], self.shutting_down)
        self.start_progress.observe(now, {n: v.phase for n, v in self.vassals.items()
                                          if not runs_as_base(v)})
        self._kill_orphans(now)

    def _timeout(self, now: float) -> float:
        if self.again:
            return 0.0
        times = [self.next_rescan]
        times += self.due.values()
        for name, v in self.vassals.items():
            t = v.next_wakeup()
            if t is not None:
                times.append(t)
            for p in (v.current, v.successor):
                if p is not None and p.kind == Kind.BASE and p.state == Phase.STARTING \
                        and p.started_at is not None:
                    h = self.procs.get((name, p.seq))
                    times.append(max(p.started_at + PROBE_AFTER, h.next_probe if h else 0))
            if v.phase == Phase.WAITING_FOR_BASE and self.opts.use_fork_server and not self._base():
                times.append(self.external_next_probe)
        for h in self.procs.values():
            if h.adoption is not None:
                times.append(h.adoption.deadline)
        times += self.orphans.values()
        t = self.renderer.next_wakeup()
        if t is not None:
            times.append(t)
        if self.front is not None:
            t = self.front.next_wakeup()
            if t is not None:
                times.append(t)
        status = self.opts.status
        if status is not None and hasattr(status, "next_wakeup"):
            t = status.next_wakeup()
            if t is not None:
                times.append(t)
        t = self.notifier.next_wakeup()
        if t is not None:
            times.append(t)
        if self.shutting_down:
            times.append(self.shutdown_deadline)
            times.append(now + 0.5)  # keep polling for the last children
        return max(0.0, min(times) - now)

    def run(self) -> int:
        self._setup()
        try:
            now = time.monotonic()
            self._rescan(now)
            while True:
                now = time.monotonic()
                self._reap(now)
                if now >= self.next_rescan:
                    self._rescan(now)
                self.renderer.expire(now)
                self._reload_due(now)
                self._reconcile(now)
                if self.front is not None:  # routing changed? (applied batched)
                    self._front_safely(self._front_turn, now)
                status = self.opts.status
                if status is not None and hasattr(status, "poll"):
                    status.poll(now)
                self.metrics.observe_deploy(self.deploys.last)
                self.notifier.poll(self, now)
                if self.shutting_down:
                    if self._shutdown_step(now):
                        break
                events = self.sel.select(self._timeout(time.monotonic()))
                if not events:
                    # Read first, judge after: a wait that ended with nothing
                    # may be the end of a freeze of the Emperor (SIGSTOP, a
                    # swap storm). The wait, interrupted by SIGCONT after its
                    # deadline, returns empty while bytes the vassals sent
                    # meanwhile (heartbeats) are queued: read them before
                    # any heartbeat is judged.
                    events = self.sel.select(0)
                for key, _ in events:
                    self._dispatch(key.data, time.monotonic())
                self._prune(now)
        finally:
            self._teardown()
            self.notifier.close()
        self.log("bye")
        return 0

    def _shutdown_step(self, now: float) -> bool:
        """True when everything is gone."""
        if not self.vassals:
            if self.front is not None:
                self.front.stop()  # last: it served until every vassal was gone
            self._reap(now)
            if self.no_children:
                return True
            if self.sweep_due or not self.swept_at_shutdown:
                self.swept_at_shutdown = True
                self._sweep_orphans(now, everything=True)
        if now >= self.shutdown_deadline and now >= self.next_straggler_kill:
            self.next_straggler_kill = now + 1.0
            try:
                victims = psutil.Process().children(recursive=True)
            except (psutil.Error, OSError):
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
