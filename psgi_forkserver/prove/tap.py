"""One test file's run and its TAP, read line by line into prove's verdict
(tap.py parses each line)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from tap.parser import Parser as TapParser


@dataclass
class TapState:
    parser: TapParser = field(default_factory=TapParser)
    tests_run: int = 0
    planned: int | None = None
    plans: int = 0
    plan_at_line: int = 0
    lines_seen: int = 0
    skip_all: str | None = None
    failed: list[int] = field(default_factory=list)
    todo_passed: list[int] = field(default_factory=list)
    skipped: int = 0
    bailed: str | None = None
    errors: list[str] = field(default_factory=list)
    tests_after_plan: bool = False

    def feed(self, line: str) -> None:
        if not line.strip():
            return
        r = self.parser.parse_line(line)
        if r.category == "test":
            self._test(r)
        elif r.category == "plan":
            self._plan(r)
        elif r.category == "bail":
            self.bailed = r.reason

    def _test(self, r) -> None:
        self.tests_run += 1
        self.lines_seen += 1
        number = r.number or self.tests_run
        if r.number is not None and r.number != self.tests_run:
            self.errors.append(
                f"Tests out of sequence.  Found ({r.number}) but expected ({self.tests_run})")
        if self.plans and self.planned is not None:
            self.tests_after_plan = True
        todo = r.directive.todo
        if r.directive.skip:
            self.skipped += 1
        if not r.ok and not todo:
            self.failed.append(number)
        if r.ok and todo:
            self.todo_passed.append(number)

    def _plan(self, r) -> None:
        self.plans += 1
        if self.plans > 1:
            self.errors.append("More than one plan found in TAP output")
            return
        self.planned = r.expected_tests
        self.plan_at_line = self.lines_seen
        if r.expected_tests == 0 and r.directive.skip:
            self.skip_all = r.directive.reason or ""

    def finish(self) -> None:
        if self.plans == 0:
            self.errors.append("No plan found in TAP output")
        elif self.planned is not None and self.planned != self.tests_run and self.skip_all is None:
            self.errors.append(
                f"Bad plan.  You planned {self.planned} tests but ran {self.tests_run}.")
        if self.tests_after_plan and self.plan_at_line not in (0, self.lines_seen):
            self.errors.append(
                f"Plan (1..{self.planned}) must be at the beginning or end of the TAP output")


@dataclass
class Job:
    """One test file's run: its process, its two streams, its verdict."""

    file: str
    cold: str | None
    switches: list[str]
    pid: int = 0
    out: socket.socket | None = None
    err: socket.socket | None = None
    started: float = 0.0
    status: int | None = None
    rusage: tuple[float, float] = (0.0, 0.0)
    timed_out: bool = False
    tap: TapState = field(default_factory=TapState)
    out_buf: bytes = b""
    tap_text: list[str] = field(default_factory=list)
    err_text: list[str] = field(default_factory=list)
    open_streams: int = 2
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.status is not None and self.open_streams == 0

    @property
    def exit(self) -> int:
        return (self.status or 0) >> 8

    def ok(self) -> bool:
        t = self.tap
        return (self.error is None and not t.failed and not t.errors and not self.status
                and t.bailed is None)

    def tap_line(self, line: str) -> None:
        self.tap_text.append(line)
        self.tap.feed(line)

    # -- its life, as the scheduler sees it ---------------------------------

    def running(self, pid: int, out: socket.socket | None, err: socket.socket | None) -> None:
        """Started: its pid and our ends of its stdout and stderr."""
        self.pid, self.out, self.err = pid, out, err

    def could_not_start(self, why: str) -> None:
        self.error = f"could not start: {why}"
        self.status = 255 << 8
        self.open_streams = 0

    def tracked(self, now: float) -> None:
        """Its clock starts (its timeout counts from now)."""
        self.started = now

    def stdout(self, data: bytes) -> None:
        """Bytes of its stdout: each whole line is a TAP line."""
        self.out_buf += data
        *lines, self.out_buf = self.out_buf.split(b"\n")
        for line in lines:
            self.tap_line(line.decode("utf-8", "replace"))

    def stderr(self, text: str) -> None:
        """Text of its stderr, kept for the JUnit report."""
        self.err_text.append(text)

    def stream_ended(self, stdout: bool) -> None:
        """End of file on one of its streams; stdout's last line may lack its newline."""
        self.open_streams -= 1
        if stdout and self.out_buf:
            self.tap_line(self.out_buf.decode("utf-8", "replace"))
            self.out_buf = b""

    def streams_elsewhere(self) -> None:
        """Its streams go to someone else (a client of `prove --serve`)."""
        self.open_streams = 0

    def ended(self, status: int, rusage: tuple[float, float]) -> None:
        self.status = status
        self.rusage = rusage

    def time_out(self) -> None:
        self.timed_out = True

    def close_streams(self) -> None:
        for s in (self.out, self.err):
            if s is not None:
                s.close()
        self.out = self.err = None
