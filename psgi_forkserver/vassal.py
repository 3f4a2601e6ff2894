"""Each vassal as a small state machine, with no processes in it.

Facts are recorded by plain methods (`update_config`, `spawned`, `adopted`,
`start_failed`, `on_byte`, `exited`); `step(now, ctx)` compares what should
run with what runs and returns the actions the Emperor must carry out
(`Spawn`, `Adopt`, `Send`, `Kill`, `Forget`). The Emperor executes them and
feeds the outcome back as facts. Nothing here forks, sends or sleeps, so
every transition is unit-testable.

    NEW ──step──> ADOPTING ──adopted(pid)──> STARTING ──byte 1/5──> RUNNING ──17──> LOYAL
     │   └─(no fork server ready)─> WAITING_FOR_BASE ──(ready)──> ADOPTING
     └──step (base/plain)──> STARTING
    any live phase ──(file removed/changed, byte 22, shutdown)──> STOPPING ──exited──> NEW
    live phase ──exited (unexpected)──> THROTTLED ──(backoff over)──> start again
    NEW/THROTTLED/WAITING and not wanted ──> GONE (Forget)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from .config import VassalConfig
from .protocol import EmperorByte, VassalByte


class Phase(StrEnum):
    NEW = "new"  # wanted, no process (first start, or stopped for a restart)
    WAITING_FOR_BASE = "waiting-for-base"
    ADOPTING = "adopting"  # adoption request in flight, no pid yet
    STARTING = "starting"  # process exists, start-up not reported done
    RUNNING = "running"  # byte 1 (base: fork server accepting) or 5
    LOYAL = "loyal"  # byte 17
    STOPPING = "stopping"  # asked to stop, waiting for it to exit
    THROTTLED = "throttled"  # died; respawn at not_before
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


@dataclass(frozen=True)
class Spawn:
    """fork+exec the vassal program (base or plain vassal)."""

    kind: Kind


@dataclass(frozen=True)
class Adopt:
    """Send an adoption request to the fork server."""


@dataclass(frozen=True)
class Send:
    byte: EmperorByte


@dataclass(frozen=True)
class Kill:
    """SIGKILL the vassal and its descendants (mercy timeout, heartbeat)."""

    reason: str


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


@dataclass
class Policy:
    mercy: float = 30.0  # graceful stop, then SIGKILL
    backoff_first: float = 0.1
    backoff_max: float = 30.0
    stable_after: float = 10.0  # lived this long: not a crash loop


@dataclass
class Vassal:
    name: str
    config: VassalConfig | None  # desired; None once the file is gone
    is_base: bool = False  # what the desired config says
    policy: Policy = field(default_factory=Policy)

    phase: Phase = Phase.NEW
    kind: Kind | None = None  # what the current process runs as
    running: VassalConfig | None = None  # the config the process started with
    pid: int | None = None
    started_at: float | None = None
    since: float = 0.0  # entered the current phase
    not_before: float = 0.0  # THROTTLED: respawn time
    stop_deadline: float | None = None
    stop_reason: str | None = None
    killed: bool = False
    failures: int = 0  # consecutive deaths without being loyal/stable
    last_status: int | None = None
    last_heartbeat: float | None = None
    generation: int = 0  # how many processes this vassal has had

    # -- facts ---------------------------------------------------------------

    def _enter(self, phase: Phase, now: float) -> None:
        self.phase = phase
        self.since = now

    def update_config(self, config: VassalConfig | None, is_base: bool = False) -> bool:
        """The file was (re)read. Returns True if the desired state changed."""
        old = self.config
        self.config = config
        self.is_base = is_base if config is not None else self.is_base
        changed = (old is None) != (config is None) or (
            old is not None and config is not None and old.fingerprint != config.fingerprint
        )
        if changed and config is not None and self.phase == Phase.THROTTLED:
            # a new config may fix a crash loop: try it at once
            self.failures = 0
            self.not_before = 0.0
        return changed

    def spawned(self, pid: int, now: float) -> None:
        """fork+exec done (after a Spawn action)."""
        self.pid = pid
        self.started_at = now
        self.killed = False
        self.last_heartbeat = None
        self.generation += 1
        self._enter(Phase.STARTING, now)

    def adopted(self, pid: int, now: float) -> None:
        """The fork server replied with the pid (after an Adopt action)."""
        assert self.phase == Phase.ADOPTING, self.phase
        self.spawned(pid, now)

    def start_failed(self, now: float, reason: str = "") -> None:
        """Spawn or adoption failed: no process. Retry after a backoff."""
        self.pid = None
        self._throttle(now)

    def mark_ready(self, now: float) -> bool:
        """Start-up done (byte 1, or a base's fork server answers a probe)."""
        if self.phase == Phase.STARTING:
            self._enter(Phase.RUNNING, now)
            return True
        return False

    def on_byte(self, byte: int, now: float) -> str | None:
        """A byte from the vassal's pipe. Returns a note worth logging."""
        if byte in (VassalByte.SPAWNED, VassalByte.ACCEPTING):
            if self.mark_ready(now):
                return "ready" if self.kind == Kind.BASE else "accepting" if byte == 5 else "spawned"
        elif byte == VassalByte.LOYAL:
            self.failures = 0
            if self.phase in (Phase.STARTING, Phase.RUNNING):
                self._enter(Phase.LOYAL, now)
                return "loyal"
        elif byte == VassalByte.HEARTBEAT:
            self.last_heartbeat = now
        elif byte == VassalByte.DONE:
            if self.phase in LIVE:
                self.stop_reason = "asked to stop"
                return "asked to be stopped"
        return None

    def exited(self, status: int, now: float) -> None:
        """The process was reaped."""
        self.pid = None
        self.last_status = status
        if self.phase == Phase.STOPPING:
            self.stop_reason = None
            self.stop_deadline = None
            self.running = None
            self._enter(Phase.NEW, now)
            return
        lived = now - (self.started_at if self.started_at is not None else now)
        if lived >= self.policy.stable_after:
            self.failures = 0
        self._throttle(now)

    def _throttle(self, now: float) -> None:
        self.failures += 1
        delay = min(
            self.policy.backoff_first * 2 ** (self.failures - 1), self.policy.backoff_max
        )
        self.not_before = now + delay
        self.running = None
        self._enter(Phase.THROTTLED, now)

    @property
    def backoff(self) -> float:
        return max(0.0, self.not_before - self.since) if self.phase == Phase.THROTTLED else 0.0

    # -- decisions -----------------------------------------------------------

    @property
    def heartbeat(self) -> float | None:
        cfg = self.running or self.config
        raw = cfg.get("heartbeat") if cfg else None
        try:
            return float(raw) if raw else None
        except ValueError:
            return None

    def wanted(self, ctx: Context) -> bool:
        return self.config is not None and self.config.error is None and not ctx.shutting_down

    def _stop(self, now: float, reason: str) -> list[Action]:
        self.stop_reason = reason
        self.stop_deadline = now + self.policy.mercy
        self._enter(Phase.STOPPING, now)
        return [Send(EmperorByte.STOP)]

    def step(self, ctx: Context) -> list[Action]:
        now = ctx.now
        if self.phase in (Phase.NEW, Phase.THROTTLED, Phase.WAITING_FOR_BASE):
            if not self.wanted(ctx):
                if self.config is not None and not ctx.shutting_down:
                    return []  # invalid config: wait for it to change
                self._enter(Phase.GONE, now)
                return [Forget()]
            if self.phase == Phase.THROTTLED and now < self.not_before:
                return []
            if self.is_base:
                kind = Kind.BASE
            elif ctx.fork_server == ForkServer.NONE:
                kind = Kind.PLAIN
            else:
                kind = Kind.ADOPTED
            if kind == Kind.ADOPTED and ctx.fork_server != ForkServer.READY:
                if self.phase != Phase.WAITING_FOR_BASE:
                    self._enter(Phase.WAITING_FOR_BASE, now)
                return []
            self.kind = kind
            self.running = self.config
            if kind == Kind.ADOPTED:
                self._enter(Phase.ADOPTING, now)
                return [Adopt()]
            return [Spawn(kind)]
        if self.phase in LIVE:
            if ctx.shutting_down:
                if self.kind == Kind.BASE and ctx.hold_bases:
                    return []
                return self._stop(now, "shutdown")
            if self.config is None:
                return self._stop(now, "file removed")
            if self.running is not None and self.config.fingerprint != self.running.fingerprint:
                return self._stop(now, "config changed")
            if self.stop_reason:  # byte 22
                return self._stop(now, self.stop_reason)
            hb = self.heartbeat
            if hb and self.last_heartbeat is not None and now - self.last_heartbeat > hb:
                self.stop_reason = "heartbeat missed"
                self.stop_deadline = now
                self.killed = True
                self._enter(Phase.STOPPING, now)
                return [Kill(f"no heartbeat for {now - self.last_heartbeat:.1f} s")]
            return []
        if self.phase == Phase.STOPPING:
            if not self.killed and self.stop_deadline is not None and now >= self.stop_deadline:
                self.killed = True
                return [Kill(f"still alive {self.policy.mercy:g} s after stop")]
        return []

    def next_wakeup(self) -> float | None:
        """When step() may have something to do without any new fact."""
        if self.phase == Phase.THROTTLED:
            return self.not_before
        if self.phase == Phase.STOPPING and not self.killed:
            return self.stop_deadline
        if self.phase in LIVE and self.last_heartbeat is not None and self.heartbeat:
            return self.last_heartbeat + self.heartbeat + 0.001
        return None

    @property
    def has_process(self) -> bool:
        return self.pid is not None or self.phase == Phase.ADOPTING
