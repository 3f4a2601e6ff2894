"""Each vassal as a small state machine, with no processes in it.

Facts are recorded by plain methods (`update_config`, `request_deploy`,
`on_connection`, `spawned`, `adopted`, `start_failed`, `mark_ready`,
`on_byte`, `exited`, and the Emperor's own failures: `refuse`,
`note_error`, `cannot_bind`, `resources_failed`, `config_failed`, ...);
`step(ctx)` (decisions.py) compares what should run with what runs and
returns the actions the Emperor must carry out (`Spawn`, `Adopt`, `Send`,
`Kill`, `Forget`), whose outcomes come back as facts. Nothing here forks,
sends or sleeps, so every transition is unit-testable; status readers get a
copy (`snapshot`, vassal_view.py).

Who changes what: this module declares the vassal's fields and is the only
one that assigns them, in its facts and in the few transitions the
decisions ask for by name (`_start`, `_start_successor`, `_promote`,
`_take_stop_request`, `_reload_by_restart`). The decisions keep only what
the last step waits for and the count of process records. A process record
(`Proc`, proc.py) changes only through its own methods.

A vassal may have several processes at once (`current`, `successor`,
`retiring`), each a `Proc` with its own small life (ADOPTING -> STARTING
-> RUNNING -> LOYAL -> STOPPING).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config import VassalConfig
from ..proc import (
    CODE_DEPLOY, Action, Adopt, Context, Exit, Forget, ForkServer, Kill, Kind, Phase, Policy, Proc,
    QUICK_REPLACEMENT, ProcState, Send, Spawn, backoff_delay, replacement_wait,
)
from ..protocol import VassalByte
from .decisions import Decisions, Quiet, Slot
from .facts import fact
from .vassal_view import VassalView

# the state machine's vocabulary (proc.py), imported from here too
__all__ = ["CODE_DEPLOY", "Action", "Adopt", "Context", "Exit", "Forget", "ForkServer", "Kill",
           "Kind", "Phase", "Policy", "Proc", "ProcState", "Quiet", "Send", "Slot", "Spawn", "Vassal"]

@dataclass
class Vassal(VassalView, Decisions):
    name: str
    config: VassalConfig | None  # desired; None once the file is gone
    is_base: bool = False  # what the desired config says
    policy: Policy = field(default_factory=Policy)
    # the Emperor binds http-sockets and passes them: reloads may overlap
    owns_socket: bool = False
    auto_socket: bool = False  # the Emperor gives one to a vassal with `domain` (sockets.py)

    phase: Phase = Phase.NEW
    current: Proc | None = None  # the process that serves
    # a gap-free reload or a code deploy: the new process, started while
    # `current` serves (both on the Emperor's socket); promoted once loyal
    # (byte 17, or byte 1/5 plus `Policy.reload_grace`)
    successor: Proc | None = None
    # old processes asked to stop (byte 2, SIGKILL after the mercy timeout);
    # an old base only once no adopted vassal runs on it ("drained")
    retiring: list[Proc] = field(default_factory=list)
    since: float = 0.0  # entered the current phase
    not_before: float = 0.0  # THROTTLED (or a failed successor): next try
    stop_reason: str | None = None  # byte 22 received, not acted on yet
    failures: int = 0  # consecutive deaths without being loyal/stable
    quick_replacements: int = 0  # `master = false`: byte 22 from young processes in a row
    replace_at: float = 0.0  # the successor byte 22 asked for starts then, not before
    last_status: int | None = None
    processes_started: int = 0  # how many processes this vassal has had (status: "generation")
    restarts: int = 0  # processes started again after an unexpected death or a kill
    operator_reloads: int = 0  # `emperor reload NAME` carried out (a new process started)
    want_base_generation: int = 1  # base: the generation that should run
    woken: bool = False  # on-demand: a connection is waiting
    last_kind: Kind | None = None
    last_error: str | None = None  # the last failure the Emperor logged (status shows it)
    error_seq: int | None = None  # the process last_error is about (its last lines tell why)
    held: bool = False  # stopped by the operator (`emperor stop NAME`)
    reload_asked: bool = False  # `emperor reload NAME`, not acted on yet
    touched: bool = False  # its file was touched: reload, though the config is the same
    refused: str | None = None  # why the Emperor cannot take it on (no descriptors to spare)
    # where its facts are reported: the names of the vassals the plan must
    # step again (plan.Settled.dirty); set by the plan
    facts_to: set[str] | None = field(default=None, repr=False, compare=False)

    def report_facts_to(self, marks: set[str]) -> None:
        """From now on every fact recorded on it adds its name to `marks`."""
        self.facts_to = marks

    def _fact_recorded(self) -> None:
        """After each fact (facts.py): the plan steps it again."""
        if self.facts_to is not None:
            self.facts_to.add(self.name)

    # -- facts ---------------------------------------------------------------

    def _enter(self, phase: Phase, now: float) -> None:
        if phase != self.phase:
            self.phase = phase
            self.since = now

    def _sync(self, now: float) -> None:
        if self.current is not None:
            self._enter(Phase.RELOADING if self.successor else self.current.state.phase, now)

    @fact
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

    @fact
    def touch(self) -> None:
        """`touch` of the file: a reload as if its content had changed (a base:
        a new generation). A stopped vassal runs again, as for any change."""
        self.held = False
        if self.is_base and self.current is not None and self.current.kind == Kind.BASE:
            self.request_deploy()
        elif self.current is not None:
            self.touched = True

    @fact
    def request_deploy(self) -> None:
        """Base: a new generation after the one serving (changed base file, SIGUSR1)."""
        self.want_base_generation = max(self.want_base_generation, self.serving_generation + 1)
        self._deploy_asked()  # a new base loading since before is superseded

    @fact
    def hold(self) -> None:
        """`emperor stop NAME`: stop gracefully and stay stopped (STOPPED)
        until `release()` or the file changes."""
        self.held, self.reload_asked = True, False

    @fact
    def release(self) -> None:
        """`emperor start NAME`: run again now, without a crash-loop backoff."""
        self.held, self.failures, self.not_before = False, 0, 0.0

    @fact
    def request_reload(self) -> None:
        """`emperor reload NAME`: a new process now (gap-free where the
        Emperor owns the socket); one that waits for its backoff starts now.
        A base reloads through `request_deploy` (a code deploy) instead."""
        self.not_before = 0.0
        if self.current is not None:
            self.reload_asked = True

    @fact
    def on_connection(self, now: float) -> None:
        """On-demand: its socket is readable."""
        self.woken = True

    @fact
    def spawned(self, pid: int, now: float, seq: int | None = None) -> None:
        """fork+exec done (after a Spawn action), or the adoption's pid came."""
        p = self.proc(seq)
        assert p is not None and p.pid is None, (seq, p)
        p.started(pid, now)
        self.processes_started += 1
        self._sync(now)

    @fact
    def adopted(self, pid: int, now: float, seq: int | None = None) -> None:
        """The fork server replied with the pid (after an Adopt action)."""
        p = self.proc(seq)
        assert p is not None and p.state == ProcState.ADOPTING, p
        self.spawned(pid, now, p.seq)

    @fact
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

    @fact
    def mark_ready(self, now: float, seq: int | None = None) -> bool:
        """Start-up done (byte 1/5, or a base's fork server answers a probe)."""
        p = self.proc(seq)
        if p is not None and p.ready(now):
            self._sync(now)
            return True
        return False

    @fact
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
            if p.loyal(now):
                self._sync(now)
                return who + "loyal"
        elif byte == VassalByte.HEARTBEAT:
            p.beat(now)
        elif byte == VassalByte.DONE:
            # once a process (its app may repeat it); before it is loyal, its
            # app's as it loads: a restart loop that no back-off would slow
            if p.state != ProcState.LOYAL:
                return None
            if not self.on_demand and p.config.solo:  # `master = false`: a new process
                return who + self._replacement(p, now) if p.ask_replacement() else None
            if p is self.current and p.live and self.stop_reason is None:
                self.stop_reason = "idle" if self.on_demand else "asked to stop"
                return "idle" if self.on_demand else "asked to be stopped"
        return None

    @fact
    def exited(self, status: int, now: float, pid: int | None = None) -> Exit:
        """A process was reaped. Returns what it was to this vassal."""
        p = self.proc(pid=pid) if pid is not None else self.current
        self.last_status = status
        if p is None:
            return Exit.UNKNOWN
        p.reaped()
        if p in self.retiring:
            self.retiring.remove(p)
            self._sync(now)
            return Exit.RETIRED
        if p is self.successor:
            self.successor = None
            if not p.superseded:  # superseded: no failure, its replacement starts at once
                self._delay(now)
            self._sync(now)
            return Exit.STOPPED if p.superseded else Exit.SUCCESSOR_DIED
        assert p is self.current
        self.last_kind = p.kind
        self.current = None
        if p.state == ProcState.STOPPING:
            if p.killed and p.stop_reason and p.stop_reason.startswith("heartbeat"):
                self.restarts += 1
            if self.successor is not None:  # shutdown/removal stops both
                self.current, self.successor = self.successor, None
                self._sync(now)
            else:
                self._enter(Phase.NEW, now)
            return Exit.STOPPED
        if self.successor is not None:
            self.current, self.successor = self.successor, None
            self.restarts += 1
            self._sync(now)
            return Exit.TOOK_OVER
        lived = now - (p.started_at if p.started_at is not None else now)
        self.restarts += 1
        if lived >= self.policy.stable_after:
            self.failures = 0
            self.not_before = now
            self._enter(Phase.THROTTLED, now)
        else:
            self._throttle(now)
        return Exit.DIED

    # -- facts the Emperor learnt about its own resources -----------------------

    @fact
    def refuse(self, why: str) -> None:
        """No descriptors to spare for one more vassal: REFUSED until admitted."""
        self.refused = why

    @fact
    def admit(self) -> None:
        self.refused = None

    @fact
    def note_error(self, why: str, seq: int | None = None) -> None:
        """A failure the Emperor logged (status shows it while the vassal
        fails); `seq`: the process (its sequence number) that died of it."""
        self.last_error = why
        self.error_seq = seq

    @fact
    def cannot_bind(self, now: float, why: str) -> None:
        """Its on-demand socket could not be bound: throttled, like a failed start."""
        self.note_error(why)
        self.not_before = now
        self._throttle(now)

    @fact
    def resources_failed(self, now: float) -> None:
        """Handling it failed for lack of the Emperor's resources (EMFILE,
        ENOMEM): tried again after the backoff."""
        if self.current is None and self.phase != Phase.THROTTLED:
            self._throttle(now)

    @fact
    def config_failed(self, why: str) -> None:
        """Handling it failed for a reason its file would meet again:
        config-error until the file changes or is touched."""
        if self.config is not None:
            self.config = dataclasses.replace(self.config, error=why)

    @fact
    def config_failure_cleared(self, why: str) -> None:
        """Its file changed or was touched after `config_failed(why)`."""
        if self.config is not None and self.config.error == why:
            self.config = dataclasses.replace(self.config, error=None)

    @fact
    def fork_server_back(self, now: float) -> bool:
        """The fork server is ready again: a vassal waiting in a crash-loop
        backoff (it could not start without it) starts now. True if so."""
        if self.phase == Phase.THROTTLED and not self.has_process and self.not_before > now:
            self.failures = 0
            self.not_before = now
            return True
        return False

    def _replacement(self, p: Proc, now: float) -> str:
        """Byte 22 of a `master = false` process: when its successor may
        start (proc.replacement_wait), and what to say."""
        lived = now - (p.started_at if p.started_at is not None else now)
        self.quick_replacements, wait = replacement_wait(self.quick_replacements, lived, self.policy)
        self.replace_at = now + wait
        if wait <= 0:
            return "asked to be replaced"
        return (f"asked to be replaced {lived:.1f} s after its start ({self.quick_replacements} in a row "
                f"before {QUICK_REPLACEMENT:g} s): its successor starts in {wait:.1f} s "
                "(the crash-loop back-off)")

    # -- what its decisions (decisions.py) change, asked for by name ---------

    def _start(self, p: Proc) -> None:
        """No process: `p` is the current one now. It reads the file as it
        is, and answers a waiting connection and a byte 22 of the one before."""
        self.touched = self.woken = False
        self.stop_reason = None
        self.current = p

    def _start_successor(self, p: Proc) -> None:
        """A reload: `p` starts while the current one serves; it reads the
        file as it is and answers `emperor reload`."""
        self.operator_reloads += int(self.reload_asked)
        self.touched = self.reload_asked = False
        self.successor = p

    def _promote(self, now: float) -> Proc:
        """The successor serves; the old current process retires (returned)."""
        old, new = self.current, self.successor
        assert old is not None and new is not None
        self.current, self.successor = new, None
        self.retiring.append(old)
        self._sync(now)
        return old

    def _take_stop_request(self) -> str | None:
        """Byte 22's reason, once: the stop it asked for is being made."""
        reason, self.stop_reason = self.stop_reason, None
        return reason

    def _reload_by_restart(self) -> None:
        """A reload that stops the process (not seamless): what asked for
        it is answered by the start that follows."""
        self.operator_reloads += int(self.reload_asked)
        self.reload_asked = self.touched = False

    def _delay(self, now: float) -> float:
        """Crash loops: a process that dies within `stable_after` s of its start is one
        more failure; the restart waits `backoff_first * 2**(failures-1)` s, at most
        `backoff_max` (uWSGI: 1 s doubling to 3 min). Loyalty (byte 17) resets the count."""
        self.failures += 1
        delay = backoff_delay(self.failures, self.policy.backoff_first, self.policy.backoff_max)
        self.not_before = now + delay
        return delay

    def _throttle(self, now: float) -> None:
        self._delay(now)
        self._enter(Phase.THROTTLED, now)
