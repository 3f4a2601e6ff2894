"""systemd's notify protocol (`Type=notify`), from the Emperor's loop.

With `NOTIFY_SOCKET` set (a path, or `@name` for the abstract namespace),
the Emperor sends datagrams of `KEY=VALUE` lines:

- `READY=1` once every vassal present at start is serving (loyal; running
  for a base; on-demand waiting for its first connection) or has failed
  for good for now (config-error, throttled after a failed start, stopped):
  a unit does not hang in "activating" because one app is broken;
- `STATUS=` with the counts per state, whenever they change;
- `RELOADING=1` when a code deploy starts and `READY=1` when it ends (with
  `MONOTONIC_USEC`, which systemd wants with RELOADING since v253);
- `STOPPING=1` when the shutdown starts;
- `WATCHDOG=1` every half `WATCHDOG_USEC` while the loop turns (when
  `WATCHDOG_PID` is set, only in that process).

Without `NOTIFY_SOCKET` every method returns at once. The socket is never
waited on: the fleet must not depend on its supervisor. A state message
(READY, RELOADING, STATUS, STOPPING) that finds the socket full waits, in
order, for the next turn (a supervisor that reads late still sees a deploy
begin and end); a watchdog ping is only sent when nothing waits, and never
queued. A send that fails otherwise (systemd gone) is logged once and the
waiting messages are dropped.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..snapshot import EmperorSnapshot, VassalSnapshot

#: state messages waiting for room in the socket, at most (the oldest go first)
MAX_PENDING = 64

#: how soon a turn retries waiting messages, in seconds
RETRY_S = 0.05

#: states in which a vassal present at start no longer holds READY=1 back
SETTLED = frozenset({"loyal", "on-demand", "config-error", "stopped", "throttled", "refused"})


def _address(raw: str) -> str | bytes:
    if raw.startswith("@"):
        return "\0" + raw[1:]  # abstract namespace
    return raw


def settled(v: VassalSnapshot) -> bool:
    """The vassal no longer holds READY=1 (or /readyz) back: it serves, or
    it has failed for good for now."""
    if v.failures > 0:
        # failed, waits for its backoff or tries again: a crash loop's
        # attempts must not make the whole host unready at each try
        return True
    phase = v.phase.value
    if phase == "throttled":
        return False  # held back before it ever failed
    if phase == "running" and v.is_base:
        return True  # a base's fork server answers: it never sends byte 17
    return phase in SETTLED


@dataclass
class Notifier:
    address: str | bytes | None
    log: Callable[[str], None]
    watchdog_s: float | None = None
    sock: socket.socket | None = None
    ready_sent: bool = False
    waiting_for: set[str] | None = None  # names present at start, not settled yet
    status_sent: str = ""
    reloading: bool = False
    stopping_sent: bool = False
    next_watchdog: float = 0.0
    failed: bool = False
    sent: list[str] = field(default_factory=list)  # the last messages (tests, debugging)
    pending: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_PENDING))

    @classmethod
    def from_env(cls, log: Callable[[str], None], environ: dict[str, str] | None = None) -> "Notifier":
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET") or None
        watchdog = None
        usec = env.get("WATCHDOG_USEC")
        wpid = env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not wpid or wpid == str(os.getpid())):
            watchdog = int(usec) / 1e6
        n = cls(_address(raw) if raw else None, log, watchdog)
        if n.address is not None:
            n.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            n.sock.setblocking(False)
        return n

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, *lines: str) -> None:
        """Queue a state message behind any still waiting, and send what fits."""
        if self.sock is None:
            return
        self.pending.append("\n".join(lines))
        self._flush()

    def _ping(self) -> None:
        if not self.pending:  # a ping never overtakes a waiting state message
            self._sendto("WATCHDOG=1")

    def _flush(self) -> None:
        while self.pending and self._sendto(self.pending[0]):
            self.pending.popleft()

    def _sendto(self, msg: str) -> bool:
        assert self.sock is not None
        try:
            self.sock.sendto(msg.encode(), self.address)
        except OSError as e:
            if not self.failed:
                self.failed = True
                self.log(f"notify: cannot send to NOTIFY_SOCKET: {e.strerror or e}")
            if e.errno not in (errno.EAGAIN, errno.ENOBUFS):
                self.pending.clear()  # nobody listens: nothing to keep for later
            return False
        self.failed = False
        self.sent = (self.sent + [msg])[-20:]
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def next_wakeup(self) -> float | None:
        if self.sock is None:
            return None
        retry = time.monotonic() + RETRY_S if self.pending else None
        watchdog = self.next_watchdog if self.watchdog_s else None
        return min((t for t in (retry, watchdog) if t is not None), default=None)

    def poll(self, snapshot: Callable[[], EmperorSnapshot], now: float) -> None:
        """Once per turn of the Emperor's loop, after the vassals stepped
        (the snapshot is taken only when systemd listens)."""
        if self.sock is None:
            return
        self._flush()
        if self.watchdog_s and now >= self.next_watchdog:
            self._ping()
            self.next_watchdog = now + self.watchdog_s / 2
        snap = snapshot()
        vassals = snap.vassals
        if snap.shutting_down:
            if not self.stopping_sent:
                self.stopping_sent = True
                self.send("STOPPING=1", f"STATUS=stopping {len(vassals)} vassals")
            return
        counts = Counter(v.phase.value for v in vassals.values())
        status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no vassals"
        status = f"{len(vassals)} vassals: {status}"
        if not self.ready_sent:
            if self.waiting_for is None:  # the first turn: the vassals present at start
                self.waiting_for = set(vassals)
            self.waiting_for = {n for n in self.waiting_for
                                if n in vassals and not settled(vassals[n])}
            if not self.waiting_for:
                self.ready_sent = True
                self.status_sent = status
                self.send("READY=1", f"STATUS={status}")
                return
        last = (snap.deploy or {}).get("last")
        deploy = last if last is not None and not last["finished"] else None
        if self.ready_sent and (deploy is not None) != self.reloading:
            self.reloading = deploy is not None
            if self.reloading:
                usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
                self.send("RELOADING=1", f"MONOTONIC_USEC={usec}",
                          f"STATUS=code deploy to base generation {deploy['generation']}")
            else:
                self.status_sent = status
                self.send("READY=1", f"STATUS={status}")
            return
        if status != self.status_sent:
            self.status_sent = status
            self.send(f"STATUS={status}")
