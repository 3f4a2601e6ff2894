"""The Emperor: one selectors loop that reconciles vassal files with processes.

`Emperor` is the loop; it owns its parts (docs/ARCHITECTURE.md has the
table): `files` (the vassals directory and the fleet), `procs` (the process
table), `bases` (the fork servers, deploys, wedges), `routes` (the front
door), `vsockets` (sockets between processes), `outcomes` (what exits and
failed starts mean; the per-vassal boundary), `lines`, `sweeper`, `cgroups`,
`cockpit` (the status, systemd notify, progress lines), `shutdown`
(shutdown.py), `locks` (locks.Claim); `on_signal` says what each signal
means.

Each turn (`_turn`) reads facts, plans, acts. Facts: signals (queued by the
wakeup fd), reaped children, vassal files, fork-server probes; events
between turns only record facts. Plan: `plan.plan()` turns the vassals and
the facts into every action of the turn, with no processes. Act: `_act`
and `_execute` carry each action out through the parts. Whatever goes
wrong while handling one vassal is that vassal's failure, never the
fleet's. The Emperor binds every vassal's `http-socket` itself, so
restarts, reloads and code deploys never close the port.
"""

from __future__ import annotations

import os
import selectors
import signal
import time

from .. import launch, logs, sockets
from ..metrics import EmperorMetrics
from ..options import Options
from . import control, locks
from .bases import ForkServers
from .cgroups import Cgroups
from .cockpit import Cockpit
from .files import VassalFiles
from .ondemand import VassalSockets
from .orphans import Sweeper
from .outlived import OutlivedOutput
from .outcomes import Outcomes
from .plan import (Admit, CleanCgroups, FailAdoption, Facts, AdoptionFailure, KillOrphans, KillStragglers,
                   KillWedged, Plan, PrepareBirthplaces, Settled, StopFrontDoor, Sweep, plan, runs_as_base)
from .processes import ProcessTable
from .recent import RecentLines
from .routing import Routes, make_socket_dir, socket_dir_of
from .shutdown import Shutdown
from .vassal import Adopt, Forget, Kill, Send, Spawn, Vassal

# the action types `_execute` and `_act` carry out (test_plan shows each planned)
EXECUTED = (Spawn, Adopt, Send, Kill, Forget, FailAdoption, Admit,
            KillWedged, Sweep, KillOrphans, CleanCgroups, PrepareBirthplaces, StopFrontDoor, KillStragglers)


class Emperor:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.shutdown = Shutdown(opts.mercy, self.log)
        # the turn must run again at once (the fork server changed, a deploy
        # slot came free, a start failed at once): no waiting for an event
        self.again = False
        self.heard = time.monotonic()  # when the last wait began (_wait)
        # what the loop has handled so far: selector events (those that end
        # a wait), signals, children reaped and actions carried out (the
        # files read are the files part's count); Facts.events
        self.handled = 0
        self.signals: launch.SignalQueue | None = None  # handled at the start of each turn
        self.cgroups: Cgroups | None = None  # one cgroup per vassal process, where possible
        ours = opts.program_is_ours
        own = opts.own_sockets if opts.own_sockets is not None else ours
        socket_dir = socket_dir_of(opts)
        self.sel = selectors.DefaultSelector()
        self.lines = RecentLines()  # what the status shows: recent lines, metrics
        self.metrics = EmperorMetrics()
        self.logbook = opts.log if opts.log is not None else logs.Log()
        self.relay = logs.Relay(self.logbook, self.sel)  # the vassals' output, line by line
        # the vassals' sockets are given to the front door's nginx workers' group
        self.listeners = sockets.Listeners(self.sel, self.log, front_gid=(
            opts.front.worker_gid if opts.front is not None else None))
        self.files = VassalFiles(opts, self.log, self.sel, self._boundary, self.listeners,
                                 socket_dir, own, ours)
        self.vassals = self.files.vassals
        self.logbook.keep_with(lambda name, msgs, seq: (
            self.lines.remember(name, msgs, seq) if name in self.vassals else None))
        self.vsockets = VassalSockets(self.listeners, self.vassals, own, socket_dir, self.log)
        self.procs = ProcessTable(opts, self.vassals, self.files.dir, self.sel, self.log,
                                  self.relay, self.logbook, self.vsockets, self.metrics)
        self.bases = ForkServers(opts, self.vassals, self.files.dir, self.files.base_files,
                                 self.log, ours, self.files.base_names)
        self.routes = Routes(opts, self.vassals, self.listeners, socket_dir, own, self.log,
                             self.sel, self.relay, on_refused=self.files.front_refused,
                             spawning=lambda: self.procs.spawning(None, 0))
        self.sweeper = Sweeper(self.log, opts.mercy)
        self.outlived = OutlivedOutput(self.relay, self.log, opts.mercy)  # pipes their process left
        self.outcomes = Outcomes(self.files, self.procs, self.bases, self.routes, self.listeners,
                                 self.sweeper, self.outlived, self.log, lambda: self.cgroups)
        # the vassals a turn need not step (the plan's memory): a turn costs
        # what changed, not the fleet
        self.settled = Settled()
        self.fleet = control.Fleet(opts, self.files, self.bases, self.routes, self.lines,
                                   self.metrics, self.log, lambda: self.cgroups,
                                   lambda: self.shutdown.asked, self.logbook.reopen_and_say,
                                   self._wake)
        self.cockpit = Cockpit(self.fleet, opts, self.log)
        # flocks and the pidfile, held while we run (locks.py)
        self.locks = locks.Claim(self.files.dir, self.bases.lock_paths, opts.pidfile)
        # what each signal means, handled by name at the start of a turn
        # (SIGCHLD needs no handler: every turn reaps)
        self.on_signal = {signal.SIGTERM: self._stop, signal.SIGINT: self._stop,
                          signal.SIGHUP: lambda sig, now: self.files.rescan_soon(now),
                          signal.SIGUSR1: lambda sig, now: self.bases.reload(),
                          signal.SIGUSR2: lambda sig, now: self.logbook.reopen_and_say()}

    def log(self, msg: str, name: str | None = None) -> None:
        if name:
            self.lines.remember(name, [msg], relayed=False)
        self.logbook.emit(msg, name)

    def _wake(self) -> None:
        self.again = True

    def _boundary(self, name: str, now: float, seq: int | None = None):
        return self.outcomes.boundary(name, now, seq)

    # -- the loop ------------------------------------------------------------------

    def run(self) -> int:
        self._setup()
        try:
            # the files that may say base (BaseSelector.may_be_base) first,
            # and a turn that starts the base: it loads its codebase (a
            # second or more) while the rescan reads the other files (those
            # read already and unchanged are not read again)
            self.files.rescan(time.monotonic(), bases_only=True)
            if not self._turn(whole_fleet=False):
                self.files.rescan(time.monotonic())
                while not self._turn():
                    self._wait()
        finally:
            self._teardown()
            self.cockpit.close()
        self.log("bye")
        return 0

    def _turn(self, whole_fleet: bool = True) -> bool:
        """Read facts, plan, act. True once a shutdown is complete.
        `whole_fleet` false: the files read so far are not the fleet yet
        (the bases' turn at start), so nothing is told about it."""
        now = time.monotonic()
        self._handle_signals(now)
        self.handled += self.outcomes.reap(now)
        self.outlived.expire(now)
        self.relay.poll(now)
        self.files.turn(now)
        self.again = False
        facts = self._facts(now)
        turn = plan(self.vassals, facts, self.settled)
        self._act(turn, now)
        self.again = self.again or turn.again
        # lazily: the deploy tracker looks at them only while a deploy runs
        self.bases.observe(now, (v for v in self.vassals.values() if not runs_as_base(v)),
                           self.shutdown.asked)
        # routing changed? (applied batched): the routes of the vassals stepped
        self.routes.turn(now, self.shutdown.asked, [s.vassal.name for s in turn.steps], facts.events)
        if whole_fleet:  # READY=1 waits for the vassals present at start
            self.cockpit.observe(now)
        if turn.done and facts.give_up and not (facts.no_children and not self.vassals):
            self.log("giving up waiting for children")
        return turn.done

    def _wait(self) -> None:
        now = time.monotonic()
        deadline = now + self._timeout(now)
        while True:
            # whatever was sent before a select began, it returns: silences
            # (heartbeats, adoption replies) are judged against this time
            self.heard = now
            events = self.sel.select(max(0.0, deadline - now))
            # only lines copied (the front door's access log, hundreds of
            # times a second under load): nothing to plan, wait on
            if not events or not all(getattr(key.data, "quiet", False) for key, _ in events):
                break
            for key, _ in events:
                self.outcomes.dispatch(key.data, time.monotonic())
            now = time.monotonic()
            if now >= deadline:
                self.procs.prune(now)
                return
        if not events:
            self.heard = time.monotonic()
            # Read first, judge after: a wait that ended with nothing may be
            # the end of a freeze of the Emperor (SIGSTOP, a swap storm). The
            # wait, interrupted by SIGCONT after its deadline, returns empty
            # while bytes the vassals sent meanwhile (heartbeats) are queued:
            # read them before any heartbeat is judged.
            events = self.sel.select(0)
        for key, _ in events:
            self.outcomes.dispatch(key.data, time.monotonic())
        self.handled += len(events)
        self.procs.prune(now)

    def _facts(self, now: float) -> Facts:
        """What the plan needs besides the vassals: measured, never acted on."""
        for generation in self.procs.take_replies():
            self.bases.adoption_replied(generation)
        failed = tuple(AdoptionFailure(*f) for f in self.procs.failed_adoptions(
            min(now, self.heard)))
        self.bases.probe(now)
        fs, base_gen = self.bases.state(now)
        # the fork server is back: the vassals waiting for it are told (a fact)
        self.bases.base_back(now, fs, (v for v in self.vassals.values() if not runs_as_base(v)))
        cg = self.cgroups
        # generation numbers are per base: only the adopting base's old
        # generations wait for vassals to leave them
        adopter = self.bases.base()
        return Facts(now, fs, base_gen, self.shutdown.asked, self.opts.deploy_parallel,
                     self.opts.adopt_parallel,
                     self.procs.in_flight() - sum(1 for f in failed if f.timed_out),
                     adoptions_failed=failed, room=self.files.room,
                     wedged=tuple(self.bases.wedged()), sweep_due=self.sweeper.due,
                     orphans_due=any(now >= t for t in self.sweeper.next_wakeup()),
                     cgroups_due=cg is not None and bool(cg.dying), heard=self.heard,
                     birthplaces=cg is not None and self.bases.clones_into_cgroups(),
                     events=self.handled + self.files.reads,
                     adopter=adopter.name if adopter is not None else None,
                     **self.shutdown.measure(now, not self.vassals, self.routes.front, self.procs,
                                             self.sweeper))

    def _act(self, turn: Plan, now: float) -> None:
        self.handled += len(turn.fleet) + sum(len(s.actions) + (s.error is not None) for s in turn.steps)
        for a in turn.fleet:
            match a:
                case KillWedged(pid=pid, why=why):
                    self.bases.kill_wedged(pid, why)
                case Sweep(everything=everything):
                    self.outcomes.sweep(now, everything=everything)
                case KillOrphans():
                    self.sweeper.kill_due(now)
                case CleanCgroups():
                    if self.cgroups is not None:
                        self.cgroups.poll(now)
                case PrepareBirthplaces():
                    if self.cgroups is not None:
                        # the base's start-up (a second or more) is idle
                        # time for the Emperor: each vassal's next process
                        # (seq + 1) gets its cgroup now, not in the burst
                        self.cgroups.prepare((v.name, v.seq + 1) for v in self.vassals.values()
                                             if v.current is None and not runs_as_base(v))
                case StopFrontDoor():
                    if self.routes.front is not None:
                        self.routes.front.stop()  # last: it served until every vassal was gone
                case KillStragglers():
                    self.sweeper.kill_stragglers()
                    self.shutdown.stragglers_killed(now)
        for s in turn.steps:
            v = s.vassal
            try:  # the boundary (_boundary), inline: this runs per vassal per turn
                if s.actions:
                    self._execute(v, s.actions, now)
                if s.error is not None:
                    raise s.error
                if v.name in self.vassals and not s.base:
                    self.vsockets.closed_sign(v, now)
                    self.vsockets.watch_on_demand(v, now)
            except Exception as e:  # noqa: BLE001 - one vassal's failure is its own
                self.outcomes.vassal_failed(v.name, None, now, e)

    def _execute(self, v: Vassal, actions: list, now: float) -> None:
        for a in actions:
            match a:
                case Spawn(kind=kind, seq=seq):
                    p = v.proc(seq)
                    extra = self.bases.spawn_args(p) if p is not None else []
                    failed = self.procs.spawn(v, kind, seq, now, extra, self.files.nofile)
                    self.again |= self.outcomes.started(v, seq, now, failed)
                case Adopt(seq=seq):
                    p = v.proc(seq)
                    # the generation step() chose: during a deploy the old one
                    # listens too, and a moved vassal must come from the new one
                    path = self.bases.path_for(p.base_generation if p is not None else None)
                    assert path is not None
                    failed = self.procs.adopt(v, seq, now, path, self.bases.adoptions_ours(),
                                             self.bases.clones_into_cgroups())
                    self.again |= self.outcomes.started(v, seq, now, failed)
                case Send(byte=byte, seq=seq):
                    self.procs.send(v, seq, byte)
                case Kill(reason=reason, seq=seq):
                    self.procs.kill(v, seq, reason)
                case FailAdoption(reason=reason, timed_out=timed_out, seq=seq):
                    self.outcomes.adoption_failed(v, seq, now, reason, timed_out)
                    self.again = True  # a slot came free; a base judged wedged is killed at once
                case Admit():
                    self.files.admit(v)
                    self.again = True
                case Forget():
                    self.procs.forget(v.name)
                    self.listeners.forget(v.name)
                    self.logbook.set_logto(v.name, None)  # what its pipes still hold: the main log
                    self.relay.forget_limit(v.name, now)
                    self.lines.forget(v.name)
                    self.files.forget(v)

    def _timeout(self, now: float) -> float:
        if self.again:
            return 0.0
        times = [*self.files.next_wakeup(), *self.bases.probe_times(),
                 *self.procs.next_wakeup(), *self.sweeper.next_wakeup(), *self.outlived.next_wakeup(),
                 *self.relay.next_wakeup()]
        times += self.settled.wakeups(self.vassals) + self.cockpit.next_wakeups()
        for t in (self.cgroups.next_wakeup(now) if self.cgroups is not None else None,
                  self.routes.next_wakeup()):
            if t is not None:
                times.append(t)
        times += self.shutdown.wakeups(now)
        return max(0.0, min(times) - now)

    # -- signals: queued, handled by name at the start of a turn --------------------

    def _handle_signals(self, now: float) -> None:
        for sig in self.signals.pop() if self.signals is not None else ():
            self.handled += 1
            if sig in self.on_signal:
                self.on_signal[sig](sig, now)

    def _stop(self, sig: signal.Signals, now: float) -> None:
        if self.shutdown.ask(sig.name, now):
            self.files.renderer.close()  # no template matters any more

    # -- set-up and teardown ---------------------------------------------------------

    def _setup(self) -> None:
        self.locks.take()  # before anything starts (the CLI has usually done it)
        # before anything is started: what an earlier run left is killed
        # (and before we are a subreaper: the guard is not our child)
        self.cgroups = Cgroups.start(self.files.dir, self.opts.run_dir, self.log, self.opts.mercy)
        self.procs.use_cgroups(self.cgroups)
        launch.set_child_subreaper()  # before anything is started
        self.files.descriptor_budget()
        self.files.enter()  # vassals inherit it as their working directory
        self.signals = launch.SignalQueue()
        self.sel.register(self.signals, selectors.EVENT_READ, self.signals.on_readable)
        make_socket_dir(self.vsockets.socket_dir, self.opts.front, self.log)
        self.cockpit.attach(self.sel, self.log)
        self.log(f"watching {self.files.dir} (vassal program {' '.join(self.procs.argv0)}, "
                 f"pid {os.getpid()})")

    def _teardown(self) -> None:
        if self.cgroups is not None:
            self.cgroups.close()  # whatever is left of any vassal, nginx included
        self.relay.close()
        self.files.renderer.close()
        self.routes.close()
        self.listeners.close_all()
        self.locks.end()
