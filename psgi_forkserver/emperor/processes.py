"""The process table: the vassals' processes, started, fed, stopped and reaped.

`spawn` (fork+exec) and `adopt` (a request to the fork server) share one
preparation (`_prepare`: the vassal's listening socket, its Emperor pipe
and config pipe, its config text). The OS objects of a process live in
`ProcHandles`, keyed by (vassal name, Proc.seq); its state lives in the
vassal's `Proc`, which is told what happened (`spawned`, `adopted`,
`on_byte`). Every child is reaped in `reap`, adopted vassals included (the
Emperor is a child subreaper).

The table knows nothing of bases or deploys: what they must learn comes
back as facts for the Emperor to hand on (a `StartFailed` from `spawn` and
`adopt`, `Reaped` from `reap`, the generations that answered an adoption,
the adoptions that failed or timed out, which the plan then fails).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import time
from pathlib import Path

from .. import adoption, launch, logs
from ..adoption import AdoptionError
from ..launch import program_argv
from ..metrics import EmperorMetrics
from ..nonblocking import recv_ready
from ..options import Options, plack_env_of
from ..protocol import EmperorByte, VassalByte
from .handles import Prepared, ProcHandles, Reaped, StartFailed, output_pipe, prepare
from .ondemand import ForVassal, VassalSockets
from .vassal import Kind, Vassal


class ProcessTable:
    """Starting, feeding, stopping and reaping the vassals' processes."""

    def __init__(self, opts: Options, vassals: dict[str, Vassal], vassals_dir: Path,
                 sel, log, relay: logs.Relay, logbook: logs.Log, vsockets: VassalSockets,
                 metrics: EmperorMetrics) -> None:
        self.opts = opts
        self.vassals = vassals  # the fleet, read only
        self.dir = vassals_dir
        self.sel = sel
        self.log = log
        self.relay = relay
        self.logbook = logbook
        self.vsockets = vsockets
        self.metrics = metrics
        self.argv0 = program_argv(opts.program)
        self.handles: dict[tuple[str, int], ProcHandles] = {}
        self.pids: dict[int, tuple[str, int]] = {}
        # pids reaped before we knew them (an adopted vassal may die before
        # its pid reaches us): pid -> (status, when)
        self.early_exits: dict[int, tuple[int, float]] = {}
        # ... whose pid came since: reaped again by the next `reap`
        self.late_exits: list[tuple[int, int]] = []
        self.adoption_errors: dict[tuple[str, int], str] = {}  # the reply said so
        # the adoptions in flight (the handles whose `adoption` is set): what
        # each turn's facts and wait look at, not every process
        self.pending: dict[tuple[str, int], ProcHandles] = {}
        self.replied: set[int] = set()  # base generations that answered an adoption
        self.no_children = False
        self.cgroups = None  # cgroups.Cgroups, once started (use_cgroups)

    def use_cgroups(self, cgroups) -> None:
        """Every child from now on is born in its own cgroup."""
        self.cgroups = cgroups

    # -- starting: one preparation for spawn and adoption ----------------------

    @staticmethod
    def _abandon(pr: Prepared, failed: StartFailed) -> StartFailed:
        """The spawn or adoption failed after its pipes were made: our ends closed."""
        pr.ours.close()
        if pr.handles.config_pipe is not None:
            pr.handles.config_pipe.close()
        return failed

    def _keep(self, v: Vassal, seq: int, pr: Prepared) -> None:
        """The new process exists (or its adoption is under way): its pipes
        are tracked from now on, and its config goes out on the config pipe."""
        h = pr.handles
        if h.config_pipe is not None:
            self._send_config(h)
        pr.ours.setblocking(False)
        h.kept(pr.ours)
        self.handles[(v.name, seq)] = h

    def _watch_pipe(self, name: str, seq: int, pipe: socket.socket) -> None:
        self.sel.register(pipe, selectors.EVENT_READ,
                          ForVassal(name, seq, lambda t, n=name, q=seq: self._on_pipe(n, q, t)))

    def spawn(self, v: Vassal, kind: Kind, seq: int, now: float, extra_args: list[str],
              nofile: int | None) -> StartFailed | None:
        """fork+exec the vassal program for process `seq` of v."""
        p = v.proc(seq)
        assert p is not None
        # our base gets the text the Emperor read, not its file: one changed
        # on disk but not read yet must not run under the old one's record,
        # or the deploy that follows the read starts a second generation
        ours = kind == Kind.BASE and self.opts.program_is_ours
        pr = prepare(v, seq, now, self.vsockets, self.log, always_config=ours)
        if pr is None:
            return None
        out = output_pipe(v, p.config, self.logbook, self.dir, self.log)
        argv = [*self.argv0, "--ini", str(p.config.path), *extra_args]
        try:
            # PLACK_ENV: what a vassal without a plack-env key (and the
            # vassals adopted from this base) take (perl/ForkServer/Config.pm)
            env = {**os.environ, "PLACK_ENV": plack_env_of(self.opts)}
            with self.spawning(v.name, seq):  # born in its own cgroup
                pid = launch.spawn_vassal(
                    argv, env, pr.pipe_fd, pr.config_fd, pr.listener_fd, nofile=nofile,
                    output_fd=out.wfd if out is not None else None,
                )
        except OSError as e:
            self._unborn(v.name, seq, now)
            if out is not None:
                out.close()
            return self._abandon(pr, StartFailed(str(e), f"cannot start {argv[0]}: {e.strerror}",
                                                 f"cannot start {argv[0]}: {e.strerror}", False))
        finally:
            pr.close_theirs()
        self._keep(v, seq, pr)
        if out is not None:
            pr.handles.given(out)
            self.relay.watch(out, v.name, lambda: pid, seq)
        self._watch_pipe(v.name, seq, pr.ours)
        v.spawned(pid, now, seq)
        self.pids[pid] = (v.name, seq)
        extra = f" ({p.reason})" if p.reason != "start" else ""
        gen = f", generation {p.base_generation}" if kind == Kind.BASE else ""
        self.log(f"started {kind} vassal, pid {pid}{gen}{extra}", v.name)
        return None

    def adopt(self, v: Vassal, seq: int, now: float, path: Path,
              ours: bool, into_cgroup: bool) -> StartFailed | None:
        """Ask the fork server at `path` for process `seq` of v; `ours`: our
        own program serves it, and the adopted vassal takes its output pipe
        from the config packet; `into_cgroup`: the base is ours and of this
        version, and clones it into its cgroup (cgroups.py)."""
        p = v.proc(seq)
        assert p is not None
        pr = prepare(v, seq, now, self.vsockets, self.log, always_config=ours)
        if pr is None:
            return None
        if ours:
            pr.handles.given(output_pipe(v, p.config, self.logbook, self.dir, self.log))
        argv = [self.opts.program, "--ini", str(p.config.path)]
        # our base clones it into its cgroup; a uWSGI one, or one we did not start, is never sent it
        cgroup_fd = self.cgroups.birthplace(v.name, seq) if into_cgroup and self.cgroups is not None else None
        try:
            pending = adoption.start_adoption(
                path, argv, pr.pipe_fd, config_fd=pr.config_fd,
                on_demand_fd=pr.listener_fd, timeout=self.opts.adopt_timeout,
                cgroup_fd=cgroup_fd,
            )
        except AdoptionError as e:
            if pr.handles.output is not None:
                pr.handles.output.close()
            self._unborn(v.name, seq, now)
            return self._abandon(pr, StartFailed(str(e), f"adoption failed: {e}",
                                                 f"adoption failed: {e}", True))
        finally:
            pr.close_theirs()
            if cgroup_fd is not None:
                os.close(cgroup_fd)
        pr.handles.adopting(pending)
        self._keep(v, seq, pr)
        self.pending[(v.name, seq)] = pr.handles
        if pr.handles.output is not None:
            self.relay.watch(pr.handles.output, v.name, lambda: self.pid_of(v.name, seq), seq)
        self.sel.register(pending.sock, selectors.EVENT_READ,
                          ForVassal(v.name, seq, lambda t, n=v.name, q=seq: self._on_adoption(n, q, t)))
        if p.reason != "start":
            self.log(f"starting a successor ({p.reason})", v.name)
        return None

    def _unborn(self, name: str, seq: int, now: float) -> None:
        """A start given up: the cgroup made for it goes (and a vassal born
        there whose pid never reached us)."""
        if self.cgroups is not None:
            self.cgroups.ended(name, seq, now)

    def spawning(self, name: str | None, seq: int) -> contextlib.AbstractContextManager:
        """Around a spawn: the child is born in its own cgroup (if any)."""
        if self.cgroups is None:
            return contextlib.nullcontext()
        return self.cgroups.spawning(name, seq)

    def send(self, v: Vassal, seq: int, byte: EmperorByte) -> None:
        """A byte to process `seq` of v: the stop its step asked for (logged)."""
        p = v.proc(seq)
        if p is not None:
            self.log(f"stopping pid {p.pid} ({p.stop_reason})", v.name)
        h = self.handles.get((v.name, seq))
        if h is None or h.pipe is None:
            return
        try:
            launch.send_byte(h.pipe, byte)
        except OSError:
            pass  # it is exiting anyway; reaping will tell

    def kill(self, v: Vassal, seq: int, reason: str) -> None:
        """SIGKILL process `seq` of v and its descendants."""
        p = v.proc(seq)
        pid = p.pid if p is not None else None
        self.log(f"SIGKILL pid {pid}: {reason}", v.name)
        if pid is not None:
            launch.kill_tree(pid)

    # -- the config pipe --------------------------------------------------------

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

    # -- events: its bytes, its adoption's reply ---------------------------------

    def _on_pipe(self, name: str, seq: int, now: float) -> None:
        h = self.handles.get((name, seq))
        if h is None or h.pipe is None:
            return
        data = recv_ready(h.pipe, 4096)
        if data is None:
            return
        if not data:
            self._close_pipe(name, seq)
            return
        v = self.vassals.get(name)
        if v is None:
            return
        p = v.proc(seq)
        config_again = False
        for b in data:
            if b == VassalByte.CONFIG_AGAIN:
                config_again = True
                continue
            note = v.on_byte(b, now, seq)
            if note and p is not None:
                ms = (now - p.started_at) * 1000 if p.started_at is not None else 0.0
                self.log(f"{note} (pid {p.pid}, {ms:.1f} ms after start)", name)
        # any number of requests is one copy, and none while an earlier copy
        # is unread: the pipe is the vassal's (its app's code can write on
        # it), and a blocking send would stall the whole fleet
        if config_again and h.config_pipe is not None and h.config_text \
                and not launch.unread_bytes(h.config_pipe):
            self._send_config(h)

    def _on_adoption(self, name: str, seq: int, now: float) -> None:
        h = self.handles[(name, seq)]
        v = self.vassals[name]
        pending = h.adoption
        assert pending is not None
        try:
            pid = pending.on_readable()
        except AdoptionError as e:
            # a fact: the plan fails it (FailAdoption); its socket is done
            self._finish_adoption(name, seq)
            self.adoption_errors[(name, seq)] = str(e)
            return
        if pid is None:
            return
        self._finish_adoption(name, seq)
        self.metrics.adopted(pending.elapsed_ms(now) / 1000)
        v.adopted(pid, now, seq)
        self.pids[pid] = (name, seq)
        p = v.proc(seq)
        if p is not None:
            self.replied.add(p.base_generation)
        what = "successor " if p is v.successor else ""
        gen = f", base generation {p.base_generation}" if p else ""
        self.log(f"adopted {what}pid {pid} from base ({pending.elapsed_ms(now):.1f} ms{gen})", name)
        if self.cgroups is not None:
            # born in its base's cgroup: into its own. After the line: the
            # move can wait for an RCU grace period (~20 ms after an idle
            # spell), and the line says when the adoption was answered
            self.cgroups.adopt(name, seq, pid, born_there=pending.born_in_cgroup)
        if h.pipe is not None:
            self._watch_pipe(name, seq, h.pipe)
        early = self.early_exits.pop(pid, None)
        if early is not None:  # it died before its pid reached us: the next reap says so
            self.late_exits.append((pid, early[0]))

    def _finish_adoption(self, name: str, seq: int) -> None:
        self.pending.pop((name, seq), None)
        h = self.handles.get((name, seq))
        pending = h.take_adoption() if h is not None else None
        if pending is not None:
            try:
                self.sel.unregister(pending.sock)
            except (KeyError, ValueError):
                pass
            pending.close()

    # -- facts for the turn ------------------------------------------------------

    def failed_adoptions(self, now: float) -> list[tuple[str, int, str, bool]]:
        """(name, seq, reason, timed out) of the adoptions that failed: the
        reply said so, or none came in time."""
        out = [(n, q, why, False) for (n, q), why in self.adoption_errors.items()
               if (n, q) in self.handles]
        for (name, seq), h in self.pending.items():
            if h.adoption is not None and h.adoption.expired(now):
                out.append((name, seq, f"no reply within {self.opts.adopt_timeout:g} s", True))
        return out

    def in_flight(self) -> int:
        """Adoption requests sent and not answered."""
        return len(self.pending)

    def take_replies(self) -> set[int]:
        """The base generations that answered an adoption since the last ask."""
        out, self.replied = self.replied, set()
        return out

    def next_wakeup(self) -> list[float]:
        return [h.adoption.deadline for h in self.pending.values() if h.adoption is not None]

    def adoption_failed(self, name: str, seq: int) -> None:
        """The plan failed this adoption: a vassal forked anyway sees EOF and stops."""
        self.metrics.adoption_failed()
        self.abandon(name, seq)

    def abandon(self, name: str, seq: int) -> None:
        """A process whose start was under way: its handles closed."""
        if self.pid_of(name, seq) is None:
            self._unborn(name, seq, time.monotonic())
        self._finish_adoption(name, seq)
        self.drop(name, seq)

    # -- reaping, forgetting ----------------------------------------------------

    def reap(self) -> list[Reaped]:
        """The one place where children are reaped."""
        out = [Reaped(pid, status, self.pids.pop(pid, None)) for pid, status in self.late_exits]
        self.late_exits.clear()
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.no_children = True
                return out
            except InterruptedError:
                continue
            if pid == 0:
                self.no_children = False
                return out
            out.append(Reaped(pid, status, self.pids.pop(pid, None)))

    def exited_unknown(self, pid: int, status: int, now: float) -> None:
        """A child nobody owns (yet): an adopted vassal whose pid has not
        reached us is known by it when it does."""
        self.early_exits[pid] = (status, now)

    def prune(self, now: float) -> None:
        for pid, (_, when) in list(self.early_exits.items()):
            if now - when > 60:
                del self.early_exits[pid]

    def forget(self, name: str) -> None:
        for key in [k for k in self.handles if k[0] == name]:
            self.drop(*key)

    def output_of(self, name: str, seq: int) -> logs.OutputPipe | None:
        h = self.handles.get((name, seq))
        return h.output if h is not None else None

    def drop(self, name: str, seq: int) -> None:
        self._close_pipe(name, seq)
        self.adoption_errors.pop((name, seq), None)
        self.pending.pop((name, seq), None)
        h = self.handles.pop((name, seq), None)
        if h is not None:
            h.close_config_pipe()

    def _close_pipe(self, name: str, seq: int) -> None:
        h = self.handles.get((name, seq))
        pipe = h.take_pipe() if h is not None else None
        if pipe is None:
            return
        try:
            self.sel.unregister(pipe)
        except (KeyError, ValueError):
            pass
        pipe.close()
