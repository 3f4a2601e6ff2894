"""The records and vocabulary of the vassal state machine (emperor/vassal.py).

`Proc` is one process of a vassal; `Phase` what a vassal shows, `ProcState`
where one of its processes is; the actions (`Spawn`, `Adopt`, `Send`,
`Kill`, `Forget`) are what `Vassal.step` asks the Emperor to carry out;
`Context` is what the Emperor tells it about the world each turn; `Policy`
the timings. A `Proc`'s fields change only through its own methods (its
transitions), which the vassal's facts and decisions call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .config import VassalConfig
from .options import DEFAULTS
from .protocol import EmperorByte

CODE_DEPLOY = "code deploy"  # Proc.reason of the processes a code deploy starts
# Proc.stop_reason of a new base killed before it served: a later deploy
# request (SIGUSR1, a changed base file) came after it began to load
SUPERSEDED = "superseded by a later deploy request"


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


class ProcState(StrEnum):
    """The life of one process (the five vassal phases that apply to one);
    its values are the matching `Phase`'s, which the vassal shows."""

    ADOPTING = "adopting"  # adoption request in flight, no pid yet
    STARTING = "starting"  # process exists, start-up not reported done
    RUNNING = "running"  # byte 1 (base: fork server accepting) or 5
    LOYAL = "loyal"  # byte 17
    STOPPING = "stopping"  # asked to stop (byte 2 or SIGKILL), not reaped yet

    @property
    def phase(self) -> Phase:
        return Phase(self.value)


LIVE = frozenset({ProcState.STARTING, ProcState.RUNNING, ProcState.LOYAL})


class Exit(StrEnum):
    """What a reaped process was to its vassal (`Vassal.exited`)."""

    RETIRED = "retired"  # an old process that was replaced
    STOPPED = "stopped"  # asked to stop (removal, shutdown, byte 22, a kill)
    SUCCESSOR_DIED = "successor died"  # the new process died; the old one serves
    TOOK_OVER = "died (successor took over)"  # died while its successor was starting
    DIED = "died"  # died unexpectedly: throttled restart
    UNKNOWN = "unknown"  # not one of its processes


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
    # what a vassal sent before this was read (None: before `now`): a
    # silence is judged against it, so a freeze of the Emperor between its
    # last read and this turn is never taken for the vassal's
    heard: float | None = None

    @property
    def heard_until(self) -> float:
        return self.now if self.heard is None else min(self.now, self.heard)


def backoff_delay(failures: int, first: float, most: float) -> float:
    """The crash-loop backoff after `failures` failures in a row: `first`
    seconds, doubling, at most `most` (vassals and the front door's nginx)."""
    return min(first * 2 ** (failures - 1), most)


# A `master = false` process that asks for its successor (byte 22) this
# soon after its start is not a process that served its max-requests: an
# app that asks after every request lives milliseconds. Not `stable_after`
# (10 s): a busy vassal recycled by max-requests every few seconds would
# then wait out a back-off with nobody accepting (the asking process
# accepts nothing more); a second bounds the hostile case to about one
# adoption a second.
QUICK_REPLACEMENT = 1.0


def replacement_wait(in_a_row: int, lived: float, policy: "Policy") -> tuple[int, float]:
    """Byte 22 of a `master = false` process that lived `lived` s, after
    `in_a_row` replacements asked by processes younger than
    QUICK_REPLACEMENT: (the new count, how long its successor waits). Such a
    young one counts as a crash would: its successor starts the back-off
    after its start (else an app that asks after every request has one
    adoption each, as fast as they come); an older one is replaced at once.
    The wait is at most QUICK_REPLACEMENT from its start: one that asked
    because of max-requests accepts nothing more, and a busy vassal served
    its max-requests in less than a second, again and again, would otherwise
    wait the back-off's minutes with nobody accepting; one adoption a second
    is what holds a hostile app."""
    if lived >= QUICK_REPLACEMENT:
        return 0, 0.0
    in_a_row += 1
    delay = min(backoff_delay(in_a_row, policy.backoff_first, policy.backoff_max), QUICK_REPLACEMENT)
    return in_a_row, max(0.0, delay - lived)


@dataclass
class Policy:
    """The timings of every vassal's life (options.Options declares them)."""

    mercy: float = DEFAULTS["mercy"]  # graceful stop, then SIGKILL
    backoff_first: float = DEFAULTS["backoff_first"]  # uWSGI: 1 s ...
    backoff_max: float = DEFAULTS["backoff_max"]  # ... doubling up to 3 min
    stable_after: float = DEFAULTS["stable_after"]  # lived this long: not a crash loop
    reload_grace: float = DEFAULTS["reload_grace"]  # successor sent 1/5 but no 17: promote after this

    @classmethod
    def of(cls, opts: Any) -> Policy:
        """The policy part of an options.Options."""
        return cls(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(cls)})


@dataclass
class Proc:
    """One process of a vassal."""

    seq: int
    kind: Kind
    config: VassalConfig
    base_generation: int = 0  # base: its generation; adopted: its base's
    reason: str = "start"  # why it was started ("start", "config changed", "code deploy", ...)
    state: ProcState = ProcState.ADOPTING
    pid: int | None = None
    started_at: float | None = None
    ready_at: float | None = None  # byte 1/5 (or a base's probe)
    last_heartbeat: float | None = None
    stop_deadline: float | None = None
    stop_reason: str | None = None
    killed: bool = False
    hold: bool = False  # retiring base: stop only once drained
    # `master = false`: byte 22 after max-requests or a reload, "replace me";
    # it accepts no more and waits for the stop that follows its successor
    replacement_asked: bool = False

    @property
    def live(self) -> bool:
        return self.state in LIVE

    @property
    def superseded(self) -> bool:
        """A new base the Emperor killed for a later request: no failure."""
        return self.killed and self.stop_reason == SUPERSEDED

    # -- its transitions ---------------------------------------------------

    def started(self, pid: int, now: float) -> None:
        """It exists: forked and exec'd, or the fork server's reply named it."""
        self.pid = pid
        self.started_at = now
        self.state = ProcState.STARTING

    def ready(self, now: float) -> bool:
        """Start-up done (byte 1/5, or a base's probe); False if it was not starting."""
        if self.state != ProcState.STARTING:
            return False
        self.state = ProcState.RUNNING
        self.ready_at = now
        return True

    def loyal(self, now: float) -> bool:
        """Byte 17 (every worker accepts); False if it was not starting or running."""
        if self.state not in (ProcState.STARTING, ProcState.RUNNING):
            return False
        if self.ready_at is None:
            self.ready_at = now
        self.state = ProcState.LOYAL
        return True

    def ask_replacement(self) -> bool:
        """Byte 22 of a `master = false` process; True the first time."""
        asked, self.replacement_asked = self.replacement_asked, True
        return not asked

    def beat(self, now: float) -> None:
        self.last_heartbeat = now

    def reaped(self) -> None:
        self.pid = None

    def stop(self, now: float, reason: str, mercy: float) -> None:
        """Asked to stop gracefully (byte 2): killed if alive `mercy` s from now."""
        self.stop_reason = reason
        self.stop_deadline = now + mercy
        self.state = ProcState.STOPPING

    def kill(self, now: float, reason: str) -> None:
        """Killed at once, without a graceful stop (a missed heartbeat)."""
        self.stop(now, reason, 0.0)
        self.killed = True

    def mercy_over(self, now: float) -> bool:
        """Still alive past its stop deadline: killed now. True once."""
        if self.state == ProcState.STOPPING and not self.killed \
                and self.stop_deadline is not None and now >= self.stop_deadline:
            self.killed = True
            return True
        return False

    def retire_when_drained(self) -> None:
        """An old base, replaced: stopped once no adopted vassal runs on it."""
        self.hold = True
        self.stop_reason = "replaced"

