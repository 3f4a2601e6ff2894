"""The kernel's own timeline of a few processes: when each ran, waited for
a CPU, slept, was woken and by whom, and its system calls, from a tracefs
instance of its own (the machine's other tracing is left alone).

    with SchedTrace([pid, ...]) as tr:
        ...                       # the few milliseconds to look at
    events = tr.events()          # [Event], the clock is time.perf_counter()'s

The timestamps are CLOCK_MONOTONIC (`trace_clock mono`): the clock of
time.perf_counter(), so a client's marks line up with the kernel's. The
scheduler's switches are recorded for every process (to see who ran while
ours waited for a CPU); wake-ups and system calls only for the pids given
and their children (forks followed).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
UNISTD = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


def syscall_names() -> dict[int, str]:
    names = {}
    if UNISTD.exists():
        for m in re.finditer(r"#define __NR_(\w+) (\d+)", UNISTD.read_text()):
            names[int(m.group(2))] = m.group(1)
    return names


@dataclass
class Event:
    t: float          # seconds, CLOCK_MONOTONIC
    cpu: int
    pid: int          # the process the event is about (for a switch: the one switched in, or out)
    kind: str         # 'in', 'out', 'wakeup', 'enter', 'exit'
    what: str = ""    # out: the state left in ('R' preempted, 'S' asleep, ...); enter/exit: the call's name
    other: int = 0    # in: the pid switched out; out: the pid switched in; wakeup: the waker; exit: the return value
    comm: str = ""    # the other process's name (switches)
    arg0: int = 0     # enter: the call's first argument (a descriptor, mostly)


_LINE = re.compile(r"\s*(?P<comm>.{1,16}?)-(?P<pid>\d+)\s+\[(?P<cpu>\d+)\]\s+\S+\s+(?P<t>\d+\.\d+):\s+(?P<ev>\w+):\s+(?P<rest>.*)")
_SWITCH = re.compile(r"prev_comm=(?P<pc>.*?) prev_pid=(?P<pp>\d+) prev_prio=\d+ prev_state=(?P<ps>\S+) ==> "
                     r"next_comm=(?P<nc>.*?) next_pid=(?P<np>\d+)")
_WAKEUP = re.compile(r"comm=.*? pid=(?P<pid>\d+) prio")
_ENTER = re.compile(r"NR (?P<nr>\d+) \((?P<a0>[0-9a-f]+)")
_EXIT = re.compile(r"NR (?P<nr>-?\d+) = (?P<ret>-?\d+)")


class SchedTrace:
    """A tracefs instance recording the scheduler for `pids` (and the processes they fork)."""

    def __init__(self, pids: list[int], buffer_kb: int = 4096) -> None:
        self.pids, self.buffer_kb = pids, buffer_kb
        self.dir = TRACEFS / "instances" / f"psgi-fs-sched-{os.getpid()}"
        self.names = syscall_names()
        self._text = ""

    def _w(self, name: str, value: str) -> None:
        (self.dir / name).write_text(value)

    def __enter__(self) -> "SchedTrace":
        self.dir.mkdir()
        try:
            self._w("trace_clock", "mono")
            self._w("buffer_size_kb", str(self.buffer_kb))
            self._w("options/event-fork", "1")
            self._w("set_event_pid", " ".join(map(str, self.pids)))
            # the pid filter keeps a switch when either side is ours: also who took the CPU from us
            for ev in ("sched/sched_switch", "sched/sched_wakeup", "sched/sched_wakeup_new",
                       "raw_syscalls/sys_enter", "raw_syscalls/sys_exit"):
                self._w(f"events/{ev}/enable", "1")
            self._w("tracing_on", "1")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._w("tracing_on", "0")
            self._text = (self.dir / "trace").read_text()
        finally:
            self.close()

    def close(self) -> None:
        if not self.dir.exists():
            return
        for ev in ("sched/sched_switch", "sched/sched_wakeup", "sched/sched_wakeup_new",
                   "raw_syscalls/sys_enter", "raw_syscalls/sys_exit"):
            try:
                self._w(f"events/{ev}/enable", "0")
            except OSError:
                pass
        try:
            self._w("set_event_pid", "")
        except OSError:
            pass
        try:
            self.dir.rmdir()  # tracefs removes an instance with rmdir, its files with it
        except OSError:
            shutil.rmtree(self.dir, ignore_errors=True)

    def events(self) -> list[Event]:
        out: list[Event] = []
        for line in self._text.splitlines():
            if line.startswith("#"):
                continue
            m = _LINE.match(line)
            if not m:
                continue
            t, cpu, pid, ev, rest = float(m["t"]), int(m["cpu"]), int(m["pid"]), m["ev"], m["rest"]
            if ev == "sched_switch":
                s = _SWITCH.search(rest)
                if s:
                    pp, np_ = int(s["pp"]), int(s["np"])
                    out.append(Event(t, cpu, pp, "out", s["ps"], np_, s["nc"].strip()))
                    out.append(Event(t, cpu, np_, "in", "", pp, s["pc"].strip()))
            elif ev in ("sched_wakeup", "sched_wakeup_new"):
                s = _WAKEUP.search(rest)
                if s:
                    out.append(Event(t, cpu, int(s["pid"]), "wakeup", "", pid, m["comm"].strip()))
            elif ev == "sys_enter":
                s = _ENTER.search(rest)
                if s:
                    nr = int(s["nr"])
                    out.append(Event(t, cpu, pid, "enter", self.names.get(nr, str(nr)), arg0=int(s["a0"], 16)))
            elif ev == "sys_exit":
                s = _EXIT.search(rest)
                if s:
                    nr = int(s["nr"])
                    out.append(Event(t, cpu, pid, "exit", self.names.get(nr, str(nr)), int(s["ret"])))
        return out
