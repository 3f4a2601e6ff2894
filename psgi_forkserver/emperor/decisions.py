"""The decisions of the vassal state machine: `step()` and its parts.

A mixin of `vassal.Vassal` (the fields and the facts live there): given the
facts recorded so far and the turn's `Context`, `step()` compares what
should run with what runs, changes the vassal through the transitions it
names (vassal.py: `_start`, `_promote`, ...) and its processes through
theirs (`Proc.stop`, `Proc.kill`, ...), and returns the actions the Emperor
must carry out. It assigns only its own fields (`quiet`, `retry_at`, `seq`). No
processes, no clock but `ctx.now`.

Vassal phases (what `phase` shows):

    NEW ──step──> ADOPTING ──adopted(pid)──> STARTING ──byte 1/5──> RUNNING ──17──> LOYAL
     │   └─(no fork server ready)─> WAITING_FOR_BASE ──(ready)──> ADOPTING
     ├──step (base/plain)──> STARTING
     └──step (on-demand)──> ON_DEMAND ──connection──> ADOPTING/STARTING
    live ──(file changed / code deploy; seamless)──> RELOADING ──successor loyal──> live
    live ──(file removed, byte 22, shutdown, changed and not seamless)──> STOPPING ──exited──> NEW / ON_DEMAND
    live ──exited (unexpected)──> THROTTLED ──(backoff over)──> start again
    NEW/THROTTLED/WAITING/ON_DEMAND and not wanted ──> GONE (Forget)
    live ──hold() (`emperor stop NAME`)──> STOPPING ──exited──> STOPPED ──release() or file changed──> start
    live ──request_reload() (`emperor reload NAME`)──> RELOADING (seamless) or STOPPING ──> start
    file unusable (bad INI, template error, unreadable) ──> CONFIG_ERROR ──file fixed──> start
    no descriptors to spare for one more vassal ──> REFUSED ──room again──> start

A step that decides nothing also says what could change that (`Quiet`): a
fact recorded on the vassal, the world (the fork server's state or
generation, a shutdown), its own next wake-up, or a slot of the turn
(`Slot`). The plan leaves a quiet vassal out of later turns until one of
those comes (plan.Settled), so a branch below that waits on anything else
of the turn's must say so (`_slot`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ..proc import (
    CODE_DEPLOY, SUPERSEDED, Action, Adopt, Context, Forget, ForkServer, Kill, Kind, Phase, Proc, ProcState,
    Send, Spawn,
)
from ..protocol import EmperorByte


class Slot(StrEnum):
    """What else a quiet step waits for, besides a fact, the world and its wake-up."""

    ADOPT = "adopt"  # an adoption slot (ctx.adopt_slots)
    DEPLOY = "deploy"  # a deploy slot (ctx.deploy_slots), then an adoption slot
    TURN = "turn"  # the other vassals (a base draining, bases held in a shutdown): every turn


@dataclass(frozen=True)
class Quiet:
    """A step decided nothing, and the same step decides nothing again until
    a fact is recorded on the vassal, the world changes, `until` comes (its
    next wake-up), or `slot` (if any) is free."""

    until: float | None
    slot: Slot | None = None


class Decisions:
    """What a vassal does next (a mixin of Vassal)."""

    # what the last step waits for, if it decided nothing (None: it did)
    quiet: Quiet | None = None
    _slot: Slot | None = None  # set by the branch that waits for a slot of the turn
    retry_at: float | None = None  # a failed successor is tried again then
    seq: int = 0  # process records made so far: the last one's Proc.seq
    # base: `seq` at the last deploy request (Vassal.request_deploy, a fact):
    # a new base whose seq is not past it began loading before that request
    deploy_asked_seq: int = 0

    def _deploy_asked(self) -> None:
        """A deploy request was recorded (Vassal.request_deploy): what is
        loading now is older than what it asks for."""
        self.deploy_asked_seq = self.seq

    def _heartbeat_of(self, p: Proc) -> float | None:
        raw = p.config.get("heartbeat")
        try:
            return float(raw) if raw else None
        except ValueError:
            return None

    @property
    def heartbeat(self) -> float | None:
        return self._heartbeat_of(self.current) if self.current else None

    def wanted(self, ctx: Context) -> bool:
        return (self.config is not None and self.config.error is None and not self.held
                and not self.refused
                and not ctx.shutting_down)

    def _kind_for(self, ctx: Context) -> Kind:
        if self.is_base:
            return Kind.BASE
        if ctx.fork_server == ForkServer.NONE:
            return Kind.PLAIN
        return Kind.ADOPTED

    def _new_proc(self, kind: Kind, ctx: Context, reason: str) -> tuple[Proc, Action]:
        assert self.config is not None
        self.seq += 1
        gen = self.want_base_generation if kind == Kind.BASE else (
            ctx.base_generation if kind == Kind.ADOPTED else 0
        )
        p = Proc(self.seq, kind, self.config, gen, reason,
                 ProcState.ADOPTING if kind == Kind.ADOPTED else ProcState.STARTING,
                 started_at=ctx.now)
        return p, (Adopt(p.seq) if kind == Kind.ADOPTED else Spawn(kind, p.seq))

    def _stop_proc(self, p: Proc, now: float, reason: str) -> list[Action]:
        p.stop(now, reason, self.policy.mercy)
        return [Send(EmperorByte.STOP, p.seq)]

    def _kill_proc(self, p: Proc, now: float, reason: str, why: str) -> list[Action]:
        p.kill(now, reason)
        return [Kill(why, p.seq)]

    def _stop(self, now: float, reason: str) -> list[Action]:
        assert self.current is not None
        acts = self._stop_proc(self.current, now, reason)
        s = self.successor
        if s is not None and s.live:
            acts += self._stop_proc(s, now, reason)
        return acts

    def _mercy(self, p: Proc, now: float) -> list[Action]:
        if p.mercy_over(now):
            return [Kill(f"still alive {self.policy.mercy:g} s after stop", p.seq)]
        return []

    def _heartbeat_missed(self, p: Proc, ctx: Context) -> list[Action]:
        hb = self._heartbeat_of(p)
        heard = ctx.heard_until
        if p.live and hb and p.last_heartbeat is not None and heard - p.last_heartbeat > hb:
            return self._kill_proc(p, ctx.now, "heartbeat missed",
                                   f"no heartbeat for {heard - p.last_heartbeat:.1f} s")
        return []

    def _replace(self, now: float) -> list[Action]:
        old = self._promote(now)
        if old.kind == Kind.BASE:
            old.retire_when_drained()
            return []
        return self._stop_proc(old, now, "replaced")

    def _reload_reason(self, ctx: Context) -> str | None:
        cur = self.current
        assert cur is not None and self.config is not None
        if cur.config.fingerprint != self.config.fingerprint:
            return "config changed"
        if self.touched:
            return "file touched"
        if cur.kind == Kind.BASE and self.want_base_generation > cur.base_generation:
            return CODE_DEPLOY
        if (cur.kind == Kind.ADOPTED and ctx.fork_server == ForkServer.READY
                and ctx.base_generation > cur.base_generation):
            return CODE_DEPLOY
        if self.reload_asked and cur.kind != Kind.BASE:
            return "reload requested"
        if cur.replacement_asked:
            return "replacement asked"
        return None

    def step(self, ctx: Context) -> list[Action]:
        now = ctx.now
        acts: list[Action] = []
        self.retry_at = None
        self._slot = None
        for p in list(self.retiring):
            if p.state != ProcState.STOPPING:
                drained = p.base_generation not in ctx.base_users
                if not p.hold or (drained and not ctx.hold_bases):
                    acts += self._stop_proc(p, now, p.stop_reason or "replaced")
                else:
                    self._slot = Slot.TURN  # drained once the others moved off it
            acts += self._mercy(p, now)
        acts += self._step_main(ctx)
        self._sync(now)
        self.quiet = None if acts else Quiet(self.next_wakeup(), self._slot)
        return acts

    def _step_main(self, ctx: Context) -> list[Action]:
        now = ctx.now
        cur = self.current
        if cur is None:
            return self._step_idle(ctx)
        if cur.state == ProcState.STOPPING:
            acts = self._mercy(cur, now)
            if self.successor is not None:
                acts += self._mercy(self.successor, now)
            return acts
        if cur.state == ProcState.ADOPTING:
            return []  # wait for the pid (then decide)

        # the current process is live
        if ctx.shutting_down:
            if cur.kind == Kind.BASE and ctx.hold_bases:
                self._slot = Slot.TURN  # until the others are gone
                return []
            return self._stop(now, "shutdown")
        if self.config is None:
            return self._stop(now, "file removed")
        if self.held:
            return self._stop(now, "stopped by the operator")
        acts = self._heartbeat_missed(cur, ctx)
        if acts:
            return acts
        reason = self._take_stop_request()  # byte 22
        if reason:
            return self._stop(now, reason)

        return self._step_reload(ctx)

    def _step_idle(self, ctx: Context) -> list[Action]:
        """No current process: start one, wait, or be forgotten."""
        now = ctx.now
        if not self.wanted(ctx):
            if self.config is not None and not ctx.shutting_down:
                # invalid config, refused or held: nothing to do until the
                # file changes (or room again, or `emperor start NAME`)
                self._enter(Phase.REFUSED if self.refused
                            else Phase.CONFIG_ERROR if self.config.error is not None
                            else Phase.STOPPED, now)
                return []
            if self.retiring:
                return []
            self._enter(Phase.GONE, now)
            return [Forget()]
        if self.phase == Phase.THROTTLED and now < self.not_before:
            return []
        if self.on_demand and not self.woken:
            self._enter(Phase.ON_DEMAND, now)
            return []
        kind = self._kind_for(ctx)
        if kind == Kind.ADOPTED and ctx.fork_server != ForkServer.READY:
            self._enter(Phase.WAITING_FOR_BASE, now)
            return []
        if kind == Kind.ADOPTED and ctx.adopt_slots <= 0:
            self._slot = Slot.ADOPT
            return []  # queued: the next adoption that completes wakes the loop
        p, action = self._new_proc(kind, ctx, "start")
        self._start(p)
        return [action]

    def _step_reload(self, ctx: Context) -> list[Action]:
        """The current process is live and wanted: promote a successor that
        is ready, or start one when the config, the file or the base changed."""
        now = ctx.now
        cur = self.current
        assert cur is not None and self.config is not None
        s = self.successor
        if s is not None and s.kind == Kind.BASE and s.live and s.pid is not None \
                and s.seq <= self.deploy_asked_seq:
            # it read an older file or older code (a deploy starting, the
            # back-off retry of a failed one): never promoted, or vassals
            # would move onto what the request replaces, with no deploy of
            # its own; killed, and its generation starts again, the same deploy
            return self._kill_proc(s, now, SUPERSEDED, f"new base pid {s.pid} superseded "
                                   "by a later deploy request: its generation starts again")
        if s is not None:
            acts = self._heartbeat_missed(s, ctx) if s.live else []
            if s.state == ProcState.LOYAL or (
                s.live and s.kind == Kind.BASE and s.state != ProcState.STARTING
            ) or (
                s.state == ProcState.RUNNING and s.ready_at is not None
                and now >= s.ready_at + self.policy.reload_grace
            ):
                return acts + self._replace(now)
            return acts
        if self.config.error is not None:
            return []
        reason = self._reload_reason(ctx)
        if reason is None:
            return []
        if reason == "replacement asked" and now < self.replace_at:
            self.retry_at = self.replace_at
            return []  # asked too soon after its start, again: the back-off
        seamless = self.seamless or cur.kind == Kind.BASE
        if not seamless:
            self._reload_by_restart()
            return self._stop(now, reason)
        if now < self.not_before:
            self.retry_at = self.not_before
            return []  # a successor failed lately: wait
        kind = self._kind_for(ctx)
        if kind == Kind.ADOPTED and ctx.fork_server != ForkServer.READY:
            return []  # keep serving; move once the fork server is back
        if reason == CODE_DEPLOY and cur.kind == Kind.ADOPTED and ctx.deploy_slots <= 0:
            self._slot = Slot.DEPLOY
            return []
        if kind == Kind.ADOPTED and ctx.adopt_slots <= 0:
            self._slot = Slot.ADOPT
            return []
        p, action = self._new_proc(kind, ctx, reason)
        self._start_successor(p)
        return [action]

    def next_wakeup(self) -> float | None:
        """When step() may have something to do without any new fact."""
        times: list[float] = []
        if self.phase == Phase.THROTTLED:
            times.append(self.not_before)
        if self.retry_at is not None:
            times.append(self.retry_at)
        for p in self.procs():
            if p.state == ProcState.STOPPING and not p.killed and p.stop_deadline is not None:
                times.append(p.stop_deadline)
            hb = self._heartbeat_of(p)
            if p.live and p.last_heartbeat is not None and hb:
                times.append(p.last_heartbeat + hb + 0.001)
            if p is self.successor and p.state == ProcState.RUNNING and p.ready_at is not None:
                times.append(p.ready_at + self.policy.reload_grace)
        return min(times) if times else None
