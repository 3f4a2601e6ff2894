"""Each vassal as a small state machine, with no processes in it.

Facts are recorded by plain methods (`update_config`, `request_deploy`,
`on_connection`, `spawned`, `adopted`, `start_failed`, `mark_ready`,
`on_byte`, `exited`); `step(ctx)` compares what should run with what runs
and returns the actions the Emperor must carry out (`Spawn`, `Adopt`,
`Send`, `Kill`, `Forget`). The Emperor executes them and feeds the outcome
back as facts. Nothing here forks, sends or sleeps, so every transition is
unit-testable.

A vassal may have several processes at once, each a `Proc` record with its
own small life (ADOPTING -> STARTING -> RUNNING -> LOYAL -> STOPPING):

- `current`: the process that serves;
- `successor`: during a gap-free reload or a code deploy, the new process,
  started while `current` still serves (both on the Emperor's socket);
  once it is loyal (byte 17; or byte 1/5 plus `Policy.reload_grace`) it is
  promoted and the old one retires;
- `retiring`: old processes asked to stop gracefully (byte 2, SIGKILL after
  the mercy timeout). An old *base* retires only once no adopted vassal
  forked from it is left ("drained").

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

Crash loops: a process that dies unexpectedly within `stable_after`
seconds of its start counts as a failure; the restart waits
`backoff_first * 2**(failures-1)` seconds, at most `backoff_max` (uWSGI:
1 s doubling to 3 min). Loyalty (byte 17) resets the count; a process that
lived `stable_after` is restarted at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from .config import VassalConfig, emperor_keys
from .protocol import EmperorByte, VassalByte

#: keys of a vassal file that only the Emperor reads; the vassal never sees them
EMPEROR_KEYS = emperor_keys()  # declared in perl/ForkServer/options.json


class Phase(StrEnum):
    NEW = "new"  # wanted, no process (first start, or stopped for a restart)
    WAITING_FOR_BASE = "waiting-for-base"
    ON_DEMAND = "on-demand"  # socket bound, waiting for its first connection
    ADOPTING = "adopting"  # adoption request in flight, no pid yet
    STARTING = "starting"  # process exists, start-up not reported done
    RUNNING = "running"  # byte 1 (base: fork server accepting) or 5
    LOYAL = "loyal"  # byte 17
    RELOADING = "reloading"  # a successor is starting; the current one serves
    STOPPING = "stopping"  # asked to stop, waiting for it to exit
    THROTTLED = "throttled"  # died; respawn at not_before
    CONFIG_ERROR = "config-error"  # its file cannot be used: waits for the file to change
    STOPPED = "stopped"  # `emperor stop NAME`: waits for `start NAME` or a changed file
    REFUSED = "refused"  # the Emperor has no descriptors to spare for it: waits for room
    GONE = "gone"  # no process and not wanted: forget it


LIVE = frozenset({Phase.STARTING, Phase.RUNNING, Phase.LOYAL})


class Kind(StrEnum):
    BASE = "base"  # fork+exec, serves the fork server
    ADOPTED = "adopted"  # forked by the base's fork server
    PLAIN = "plain"  # fork+exec, cold start


class ForkServer(StrEnum):
    """What the Emperor knows about the fork server, for step()."""

    NONE = "none"  # no base at all: vassals start plain
    WAITING = "waiting"  # a base is configured but not (yet) accepting
    READY = "ready"


# Actions -------------------------------------------------------------------
# `seq` names the process record an action is about (Proc.seq). It is left
# out of equality so that tests can write `[Adopt()]`.


@dataclass(frozen=True)
class Spawn:
    """fork+exec the vassal program (base or plain vassal)."""

    kind: Kind
    seq: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Adopt:
    """Send an adoption request to the fork server."""

    seq: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Send:
    byte: EmperorByte
    seq: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Kill:
    """SIGKILL the process and its descendants (mercy timeout, heartbeat)."""

    reason: str
    seq: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Forget:
    """No process and not wanted any more: drop the vassal."""


Action = Spawn | Adopt | Send | Kill | Forget


@dataclass(frozen=True)
class Context:
    now: float
    fork_server: ForkServer = ForkServer.NONE
    shutting_down: bool = False
    hold_bases: bool = False  # shutdown: bases wait until the others are gone
    base_generation: int = 0  # generation of the ready fork server
    deploy_slots: int = 0  # adopted vassals that may start moving now
    base_users: frozenset[int] = frozenset()  # base generations adopted vassals run on
    # adoption requests that may be sent now: the fork server serves them one
    # after another, so a mass start queues here rather than in its backlog
    adopt_slots: int = 1 << 30


@dataclass
class Policy:
    mercy: float = 30.0  # graceful stop, then SIGKILL
    backoff_first: float = 1.0  # uWSGI: 1 s ...
    backoff_max: float = 180.0  # ... doubling up to 3 min
    stable_after: float = 10.0  # lived this long: not a crash loop
    reload_grace: float = 1.0  # successor sent 1/5 but no 17: promote after this


@dataclass
class Proc:
    """One process of a vassal."""

    seq: int
    kind: Kind
    config: VassalConfig
    base_generation: int = 0  # base: its generation; adopted: its base's
    reason: str = "start"  # why it was started ("start", "config changed", "code deploy", ...)
    state: Phase = Phase.ADOPTING
    pid: int | None = None
    started_at: float | None = None
    ready_at: float | None = None  # byte 1/5 (or a base's probe)
    last_heartbeat: float | None = None
    stop_deadline: float | None = None
    stop_reason: str | None = None
    killed: bool = False
    hold: bool = False  # retiring base: stop only once drained

    @property
    def live(self) -> bool:
        return self.state in LIVE


@dataclass
class Vassal:
    name: str
    config: VassalConfig | None  # desired; None once the file is gone
    is_base: bool = False  # what the desired config says
    policy: Policy = field(default_factory=Policy)
    seamless: bool = False  # set by the Emperor: reloads may overlap (it owns the socket)

    phase: Phase = Phase.NEW
    current: Proc | None = None
    successor: Proc | None = None
    retiring: list[Proc] = field(default_factory=list)
    since: float = 0.0  # entered the current phase
    not_before: float = 0.0  # THROTTLED (or a failed successor): next try
    stop_reason: str | None = None  # byte 22 received, not acted on yet
    failures: int = 0  # consecutive deaths without being loyal/stable
    last_status: int | None = None
    generation: int = 0  # how many processes this vassal has had
    restarts: int = 0  # processes started again after an unexpected death or a kill
    want_base_generation: int = 1  # base: the generation that should run
    woken: bool = False  # on-demand: a connection is waiting
    last_kind: Kind | None = None
    seq: int = 0
    retry_at: float | None = None  # a failed successor is tried again then
    last_error: str | None = None  # the last failure the Emperor logged (status shows it)
    held: bool = False  # stopped by the operator (`emperor stop NAME`)
    reload_asked: bool = False  # `emperor reload NAME`, not acted on yet
    touched: bool = False  # its file was touched: reload, though the config is the same
    refused: str | None = None  # why the Emperor cannot take it on (no descriptors to spare)

    # -- the current process, as flat read-only fields ------------------------

    @property
    def pid(self) -> int | None:
        return self.current.pid if self.current else None

    @property
    def kind(self) -> Kind | None:
        return self.current.kind if self.current else self.last_kind

    @property
    def started_at(self) -> float | None:
        return self.current.started_at if self.current else None

    @property
    def running(self) -> VassalConfig | None:
        return self.current.config if self.current else None

    @property
    def last_heartbeat(self) -> float | None:
        return self.current.last_heartbeat if self.current else None

    @property
    def stop_deadline(self) -> float | None:
        return self.current.stop_deadline if self.current else None

    @property
    def killed(self) -> bool:
        return self.current.killed if self.current else False

    @property
    def base_generation(self) -> int:
        return self.current.base_generation if self.current else 0

    @property
    def on_demand(self) -> bool:
        cfg = self.config
        raw = (cfg.get("on-demand") or "") if cfg else ""
        return raw.lower() in ("1", "true", "yes", "on")

    @property
    def has_process(self) -> bool:
        return self.current is not None or self.successor is not None or bool(self.retiring)

    def procs(self) -> list[Proc]:
        return [p for p in (self.current, self.successor, *self.retiring) if p is not None]

    def proc(self, seq: int | None = None, pid: int | None = None) -> Proc | None:
        if seq is None and pid is None:
            return self.current
        for p in self.procs():
            if (seq is not None and p.seq == seq) or (pid is not None and p.pid == pid):
                return p
        return None

    # -- facts ---------------------------------------------------------------

    def _enter(self, phase: Phase, now: float) -> None:
        if phase != self.phase:
            self.phase = phase
            self.since = now

    def _sync(self, now: float) -> None:
        if self.current is not None:
            self._enter(Phase.RELOADING if self.successor else self.current.state, now)

    def update_config(self, config: VassalConfig | None, is_base: bool = False) -> bool:
        """The file was (re)read. Returns True if the desired state changed."""
        old = self.config
        self.config = config
        self.is_base = is_base if config is not None else self.is_base
        changed = (old is None) != (config is None) or (
            old is not None and config is not None and old.fingerprint != config.fingerprint
        )
        if changed and config is not None:
            self.held = False  # a changed file is a new instruction: run it
            if self.phase == Phase.THROTTLED or self.successor is None:
                # a new config may fix a crash loop: try it at once
                self.failures = 0
                self.not_before = 0.0
            if self.is_base and self.current is not None and self.current.kind == Kind.BASE:
                self.request_deploy()
        return changed

    def touch(self) -> None:
        """`touch` of the file: a reload as if its content had changed (a
        base: a new generation, what a changed base file does). A stopped
        vassal runs again, as for any change of its file."""
        self.held = False
        if self.is_base and self.current is not None and self.current.kind == Kind.BASE:
            self.request_deploy()
        elif self.current is not None:
            self.touched = True

    def request_deploy(self) -> None:
        """Base: start a new generation (changed base file, SIGUSR1)."""
        running = max((p.base_generation for p in self.procs() if p.kind == Kind.BASE), default=0)
        self.want_base_generation = max(self.want_base_generation, running + 1)

    def hold(self) -> None:
        """`emperor stop NAME`: stop gracefully and stay stopped (STOPPED)
        until `release()` or the file changes."""
        self.held = True
        self.reload_asked = False

    def release(self) -> None:
        """`emperor start NAME`: run again now, without a crash-loop backoff."""
        self.held = False
        self.failures = 0
        self.not_before = 0.0

    def request_reload(self) -> None:
        """`emperor reload NAME`: a new process now (gap-free where the
        Emperor owns the socket); one that waits for its backoff starts now.
        A base reloads through `request_deploy` (a code deploy) instead."""
        self.not_before = 0.0
        if self.current is not None:
            self.reload_asked = True

    def on_connection(self, now: float) -> None:
        """On-demand: its socket is readable."""
        self.woken = True

    def spawned(self, pid: int, now: float, seq: int | None = None) -> None:
        """fork+exec done (after a Spawn action), or the adoption's pid came."""
        p = self.proc(seq)
        assert p is not None and p.pid is None, (seq, p)
        p.pid = pid
        p.started_at = now
        p.state = Phase.STARTING
        self.generation += 1
        self._sync(now)

    def adopted(self, pid: int, now: float, seq: int | None = None) -> None:
        """The fork server replied with the pid (after an Adopt action)."""
        p = self.proc(seq)
        assert p is not None and p.state == Phase.ADOPTING, p
        self.spawned(pid, now, p.seq)

    def start_failed(self, now: float, reason: str = "", seq: int | None = None) -> None:
        """Spawn or adoption failed: no process. Retry after a backoff."""
        p = self.proc(seq)
        if p is None:
            return
        if p is self.successor:
            self.successor = None
            self._delay(now)
            self._sync(now)
            return
        if p is self.current:
            self.current = None
            self._throttle(now)

    def mark_ready(self, now: float, seq: int | None = None) -> bool:
        """Start-up done (byte 1/5, or a base's fork server answers a probe)."""
        p = self.proc(seq)
        if p is not None and p.state == Phase.STARTING:
            p.state = Phase.RUNNING
            p.ready_at = now
            self._sync(now)
            return True
        return False

    def on_byte(self, byte: int, now: float, seq: int | None = None) -> str | None:
        """A byte from a process's pipe. Returns a note worth logging."""
        p = self.proc(seq)
        if p is None:
            return None
        who = "successor " if p is self.successor else ""
        if byte in (VassalByte.SPAWNED, VassalByte.ACCEPTING):
            if self.mark_ready(now, p.seq):
                what = "ready" if p.kind == Kind.BASE else "accepting" if byte == 5 else "spawned"
                return who + what
        elif byte == VassalByte.LOYAL:
            self.failures = 0
            if p.state in (Phase.STARTING, Phase.RUNNING):
                if p.ready_at is None:
                    p.ready_at = now
                p.state = Phase.LOYAL
                self._sync(now)
                return who + "loyal"
        elif byte == VassalByte.HEARTBEAT:
            p.last_heartbeat = now
        elif byte == VassalByte.DONE:
            if p is self.current and p.live:
                self.stop_reason = "idle" if self.on_demand else "asked to stop"
                return "idle" if self.on_demand else "asked to be stopped"
        return None

    def exited(self, status: int, now: float, pid: int | None = None) -> str:
        """A process was reaped. Returns what it was: "retired", "stopped",
        "successor died", "died", "died (successor took over)"."""
        p = self.proc(pid=pid) if pid is not None else self.current
        self.last_status = status
        if p is None:
            return "unknown"
        p.pid = None
        if p in self.retiring:
            self.retiring.remove(p)
            self._sync(now)
            return "retired"
        if p is self.successor:
            self.successor = None
            self._delay(now)
            self._sync(now)
            return "successor died"
        assert p is self.current
        self.last_kind = p.kind
        self.current = None
        if p.state == Phase.STOPPING:
            if p.killed and p.stop_reason and p.stop_reason.startswith("heartbeat"):
                self.restarts += 1
            if self.successor is not None:  # shutdown/removal stops both
                self.current, self.successor = self.successor, None
                self._sync(now)
            else:
                self._enter(Phase.NEW, now)
            return "stopped"
        if self.successor is not None:
            self.current, self.successor = self.successor, None
            self.restarts += 1
            self._sync(now)
            return "died (successor took over)"
        lived = now - (p.started_at if p.started_at is not None else now)
        self.restarts += 1
        if lived >= self.policy.stable_after:
            self.failures = 0
            self.not_before = now
            self._enter(Phase.THROTTLED, now)
        else:
            self._throttle(now)
        return "died"

    def _delay(self, now: float) -> float:
        self.failures += 1
        delay = min(self.policy.backoff_first * 2 ** (self.failures - 1), self.policy.backoff_max)
        self.not_before = now + delay
        return delay

    def _throttle(self, now: float) -> None:
        self._delay(now)
        self._enter(Phase.THROTTLED, now)

    @property
    def backoff(self) -> float:
        return max(0.0, self.not_before - self.since) if self.phase == Phase.THROTTLED else 0.0

    # -- decisions -----------------------------------------------------------

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
        self.touched = False  # whatever starts now reads the file as it is
        self.seq += 1
        gen = self.want_base_generation if kind == Kind.BASE else (
            ctx.base_generation if kind == Kind.ADOPTED else 0
        )
        p = Proc(self.seq, kind, self.config, gen, reason,
                 Phase.ADOPTING if kind == Kind.ADOPTED else Phase.STARTING)
        p.started_at = ctx.now
        return p, (Adopt(p.seq) if kind == Kind.ADOPTED else Spawn(kind, p.seq))

    def _stop_proc(self, p: Proc, now: float, reason: str) -> list[Action]:
        p.stop_reason = reason
        p.stop_deadline = now + self.policy.mercy
        p.state = Phase.STOPPING
        return [Send(EmperorByte.STOP, p.seq)]

    def _kill_proc(self, p: Proc, now: float, reason: str, why: str) -> list[Action]:
        p.stop_reason = reason
        p.stop_deadline = now
        p.killed = True
        p.state = Phase.STOPPING
        return [Kill(why, p.seq)]

    def _stop(self, now: float, reason: str) -> list[Action]:
        assert self.current is not None
        acts = self._stop_proc(self.current, now, reason)
        s = self.successor
        if s is not None and s.live:
            acts += self._stop_proc(s, now, reason)
        return acts

    def _mercy(self, p: Proc, now: float) -> list[Action]:
        if p.state == Phase.STOPPING and not p.killed and p.stop_deadline is not None \
                and now >= p.stop_deadline:
            p.killed = True
            return [Kill(f"still alive {self.policy.mercy:g} s after stop", p.seq)]
        return []

    def _heartbeat_missed(self, p: Proc, now: float) -> list[Action]:
        hb = self._heartbeat_of(p)
        if p.live and hb and p.last_heartbeat is not None and now - p.last_heartbeat > hb:
            return self._kill_proc(p, now, "heartbeat missed",
                                   f"no heartbeat for {now - p.last_heartbeat:.1f} s")
        return []

    def _promote(self, now: float) -> list[Action]:
        old, new = self.current, self.successor
        assert old is not None and new is not None
        self.current, self.successor = new, None
        self.retiring.append(old)
        self._sync(now)
        if old.kind == Kind.BASE:
            old.hold = True  # stopped once no adopted vassal runs on it
            old.stop_reason = "replaced"
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
            return "code deploy"
        if (cur.kind == Kind.ADOPTED and ctx.fork_server == ForkServer.READY
                and ctx.base_generation > cur.base_generation):
            return "code deploy"
        if self.reload_asked and cur.kind != Kind.BASE:
            return "reload requested"
        return None

    def step(self, ctx: Context) -> list[Action]:
        now = ctx.now
        acts: list[Action] = []
        self.retry_at = None
        for p in list(self.retiring):
            if p.state != Phase.STOPPING:
                drained = p.base_generation not in ctx.base_users
                if not p.hold or (drained and not ctx.hold_bases):
                    acts += self._stop_proc(p, now, p.stop_reason or "replaced")
            acts += self._mercy(p, now)
        acts += self._step_main(ctx)
        self._sync(now)
        return acts

    def _step_main(self, ctx: Context) -> list[Action]:
        now = ctx.now
        cur = self.current
        if cur is None:
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
                return []  # queued: the next adoption that completes wakes the loop
            self.woken = False
            self.stop_reason = None
            self.current, action = self._new_proc(kind, ctx, "start")
            return [action]

        if cur.state == Phase.STOPPING:
            acts = self._mercy(cur, now)
            if self.successor is not None:
                acts += self._mercy(self.successor, now)
            return acts
        if cur.state == Phase.ADOPTING:
            return []  # wait for the pid (then decide)

        # the current process is live
        if ctx.shutting_down:
            if cur.kind == Kind.BASE and ctx.hold_bases:
                return []
            return self._stop(now, "shutdown")
        if self.config is None:
            return self._stop(now, "file removed")
        if self.held:
            return self._stop(now, "stopped by the operator")
        acts = self._heartbeat_missed(cur, now)
        if acts:
            return acts
        if self.stop_reason:  # byte 22
            reason, self.stop_reason = self.stop_reason, None
            return self._stop(now, reason)

        s = self.successor
        if s is not None:
            acts = self._heartbeat_missed(s, now) if s.live else []
            if s.state == Phase.LOYAL or (
                s.live and s.kind == Kind.BASE and s.state != Phase.STARTING
            ) or (
                s.state == Phase.RUNNING and s.ready_at is not None
                and now >= s.ready_at + self.policy.reload_grace
            ):
                return acts + self._promote(now)
            return acts
        if self.config.error is not None:
            return []
        reason = self._reload_reason(ctx)
        if reason is None:
            return []
        seamless = self.seamless or cur.kind == Kind.BASE
        if not seamless:
            self.reload_asked = False
            self.touched = False
            return self._stop(now, reason)
        if now < self.not_before:
            self.retry_at = self.not_before
            return []  # a successor failed lately: wait
        kind = self._kind_for(ctx)
        if kind == Kind.ADOPTED and ctx.fork_server != ForkServer.READY:
            return []  # keep serving; move once the fork server is back
        if reason == "code deploy" and cur.kind == Kind.ADOPTED and ctx.deploy_slots <= 0:
            return []
        if kind == Kind.ADOPTED and ctx.adopt_slots <= 0:
            return []
        self.reload_asked = False
        self.successor, action = self._new_proc(kind, ctx, reason)
        return [action]

    def next_wakeup(self) -> float | None:
        """When step() may have something to do without any new fact."""
        times: list[float] = []
        if self.phase == Phase.THROTTLED:
            times.append(self.not_before)
        if self.retry_at is not None:
            times.append(self.retry_at)
        for p in self.procs():
            if p.state == Phase.STOPPING and not p.killed and p.stop_deadline is not None:
                times.append(p.stop_deadline)
            hb = self._heartbeat_of(p)
            if p.live and p.last_heartbeat is not None and hb:
                times.append(p.last_heartbeat + hb + 0.001)
            if p is self.successor and p.state == Phase.RUNNING and p.ready_at is not None:
                times.append(p.ready_at + self.policy.reload_grace)
        return min(times) if times else None
