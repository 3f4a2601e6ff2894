"""The Emperor: one selectors loop that reconciles vassal files with processes.

Each turn of the loop (`_turn`) reads facts, plans, acts:

- facts: signals (queued by the wakeup fd, handled by name), reaped
  children, vassal files (files.py), fork-server probes (bases.py); events
  between turns (inotify, pipe bytes, adoption replies, readable on-demand
  sockets) only record facts on the vassals;
- plan: `plan.plan()` turns the vassals' states and the Emperor's limits
  into every vassal's actions, with no processes (unit-tested);
- act: `_execute` carries the actions out (processes.py) and feeds the
  outcome back to the vassals as facts.

Whatever goes wrong while handling one vassal is that vassal's failure
(`_boundary`), never the fleet's. Every child is reaped in one place
(`Processes._reap`), adopted vassals included: the Emperor is a child
subreaper. The system calls are in launch.py.

The Emperor binds every vassal's `http-socket` itself (sockets.py) and
passes it to each of the vassal's processes (mask 0x04), so restarts,
gap-free reloads and code deploys (bases.py) never close the port.

files.py, processes.py and bases.py are mixins of `Emperor` (docs/ARCHITECTURE.md: Layout).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import deque
import selectors
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from . import bases as basesmod
from . import config as cfgmod
from .config import render
from . import control, launch, locks, logs, notify, sockets
from .metrics import EmperorMetrics
from .files import Files
from .launch import program_argv
from .cgroups import Cgroups
from .orphans import Sweeper
from .plan import Facts, Plan, Settled, plan, runs_as_base
from .processes import ForVassal, ProcHandles, Processes
from .routing import Routing
from .status import sweep_requests
from .protocol import ProtocolError
from .options import Options
from .vassal import Adopt, Forget, Kill, Policy, Send, Spawn, Vassal


RECENT_LINES = 200  # log lines kept per vassal (/log/NAME, `emperor logs NAME`)
LAST_OUTPUT = 3  # lines a process wrote last, kept to explain its death in the status
LAST_PROCESSES = 4  # a vassal's processes whose last lines are kept (the newest)
# an access-log line (HTTPServer/Response.pm, combined format): never why it died
ACCESS_LINE = re.compile(r'\S+ \S+ \S+ \S+ \[[^\]]*\] "')


def is_our_program(program: str) -> bool:
    return os.path.basename(program) == "ForkServer.pm"


@dataclass
class Emperor(Files, Processes, basesmod.ForkServers, Routing):
    opts: Options
    vassals: dict[str, Vassal] = field(default_factory=dict)
    procs: dict[tuple[str, int], ProcHandles] = field(default_factory=dict)
    pids: dict[int, tuple[str, int]] = field(default_factory=dict)
    # pids reaped before we knew them (an adopted vassal may die before its
    # pid reaches us): pid -> (status, when)
    early_exits: dict[int, tuple[int, float]] = field(default_factory=dict)
    shutting_down: bool = False
    shutdown_deadline: float = 0.0
    no_children: bool = False
    # vassals whose serving process needs no step until something happens to them
    settled: Settled = field(default_factory=Settled)

    def __post_init__(self) -> None:
        self.argv0 = program_argv(self.opts.program)
        self.own_sockets = (
            self.opts.own_sockets if self.opts.own_sockets is not None
            else is_our_program(self.opts.program)
        )
        # vassal files are judged against our option table only when our
        # program reads them (uWSGI's vassals have uWSGI's options)
        self.our_program = is_our_program(self.opts.program)
        self.judge = self.our_program and self.opts.use_fork_server is None
        self.told_foreign = False  # adoptions through a fork server we do not run: said once
        self.policy = Policy.of(self.opts)
        self.bases = cfgmod.BaseSelector.from_names(self.opts.fork_bases)
        self.sel = selectors.DefaultSelector()
        self.listeners = sockets.Listeners(self.sel, self.log)
        self.sweeper = Sweeper(self.log, self.opts.mercy)
        self.signals: launch.SignalQueue | None = None  # handled at the start of each turn
        self.cgroups: Cgroups | None = None  # one cgroup per vassal process, where possible
        self.next_straggler_kill = 0.0
        self.lock_fds: list[int] = []  # flocks held while we run (claim())
        # the turn must run again at once (the fork server changed, a deploy
        # slot came free, a start failed at once): no waiting for an event
        self.again = False
        # the cockpit: recent log lines per vassal, metrics, systemd notify
        self.recent: dict[str, deque[str]] = {}
        self.recent_total: dict[str, int] = {}  # lines ever kept per vassal (`logs -f` follows it)
        self.metrics = EmperorMetrics()
        self.notifier = notify.Notifier.from_env(self.log)
        # logs.py: where lines go, and the vassals' output relayed line by line
        self.logbook = self.opts.log if self.opts.log is not None else logs.Log()
        self.relay = logs.Relay(self.logbook, self.sel)
        self.logbook.keep = lambda name, msgs, seq: (
            self._remember(name, msgs, seq) if name in self.vassals else None)
        # the last lines each of a vassal's latest processes wrote, by their
        # sequence number: a dead process's are the status's last error
        # (status/document.py), whatever its successors write since
        self.last_words: dict[str, dict[int | None, deque[str]]] = {}
        self.start_progress = logs.StartProgress(self.log)
        self._init_files()
        self._init_fork_servers()
        # templates render in children with a deadline (config/render.py);
        # the file is read again when its render ends
        self.renderer = render.Renderer(self.sel, lambda path: self.due.__setitem__(path.name, 0.0),
                                        timeout=self.opts.template_timeout)
        self.wedges = basesmod.WedgeWatch()  # bases whose adoptions time out
        self._init_routing()

    def log(self, msg: str, name: str | None = None) -> None:
        if name:
            self._remember(name, [msg], relayed=False)
        self.logbook.emit(msg, name)

    def _remember(self, name: str, msgs: list[str], seq: int | None = None,
                  relayed: bool = True) -> None:
        """A vassal's recent lines (the status page shows them): the
        Emperor's about it and, relayed, its own (logs.Log.keep)."""
        lines = self.recent.get(name)
        if lines is None:
            lines = self.recent[name] = deque(maxlen=RECENT_LINES)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S ")
        lines.extend(stamp + m for m in msgs)
        self.recent_total[name] = self.recent_total.get(name, 0) + len(msgs)
        if relayed:
            kept = [m for m in msgs if m.strip() and not ACCESS_LINE.match(m)]
            if not kept:
                return
            per = self.last_words.setdefault(name, {})
            words = per.get(seq)
            if words is None:
                words = per[seq] = deque(maxlen=LAST_OUTPUT)
                while len(per) > LAST_PROCESSES:  # the oldest process's go
                    del per[min(per, key=lambda q: -1 if q is None else q)]
            words.extend(kept)

    def last_output(self, name: str, seq: int | None) -> tuple[str, ...]:
        """The last lines process `seq` of vassal `name` wrote (its access
        log aside): why it died, when it said so."""
        if seq is None:
            return ()
        return tuple(self.last_words.get(name, {}).get(seq, ()))

    # -- the loop ------------------------------------------------------------------

    def run(self) -> int:
        self._setup()
        try:
            self._rescan(time.monotonic())
            while not self._turn():
                self._wait()
        finally:
            self._teardown()
            self.notifier.close()
        self.log("bye")
        return 0

    def _turn(self) -> bool:
        """Read facts, plan, act. True once a shutdown is complete."""
        now = time.monotonic()
        self._handle_signals(now)
        self._reap(now)
        if now >= self.next_rescan:
            self._rescan(now)
        self.renderer.expire(now)
        self._reload_due(now)
        self._reconcile(now)
        if self.front is not None:  # routing changed? (applied batched)
            self._front_safely(self._front_turn, now)
        if self.opts.status is not None:
            self.opts.status.poll(now)
        self.metrics.observe_deploy(self.deploys.last)
        self.notifier.poll(lambda: control.snapshot(self), now)
        return self.shutting_down and self._shutdown_step(now)

    def _wait(self) -> None:
        now = time.monotonic()
        events = self.sel.select(self._timeout(now))
        if not events:
            # Read first, judge after: a wait that ended with nothing may be
            # the end of a freeze of the Emperor (SIGSTOP, a swap storm). The
            # wait, interrupted by SIGCONT after its deadline, returns empty
            # while bytes the vassals sent meanwhile (heartbeats) are queued:
            # read them before any heartbeat is judged.
            events = self.sel.select(0)
        for key, _ in events:
            self._dispatch(key.data, time.monotonic())
        self._prune(now)

    def _reconcile(self, now: float) -> None:
        self.again = False
        facts = self._facts(now)
        turn = plan(self.vassals, facts, self.settled)
        self._act(turn, now)
        # A new base generation took over (its successor was promoted just
        # now), or a vassal's move ended and freed a deploy slot: nothing
        # else may wake the loop before the next rescan, so step again now.
        if self._fork_server_state(now) != (facts.fork_server, facts.base_generation) or any(
            self.vassals.get(n) is None or self.vassals[n].successor is not p
            for n, p in turn.movers.items()
        ):
            self.again = True
        # lazily: the tracker looks at the others only while a deploy runs
        self.deploys.observe(now, self._base(), (v for v in self.vassals.values()
                                                 if not runs_as_base(v)), self.shutting_down)
        self.start_progress.observe(now, lambda: {n: v.phase for n, v in self.vassals.items()
                                                  if not runs_as_base(v)})
        self.sweeper.kill_due(now)
        if self.cgroups is not None and self.cgroups.dying:
            self.cgroups.poll(now)

    def _facts(self, now: float) -> Facts:
        """What the plan needs besides the vassals, after the facts that
        need no event: room in the budget, expired adoptions, probes."""
        if self.n_refused and len(self.admitted) < self.max_vassals:
            self._admit_refused()
        for (name, seq), h in list(self.procs.items()):
            if h.adoption is not None and h.adoption.expired(now):
                p = self.vassals[name].proc(seq)
                with self._boundary(name, now, seq):
                    self._adoption_failed(
                        name, seq, now, f"no reply within {self.opts.adopt_timeout:g} s")
                if p is not None:
                    self._base_timed_out(p.base_generation)
        self._probe_bases(now)
        fs, base_gen = self._fork_server_state(now)
        # lazily: looked at only in the turn the fork server comes back
        self._base_back(now, fs, (v for v in self.vassals.values() if not runs_as_base(v)))
        if self.sweeper.due and not self.shutting_down:
            # during a shutdown, one sweep once every vassal is gone does it
            # all (_shutdown_step), not one per vassal that stops
            self._sweep(now)
        return Facts(now, fs, base_gen, self.shutting_down, self.opts.deploy_parallel,
                     self.opts.adopt_parallel,
                     sum(1 for h in self.procs.values() if h.adoption is not None))

    def _act(self, turn: Plan, now: float) -> None:
        for s in turn.steps:
            v = s.vassal
            try:  # the boundary (_boundary), inline: this runs per vassal per turn
                if s.error is not None:
                    raise s.error
                if s.actions:
                    self._execute(v, s.actions, now)
                if v.name in self.vassals and not s.base:
                    self._closed_sign(v, now)
                    self._watch_on_demand(v, now)
            except Exception as e:  # noqa: BLE001 - one vassal's failure is its own
                self._vassal_failed(v.name, None, now, e)

    def _execute(self, v: Vassal, actions: list, now: float) -> None:
        for a in actions:
            match a:
                case Spawn(kind=kind, seq=seq):
                    self._spawn(v, kind, seq, now)
                    self._started_or_again(v, seq)
                case Adopt(seq=seq):
                    self._adopt(v, seq, now)
                    self._started_or_again(v, seq)
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
                    self.listeners.forget(v.name)
                    self.logbook.set_logto(v.name, None)  # what its pipes still hold: the main log
                    self.last_words.pop(v.name, None)
                    self.recent.pop(v.name, None)
                    self.recent_total.pop(v.name, None)
                    del self.vassals[v.name]
                    if v.refused:
                        self.n_refused -= 1
                    self.admitted.discard(v.name)

    def _started_or_again(self, v: Vassal, seq: int) -> None:
        """A start that failed at once gave its adoption or deploy slot
        back: the next turn plans with it at once."""
        if v.proc(seq) is None:
            self.again = True

    def _timeout(self, now: float) -> float:
        if self.again:
            return 0.0
        times = [self.next_rescan]
        times += self.due.values()
        times += self.settled.wakeups(self.vassals)
        times += self._probe_times()
        for h in self.procs.values():
            if h.adoption is not None:
                times.append(h.adoption.deadline)
        times += self.sweeper.next_wakeup()
        if self.cgroups is not None and (t := self.cgroups.next_wakeup(now)) is not None:
            times.append(t)
        t = self.renderer.next_wakeup()
        if t is not None:
            times.append(t)
        if self.front is not None:
            t = self.front.next_wakeup()
            if t is not None:
                times.append(t)
        status = self.opts.status
        if status is not None:
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

    def _shutdown_step(self, now: float) -> bool:
        """True when everything is gone."""
        if not self.vassals:
            if self.front is not None:
                self.front.stop()  # last: it served until every vassal was gone
            self._reap(now)
            if self.no_children:
                return True
            if self.sweeper.due or not self.sweeper.swept_at_shutdown:
                self.sweeper.swept_at_shutdown = True
                self._sweep(now, everything=True)
        if now >= self.shutdown_deadline and now >= self.next_straggler_kill:
            self.next_straggler_kill = now + 1.0
            self.sweeper.kill_stragglers()
            if now >= self.shutdown_deadline + 10:
                self.log("giving up waiting for children")
                return True
        return False

    def _sweep(self, now: float, everything: bool = False) -> None:
        adopting = any(h.adoption is not None for h in self.procs.values())
        live = self.pids if self.front is None else {**self.pids, **self.front.pids()}
        if self.renderer.pids:  # template renders: ours, not strangers to log
            live = {*live, *self.renderer.pids}

        self.sweeper.sweep(now, live, adopting, everything)

    def _prune(self, now: float) -> None:
        for pid, (_, when) in list(self.early_exits.items()):
            if now - when > 60:
                del self.early_exits[pid]

    # -- signals: queued, handled by name at the start of a turn --------------------

    def _handle_signals(self, now: float) -> None:
        if self.signals is None:
            return
        for sig in self.signals.pop():
            handler = getattr(self, f"_handle_{sig.name.lower()}", None)
            if handler is not None:
                handler(sig, now)

    def _handle_sigterm(self, sig: signal.Signals, now: float) -> None:
        name = sig.name
        if self.shutting_down:
            self.log(f"{name} again: killing everything now")
            self.shutdown_deadline = now
        else:
            self.log(f"{name}: stopping every vassal")
            self.shutting_down = True
            self.shutdown_deadline = now + self.opts.mercy
            self.renderer.close()  # no template matters any more

    _handle_sigint = _handle_sigterm

    def _handle_sighup(self, sig: signal.Signals, now: float) -> None:
        self.next_rescan = now

    def _handle_sigusr1(self, sig: signal.Signals, now: float) -> None:
        self.reload_base()

    def _handle_sigusr2(self, sig: signal.Signals, now: float) -> None:
        self.reopen_logs()

    def reopen_logs(self) -> list[str]:
        """SIGUSR2, `emperor reopen-logs`: every log file reopened by its
        path (logrotate renamed it); the reasons of those that could not be."""
        errors = self.logbook.reopen()
        for err in errors:
            self.log(f"reopen-logs: {err}")
        self.log("reopen-logs: log files reopened")
        return errors

    # SIGCHLD needs no handler: every turn reaps

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
            v.resources_failed(now)
            self.log(f"cannot handle: {why} (at {where}); retry in "
                     f"{max(0.0, v.not_before - now):.1f} s", name)
            return
        again = self.failed.get(name, ("", ""))[1] == why
        if v.config is not None:
            self.failed[name] = (v.config.fingerprint, why)
            v.config_failed(why)
        if not v.has_process:
            self.listeners.close(name)  # connections refused, not left in its backlog
        if not again:  # one line, not one per loop turn
            self.log(f"cannot handle: {why} (at {where}); config-error until its file "
                     "changes", name)

    # -- set-up and teardown ---------------------------------------------------------

    def _setup(self) -> None:
        self.claim()  # before anything starts (the CLI has usually done it)
        # before anything is started: what an earlier run left is killed
        # (and before we are a subreaper: the guard is not our child)
        self.cgroups = Cgroups.start(self.dir, self.opts.run_dir, self.log, self.opts.mercy)
        launch.set_child_subreaper()  # before anything is started
        self._descriptor_budget()
        sweep_requests()  # the requests files a run killed with -9 left
        os.chdir(self.dir)  # vassals inherit it as their working directory
        st = os.stat(".")
        self.dir_id = (st.st_dev, st.st_ino)
        self.signals = launch.SignalQueue()
        self.sel.register(self.signals, selectors.EVENT_READ, self.signals.on_readable)
        self._rewatch()
        if self.socket_dir is not None:
            try:
                from .status.rundir import make_private_dir, run_dir_mode

                # the run directory is private (0700) whoever makes it first
                front = self.opts.front
                include = front.include if front is not None else None
                gid = front.worker_gid if front is not None and front.listen else None
                make_private_dir(self.socket_dir.parent, tighten=False, group=gid,
                                 mode=run_dir_mode(include, gid))
                self.socket_dir.mkdir(exist_ok=True, mode=0o755)
            except OSError as e:
                self.log(f"cannot create {self.socket_dir}: {e.strerror or e}")
        if self.opts.status is not None:
            # stats socket / status page in our selector
            self.opts.status.attach(self.sel, self.log, control.link(self))
        self.log(
            f"watching {self.dir} (vassal program {' '.join(self.argv0)}, pid {os.getpid()})"
        )

    def claim(self) -> None:
        """Lock the vassals directory, the fork-server socket and the
        pidfile (then write it), so that a second Emperor on any of them
        refuses to start (locks.py). Idempotent; StartupError is one line."""
        if not self.lock_fds:
            self.lock_fds = locks.claim(self.dir, self._fork_server_sockets(), self.opts.pidfile)

    def release(self) -> None:
        for fd in self.lock_fds:
            os.close(fd)
        self.lock_fds.clear()

    def _teardown(self) -> None:
        if self.cgroups is not None:
            self.cgroups.close()  # whatever is left of any vassal, nginx included
        self.relay.close()
        self.renderer.close()
        if self.front is not None:
            self.front.close()
        self.listeners.close_all()
        if self.opts.pidfile is not None:
            locks.remove_pidfile(self.opts.pidfile)
        self.release()
