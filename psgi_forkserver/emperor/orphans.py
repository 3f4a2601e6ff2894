"""Which of the Emperor's children are orphans, told by session id.

The Emperor is a child subreaper: besides the vassal processes it started,
it inherits whatever their processes leave behind (the workers of a vassal
killed with SIGKILL, a helper an app double-forked). Every vassal our Perl
side starts calls setsid() first (and the Emperor starts plain vassals with
setsid), so its session id is its pid, and its workers and helpers carry
that session id unless they call setsid() themselves. So a child of the
Emperor that is not a vassal process is:

- in the session of a running vassal process: that vassal's; left alone;
- in the session of a vassal process that has ended: an orphan of it; the
  Emperor asks it to go (SIGTERM, then SIGKILL after the mercy timeout);
- a base's warm spare, not adopted yet (`spare_of`): the base's; left
  alone (it ends by itself when its base does);
- anything else (a daemon that called setsid() itself, a process of a
  uWSGI vassal, which does not setsid): not attributable; left alone while
  the Emperor runs, stopped with everything else at shutdown.

`classify_orphans` is that decision, without processes; `procfs.scan_proc` is
the one pass over /proc that feeds it; `EndedSessions` remembers which ended
vassal process each session belonged to, for as long as the session has
members; `Sweeper` is the Emperor's side: it sends the signals.
"""

from __future__ import annotations

import math
import os
import signal
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import psutil

from ..procfs import comm, scan_proc, spare_of

# A bound on the record of ended sessions, in case /proc cannot tell us that
# one is empty; far more than the sessions that can have members at once.
MAX_ENDED = 4096


@dataclass
class Classification:
    orphans: dict[int, str] = field(default_factory=dict)  # pid -> name of the vassal that left it
    unknown: set[int] = field(default_factory=set)  # not attributable: left until shutdown


def classify_orphans(
    children: Mapping[int, int], live: Collection[int], ended: Mapping[int, str]
) -> Classification:
    """Sort the Emperor's children (pid -> session id) into orphans and
    unattributable ones; vassal processes and their own are left out.

    `live`: pids of the vassal processes that run now. `ended`: session id
    (the pid of a vassal process that ended) -> vassal name.

    A session leader (sid == pid) is never an orphan: it is a vassal, or a
    process that called setsid() itself; a session id equal to its own pid
    cannot be an ended vassal's session, only a reuse of that pid number.
    """
    out = Classification()
    for pid, sid in children.items():
        if pid in live or sid in live:
            continue
        if sid != pid and sid in ended:
            out.orphans[pid] = ended[sid]
        else:
            out.unknown.add(pid)
    return out


@dataclass
class EndedSessions:
    """Session id of an ended vassal process -> the vassal's name.

    An entry is kept while its session has members (`prune` drops the rest):
    once a session is empty its number may be a new process's pid, and a
    new session's, that are not the vassal's.
    """

    limit: int = MAX_ENDED
    by_sid: OrderedDict[int, str] = field(default_factory=OrderedDict)

    def add(self, pid: int, name: str) -> None:
        self.by_sid[pid] = name
        self.by_sid.move_to_end(pid)
        while len(self.by_sid) > self.limit:
            self.by_sid.popitem(last=False)

    def prune(self, sessions: Collection[int]) -> None:
        for sid in [s for s in self.by_sid if s not in sessions]:
            del self.by_sid[sid]

    def __contains__(self, sid: object) -> bool:
        return sid in self.by_sid

    def __len__(self) -> int:
        return len(self.by_sid)


@dataclass
class Sweeper:
    """The orphans of one Emperor: found after a vassal process ended,
    asked to go (SIGTERM), killed after the mercy timeout (SIGKILL)."""

    log: Callable[[str], None]
    mercy: float
    # orphans we asked to go: pid -> when SIGKILL follows (inf: sent, not reaped)
    orphans: dict[int, float] = field(default_factory=dict)
    ended: EndedSessions = field(default_factory=EndedSessions)
    unattributed: set[int] = field(default_factory=set)  # logged once each
    # a vassal process (or an orphan we stopped) ended since the last sweep:
    # what it left behind may be ours now
    due: bool = False
    swept_at_shutdown: bool = False

    def vassal_ended(self, pid: int, name: str) -> None:
        """What it forked and left behind is ours now: swept once this turn."""
        self.ended.add(pid, name)
        self.due = True

    def shutdown_sweep_due(self) -> bool:
        """Every vassal is gone: sweep everything once, then again after
        each orphan that ends (its own children come to us)."""
        due = self.due or not self.swept_at_shutdown
        self.swept_at_shutdown = True
        return due

    def reaped(self, pid: int) -> None:
        """A child that was no vassal process was reaped."""
        if self.orphans.pop(pid, None) is not None:
            self.due = True  # its own children came to us
        self.unattributed.discard(pid)

    def sweep(self, now: float, live: Collection[int], adopting: bool,
              everything: bool = False) -> None:
        """Children in the session of a vassal process that ended get
        SIGTERM, then SIGKILL after the mercy timeout; children of running
        vassals (`live`: their pids) are left alone, and so (until shutdown)
        are children in no vassal's session. With `everything` (shutdown,
        no vassal left), every child we did not start is stopped.

        One pass over /proc, called at most once per loop turn, and only
        after a vassal process ended (or an orphan, whose own children come
        to us then), never once per exit. `adopting`: an adoption is in
        flight (its vassal leads its session before its pid reply is read)."""
        self.due = False
        try:
            scan = scan_proc(os.getpid())
        except OSError as e:  # out of descriptors: try again next turn
            self.due = True
            self.log(f"cannot look for orphans: {e.strerror or e}")
            return
        self.ended.prune(scan.sessions)
        found = classify_orphans(scan.children, live, self.ended.by_sid)
        victims = dict(found.orphans)
        if everything:
            victims.update((pid, "") for pid in found.unknown)
        else:
            for pid in found.unknown - self.unattributed:
                if spare_of(pid) is not None:
                    continue  # a base's warm spare: the base's
                if adopting and scan.children.get(pid) == pid:
                    continue  # not worth a line while an adoption is in flight
                self.unattributed.add(pid)
                self.log(f"pid {pid} ({comm(pid)}) is in no vassal's session "
                         f"(session {scan.children.get(pid)}): left alone until shutdown")
        for pid, name in victims.items():
            if pid in self.orphans:
                continue
            what = comm(pid)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:  # a zombie is still there: only exited ones go
                continue
            self.orphans[pid] = now + self.mercy
            left_by = f", left by a process of {name}" if name else ""
            self.log(f"orphan pid {pid} ({what}{left_by}) sent SIGTERM")

    def kill_due(self, now: float) -> None:
        for pid, deadline in list(self.orphans.items()):
            if now >= deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    del self.orphans[pid]
                    continue
                # kept until reaped, which then sweeps for its own children
                self.orphans[pid] = math.inf

    def kill_stragglers(self) -> None:
        """Shutdown took longer than the mercy timeout: SIGKILL every descendant."""
        try:
            victims = psutil.Process().children(recursive=True)
        except (psutil.Error, OSError):
            victims = []
        for p in victims:
            try:
                p.send_signal(signal.SIGKILL)
                self.log(f"SIGKILL straggler pid {p.pid}")
            except psutil.Error:
                pass

    def next_wakeup(self) -> list[float]:
        return list(self.orphans.values())
