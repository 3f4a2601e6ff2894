"""The harness: runs test files, forked from the base or cold, at most
`jobs` at a time, reads their output, reaps them and whatever they leave
behind (it is their subreaper), times them out."""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import adoption, launch, paths, protocol
from ..nonblocking import SignalWakeup, recv_ready
from .base import TestBase, start_with_streams
from .report import Report, write_junit
from .tap import Job
from ..spawn import spawn
from .testfiles import ProveOptions, build_spec, cold_reason, find_tests, taint_switches, test_env


def perl_facts(perl: str, env: dict[str, str]) -> tuple[list[str], str]:
    """The @INC `perl FILE` gets in the test environment, and prove's
    HARNESS_VERSION (TAP::Harness's version)."""
    out = subprocess.run(
        [perl, "-MTAP::Harness", "-e", 'print join "\\0", $TAP::Harness::VERSION, @INC'],
        env=env, capture_output=True, check=True).stdout.decode()
    version, *inc = out.split("\0")
    return inc, version


class Prove:
    def __init__(self, opts: ProveOptions, out=sys.stdout, err=sys.stderr, facts: bool = True) -> None:
        self.opts = opts
        self.out, self.errout = out, err
        self.report = Report(out, opts.verbose, opts.timeout)
        self.tmp = Path(tempfile.mkdtemp(prefix="emperor-prove-"))
        self.base = TestBase(opts, self.tmp)
        self.env = test_env(opts)
        # (prove itself sets them when it runs the show: hosting.py)
        self.inc, self.harness_version = perl_facts(opts.perl, self.env) if facts else ([], "")
        if facts:
            self.env["HARNESS_VERSION"] = self.harness_version
        self.jobs: dict[int, Job] = {}
        self.orphans_reaped = 0

    # -- starting a test ----------------------------------------------------------------

    def start(self, job: Job) -> None:
        def start(out_fd: int, err_fd: int) -> int:
            if job.cold is not None:
                return self.spawn_cold(job, out_fd, err_fd)
            return self.adopt(job.file, out_fd, err_fd)
        try:
            spec = None if job.cold is not None else build_spec(
                job.file, job.switches, os.getcwd(), self.env, self.inc, destruct=self.opts.destruct)
            job.running(*start_with_streams(start, spec))
        except (OSError, adoption.AdoptionError, protocol.ProtocolError) as e:
            job.could_not_start(str(e))
            return
        self.track(job)

    def adopt(self, file: str, out_fd: int, err_fd: int) -> int:
        """A forked test: its stdout on the Emperor pipe, its stderr on the
        config pipe (which already holds its spec)."""
        return adoption.adopt(self.base.sock, [str(paths.vassal_program()), "--test-file", file],
                              out_fd, config_fd=err_fd, timeout=60)

    def track(self, job: Job) -> None:
        job.tracked(time.monotonic())
        self.jobs[job.pid] = job

    def spawn_cold(self, job: Job, out_fd: int, err_fd: int) -> int:
        taint = taint_switches(job.switches)
        libs = [f"-I{d}" for d in self.opts.includes] if taint else []
        argv = [self.opts.perl, *taint, *libs, *(f"-M{m}" for m in self.opts.modules), job.file]
        return spawn(argv, self.env, stdin=None, stdout=out_fd, stderr=err_fd)

    # -- the process's set-up -----------------------------------------------------------

    def setup(self) -> None:
        launch.set_child_subreaper()
        self.wakeup = SignalWakeup()
        self.sel = self.wakeup.sel

    @staticmethod
    def stop_on_signals() -> None:
        """SIGTERM and SIGINT end a long-running mode (watch, serve) as
        KeyboardInterrupt, even when started with SIGINT ignored."""
        def stop(signum, frame):
            raise KeyboardInterrupt(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def teardown(self) -> None:
        for j in self.jobs.values():
            if j.status is None:
                self.kill(j)
        self.base.stop()
        self.reap_leftovers()
        self.wakeup.close()
        self.close_streams()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def close_streams(self) -> None:
        for j in self.jobs.values():
            j.close_streams()

    def drain_wake(self) -> None:
        self.wakeup.drain()

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        """One run of every test file: prove's output, prove's exit status."""
        self.setup()
        try:
            return self.run_batch(self.test_files())
        finally:
            self.teardown()

    def test_files(self) -> list[str]:
        return find_tests(self.opts.paths, self.opts.recurse)

    def run_batch(self, files: list[str]) -> int:
        """Run `files` (the base started if needed and not running), print
        prove's lines and summary; the exit status prove would have."""
        t0, cpu0 = time.monotonic(), os.times()
        queue = [Job(f, *cold_reason(f, self.base.preloaded())) for f in files]
        finished: list[Job] = []
        self.jobs = {}
        try:
            if self.base.pid is None and any(j.cold is None for j in queue):
                self.base.start(self.env)
                queue = [Job(f, *cold_reason(f, self.base.preloaded())) for f in files]
            bailed = self.schedule(queue, files, finished)
        finally:
            for j in self.jobs.values():
                if j.status is None:
                    self.kill(j)
            self.close_streams()
        ok = self.report.summary(finished, files, t0, cpu0)
        if self.opts.junit:
            write_junit(self.opts.junit, finished)
        if bailed is not None:
            self.errout.write(f"FAILED--Further testing stopped: {bailed}\n")  # prove dies with it
            self.errout.flush()
            return 255
        return 0 if ok else 1

    def schedule(self, pending: list[Job], files: list[str], finished: list[Job]) -> str | None:
        """Run the jobs, `jobs` at a time, until all have finished or one
        bails out; the bail-out reason."""
        running: list[Job] = []
        bailed: str | None = None
        while pending or running:
            while pending and len(running) < max(1, self.opts.jobs) and bailed is None:
                job = pending.pop(0)
                self.start(job)
                running.append(job)
                for s in (job.out, job.err):
                    if s is not None:
                        s.setblocking(False)
                        self.sel.register(s, selectors.EVENT_READ, job)
            if bailed is not None:
                pending.clear()
            self.wait_events(running)
            for j in [j for j in running if j.done]:
                running.remove(j)
                j.tap.finish()
                finished.append(j)
                self.report.file(j, files)
                if j.tap.bailed is not None and bailed is None:
                    bailed = j.tap.bailed
                    self.errout.flush()
                    self.out.write(f"Bailout called.  Further testing stopped:  {bailed}\n")
                    for other in running:
                        self.kill(other)
        return bailed

    def wait_events(self, running: list[Job], longest: float = 0.5) -> None:
        """Wait for output, a child's end or the next timeout; handle them."""
        wait = longest
        if self.opts.timeout:
            now = time.monotonic()
            for j in running:
                if j.status is None:
                    wait = max(0.0, min(wait, j.started + self.opts.timeout - now))
        for key, _ in self.sel.select(wait):
            if key.data is None:
                self.drain_wake()
            else:
                self.read(key.fileobj, key.data)
        self.reap()
        self.expire(running)

    def read(self, sock: socket.socket, job: Job) -> None:
        data = recv_ready(sock)
        if data is None:
            return
        if not data:
            self.sel.unregister(sock)
            job.stream_ended(sock is job.out)
            return
        if sock is job.err:
            text = data.decode("utf-8", "replace")
            job.stderr(text)
            self.errout.write(text)
            self.errout.flush()
            return
        job.stdout(data)

    # -- ends ---------------------------------------------------------------------------

    def forget(self, pid: int) -> None:
        """A job whose end was answered (`prove --serve`): no longer ours."""
        del self.jobs[pid]

    def reap(self) -> None:
        """Every child that ended: tests, and what tests left behind (we are
        their subreaper)."""
        while True:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job = self.jobs.get(pid)
            if job is not None:
                job.ended(status, (ru.ru_utime, ru.ru_stime))
            elif pid == self.base.pid:
                self.base.reaped(status)
            else:
                self.orphans_reaped += 1

    def expire(self, running: list[Job]) -> None:
        if not self.opts.timeout:
            return
        now = time.monotonic()
        for j in running:
            if not j.timed_out and now >= j.started + self.opts.timeout and not j.done:
                j.time_out()
                self.kill(j)

    def kill(self, job: Job) -> None:
        """The test and its process group (it leads its own session), and
        any descendant that left the group."""
        if not job.pid:
            return
        launch.kill_tree(job.pid)
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except OSError:
            pass

    def reap_leftovers(self) -> None:
        """What tests left running when the run ends (daemons, orphans that
        outlived their test) is killed and reaped: nothing outlives the run."""
        try:
            import psutil
            kids = psutil.Process(os.getpid()).children(recursive=True)
        except Exception:  # noqa: BLE001
            kids = []
        for k in kids:
            try:
                k.kill()
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                time.sleep(0.01)
