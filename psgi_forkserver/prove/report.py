"""prove's output: a line per test file, the summary report, and JUnit XML."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from xml.etree import ElementTree as ET

from tap.parser import Parser as TapParser

from .tap import Job


def balanced_range(numbers: list[int]) -> str:
    """`2-3, 5`: prove's list of test numbers."""
    out: list[str] = []
    nums = sorted(numbers)
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ", ".join(out)


def describe_wait(status: int) -> str:
    if status == 0:
        return "0"
    if status & 0x7F:
        return f"{status} (Signal: {signal.Signals(status & 0x7F).name.removeprefix('SIG')})"
    return f"{status} (exited {status >> 8})"


@dataclass
class Report:
    """Writes what prove writes, to `out`."""

    out: TextIO
    verbose: bool
    timeout: float | None

    def file(self, job: Job, files: list[str]) -> None:
        """The line of one finished test file."""
        longest = max(len(f) for f in files)
        lines = [f"{job.file} {'.' * (longest + 2 - len(job.file))} "]
        if self.verbose:
            lines[0] += "\n" + "".join(line + "\n" for line in job.tap_text)
        if job.error:
            lines.append(f"{job.error}\n")
        if job.timed_out:
            lines.append(f"timed out after {self.timeout:g} s\n")
        if job.ok():
            t = job.tap
            lines.append(f"skipped: {t.skip_all}".rstrip() + "\n" if t.skip_all is not None else "ok\n")
        else:
            lines.append("\n" if not self.verbose else "")
            lines += self._failure(job)
        self.out.write("".join(lines))
        self.out.flush()

    @staticmethod
    def _failure(job: Job) -> list[str]:
        t = job.tap
        lines = []
        if job.exit:
            lines.append(f"Dubious, test returned {job.exit} (wstat {job.status}, {job.status:#x})\n")
        total = t.planned if t.planned is not None else t.tests_run
        failed = len(t.failed) + total - t.tests_run
        if failed == 0:
            lines.append(f"All {total} subtests passed \n" if total else "No subtests run \n")
        else:
            lines.append(f"Failed {failed}/{total} subtests \n")
        return lines

    def summary(self, jobs: list[Job], files: list[str], t0: float, cpu0: os.times_result) -> bool:
        """The end of the run; whether it passed."""
        all_ok = bool(jobs) and all(j.ok() for j in jobs) and len(jobs) == len(files)
        if all_ok:
            self.out.write("All tests successful.\n")
        problems = [j for j in jobs if not j.ok() or j.tap.todo_passed]
        if problems:
            self.out.write("\nTest Summary Report\n-------------------\n")
            longest = max(len(f) for f in files)
            for j in problems:
                self.out.write("".join(self._problem(j, longest)))
        self.out.write(self._totals(jobs, t0, cpu0))
        self.out.write(f"Result: {'PASS' if all_ok else ('NOTESTS' if not jobs else 'FAIL')}\n")
        self.out.flush()
        return all_ok

    def _problem(self, j: Job, longest: int) -> list[str]:
        t = j.tap
        pad = " " * max(1, longest - len(j.file))
        lines = [f"{j.file}{pad}(Wstat: {describe_wait(j.status or 0)} "
                 f"Tests: {t.tests_run} Failed: {len(t.failed)})\n"]
        if t.failed:
            label = "Failed test:" if len(t.failed) == 1 else "Failed tests:"
            lines.append(f"  {label}  {balanced_range(t.failed)}\n")
        if t.todo_passed:
            lines.append(f"  TODO passed:   {balanced_range(t.todo_passed)}\n")
        if j.exit:
            lines.append(f"  Non-zero exit status: {j.exit}\n")
        elif j.status:
            lines.append(f"  Non-zero wait status: {j.status}\n")
        lines += [f"  Timed out after {self.timeout:g} s\n"] if j.timed_out else []
        lines += [f"  {j.error}\n"] if j.error else []
        if t.errors:
            lines.append(f"  Parse errors: {t.errors[0]}\n")
            lines += [f"{' ' * 16}{e}\n" for e in t.errors[1:]]
        return lines

    @staticmethod
    def _totals(jobs: list[Job], t0: float, cpu0: os.times_result) -> str:
        wall = time.monotonic() - t0
        cpu = os.times()
        tests = sum(j.tap.tests_run for j in jobs)
        cusr = sum(j.rusage[0] for j in jobs)
        csys = sum(j.rusage[1] for j in jobs)
        usr, sys_ = cpu.user - cpu0.user, cpu.system - cpu0.system
        return (f"Files={len(jobs)}, Tests={tests}, {int(wall):2d} wallclock secs "
                f"({usr:5.2f} usr {sys_:5.2f} sys + {cusr:5.2f} cusr {csys:5.2f} csys = "
                f"{usr + sys_ + cusr + csys:5.2f} CPU)\n")


def write_junit(path: Path, jobs: list[Job]) -> None:
    """One <testsuite> per file, one <testcase> per TAP test line."""
    root = ET.Element("testsuites")
    for j in jobs:
        t = j.tap
        suite = ET.SubElement(root, "testsuite", name=j.file, tests=str(t.tests_run),
                              failures=str(len(t.failed)), skipped=str(t.skipped),
                              errors="0" if j.ok() or t.failed else "1")
        _junit_cases(suite, j)
        ET.SubElement(suite, "system-out").text = "\n".join(j.tap_text)
        ET.SubElement(suite, "system-err").text = "".join(j.err_text)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def _junit_cases(suite: ET.Element, j: Job) -> None:
    t = j.tap
    parser = TapParser()
    for line in j.tap_text:
        r = parser.parse_line(line)
        if r.category != "test":
            continue
        case = ET.SubElement(suite, "testcase", classname=j.file,
                             name=f"{r.number} {r.description}".strip())
        if r.directive.skip:
            ET.SubElement(case, "skipped", message=r.directive.reason or "")
        elif not r.ok and not r.directive.todo:
            ET.SubElement(case, "failure", message=r.description or "not ok")
    if not j.ok() and not t.failed:
        why = "; ".join([*t.errors, *([f"exit status {j.exit}"] if j.exit else []),
                         *(["timed out"] if j.timed_out else []), *([j.error] if j.error else [])])
        ET.SubElement(ET.SubElement(suite, "testcase", classname=j.file, name="(file)"),
                      "error", message=why or "failed")
