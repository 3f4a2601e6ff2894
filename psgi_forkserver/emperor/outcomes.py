"""What the Emperor does with what happened to a vassal's processes.

The parts report facts (processes.ProcessTable: a start that failed at
once, the children reaped; the plan: an adoption that failed); `Outcomes`
hands each to those who must learn it, in order: a deploy that started the
process (bases.ForkServers), the vassal's state machine, the orphans'
sweeper, the process's cgroup, the log. `boundary` is the Emperor's
exception boundary: whatever goes wrong while handling one vassal is that
vassal's failure, never the fleet's.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from ..launch import describe_status
from ..protocol import ProtocolError
from ..sockets import Listeners
from ..status import forget_requests
from .bases import ForkServers
from .files import VassalFiles
from .handles import StartFailed
from .ondemand import ForVassal
from .orphans import Sweeper
from .outlived import OutlivedOutput
from .processes import ProcessTable
from .routing import Routes
from .vassal import Exit, Proc, Vassal


class Outcomes:
    """The vassals' side of every fact about their processes."""

    def __init__(self, files: VassalFiles, procs: ProcessTable, bases: ForkServers,
                 routes: Routes, listeners: Listeners, sweeper: Sweeper, outlived: OutlivedOutput,
                 log: Callable[..., None], cgroups: Callable[[], Any]) -> None:
        self.files = files
        self.vassals = files.vassals
        self.procs = procs
        self.bases = bases
        self.routes = routes
        self.listeners = listeners
        self.sweeper = sweeper
        self.outlived = outlived
        self.log = log
        self.cgroups = cgroups  # cgroups.Cgroups once started, or None

    def started(self, v: Vassal, seq: int, now: float, failed: StartFailed | None) -> bool:
        """A start that failed at once gave its adoption or deploy slot
        back: the next turn plans with it at once (True). A deploy that
        started it learns it first."""
        if failed is not None:
            self.bases.start_failed(v, seq, now, failed.deploy_why)
            if failed.adoption:
                self.bases.adoption_refused()
            v.start_failed(now, failed.why, seq)
            v.note_error(f"cannot start: {failed.why}")
            retry = max(0, v.not_before - now) if failed.adoption else v.backoff
            self.log(f"{failed.line}; retry in {retry:.1f} s", v.name)
        return v.proc(seq) is None

    def adoption_failed(self, v: Vassal, seq: int, now: float, reason: str,
                        timed_out: bool) -> None:
        """The plan failed an adoption (FailAdoption): the vassal retries after
        its backoff; a timeout counts against its base (bases.WedgeWatch)."""
        p = v.proc(seq)
        self.procs.adoption_failed(v.name, seq)  # a vassal forked anyway sees EOF and stops
        self.bases.start_failed(v, seq, now, f"adoption failed: {reason}")
        v.start_failed(now, reason, seq)
        v.note_error(f"adoption failed: {reason}")
        self.log(f"adoption failed: {reason}; retry in {max(0, v.not_before - now):.1f} s", v.name)
        if timed_out and p is not None:
            self.bases.adoption_timed_out(p.base_generation)

    # -- children reaped ----------------------------------------------------------------

    def reap(self, now: float) -> int:
        """Every child reaped goes to its owner: a vassal, a template render,
        nginx; a stranger is an orphan's end (or an adopted vassal's, before
        its pid reached us). Returns how many were reaped."""
        reaped = self.procs.reap()
        for r in reaped:
            if r.owner is not None:
                with self.boundary(r.owner[0], now):
                    self.vassal_exited(r.owner[0], r.owner[1], r.pid, r.status, now)
            elif self.files.renderer.reaped(r.pid):
                continue
            elif self.routes.front is not None and self.routes.front.owns(r.pid):
                self.routes.front.exited(r.pid, r.status, now, describe_status)
            else:
                self.sweeper.reaped(r.pid)
                self.procs.exited_unknown(r.pid, r.status, now)
                self.log(f"reaped pid {r.pid} ({describe_status(r.status)})")
        return len(reaped)

    def sweep(self, now: float, everything: bool = False) -> None:
        """What ended vassal processes left behind is asked to go (orphans.py)."""
        # template renders and nginx: ours, not strangers to log
        live = {*self.procs.pids, *self.routes.pids(), *self.files.renderer.pids}
        self.sweeper.sweep(now, live, self.procs.in_flight() > 0, everything)

    def vassal_exited(self, name: str, seq: int, pid: int, status: int, now: float) -> None:
        v = self.vassals[name]
        self.outlived.exited(name, pid, self.procs.output_of(name, seq), now)
        self.procs.drop(name, seq)
        if (cg := self.cgroups()) is not None:  # what is left in its cgroup goes too
            cg.ended(name, seq, now, session=pid)
        # what it forked and left behind is ours now: swept once this turn
        self.sweeper.vassal_ended(pid, name)
        st = describe_status(status)
        forget_requests(pid)  # its requests file, if it wrote one
        p = v.proc(pid=pid)
        seq = p.seq if p is not None else None
        if p is not None and p is v.successor:
            self.bases.start_failed(v, p.seq, now, f"pid {pid} died ({st})")
        what = v.exited(status, now, pid)
        if what == Exit.RETIRED:
            self.log(f"old pid {pid} stopped ({st})", name)
        elif what == Exit.STOPPED:
            self.log(f"pid {pid} stopped ({st})", name)
        elif what == Exit.SUCCESSOR_DIED:
            v.note_error(f"new pid {pid} died ({st})", seq)
            self.log(f"new pid {pid} died ({st}); old one keeps serving; retry in "
                     f"{max(0.0, v.not_before - now):.1f} s", name)
        elif what == Exit.TOOK_OVER:
            self.log(f"pid {pid} died ({st}); its successor pid {v.pid} takes over", name)
        else:
            st += own_harakiri_kill(p, status)
            # a base killed as wedged keeps that reason in the status
            v.note_error(self.bases.exited(pid) or f"pid {pid} died ({st})", seq)
            self.log(f"pid {pid} died ({st}); respawn in {v.backoff:.1f} s"
                     + (" (throttled)" if v.failures > 0 else ""), name)

    def dispatch(self, callback: Callable[[float], None], now: float) -> None:
        """A selector event: one about a vassal within its boundary."""
        if isinstance(callback, ForVassal):
            with self.boundary(callback.name, now, callback.seq):
                callback.fn(now)
        else:
            callback(now)

    @contextlib.contextmanager
    def boundary(self, name: str, now: float, seq: int | None = None) -> Iterator[None]:
        """Whatever goes wrong while handling one vassal (reading, rendering,
        sending its config, adopting, spawning, its bytes) is that vassal's
        failure: logged with the reason, and the loop goes on."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - the boundary: nothing of one vassal stops the fleet
            self.vassal_failed(name, seq, now, e)

    def vassal_failed(self, name: str, seq: int | None, now: float, exc: Exception) -> None:
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
                self.procs.abandon(name, p.seq)
                v.start_failed(now, why, p.seq)
        if isinstance(exc, OSError):
            v.resources_failed(now)
            self.log(f"cannot handle: {why} (at {where}); retry in "
                     f"{max(0.0, v.not_before - now):.1f} s", name)
            return
        again = self.files.config_failed(name, why)
        if not v.has_process:
            self.listeners.close(name)  # connections refused, not left in its backlog
        if not again:  # one line, not one per loop turn
            self.log(f"cannot handle: {why} (at {where}); config-error until its file "
                     "changes", name)


def own_harakiri_kill(p: Proc | None, status: int) -> str:
    """What a SIGKILL the Emperor did not send most likely was, for a
    `master = false` process with `harakiri`: its own timer, which ends a
    request whose harakiri handler could not run one second after the alarm
    (ForkServer::Process::KillTimer). The OOM killer or an operator send the
    same signal: the note says what the vassal was set to do, not more."""
    if (p is None or p.killed or not p.config.solo or not os.WIFSIGNALED(status)
            or os.WTERMSIG(status) != 9):
        return ""
    harakiri = p.config.get("harakiri") or "0"
    if not harakiri.isdigit() or int(harakiri) == 0:
        return ""
    return (f"; harakiri = {harakiri} without a master: its own timer sends SIGKILL "
            f"{int(harakiri) + 1} s into a request whose harakiri handler could not run")
