"""`emperor prove`: a Perl test harness whose test processes are forked from a
preloaded base (ForkServer::TestFile), with prove's options, output and exit
status.

The base is an ordinary base vassal with a fork server, started with the
user's preloads; every test file is an adoption request whose argv starts
with `--test-file`, whose Emperor pipe is the test's stdout and whose config
pipe first carries the test's spec (file, cwd, argv, %ENV, @INC) and then is
its stderr. This process owns what the Emperor owns for vassals: the fork
requests, the subreaping (tests and whatever they leave behind are its
children), each test's wait status and its timeout. TAP is parsed by tap.py.
A file that cannot run forked (a `# emperor-prove: no-preload` line, a
shebang with switches other than -w, such as -T) runs cold: `perl FILE`.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree as ET

from tap.parser import Parser as TapParser

from . import forkserver, launch, paths, protocol

NO_PRELOAD_MARK = "# emperor-prove: no-preload"
BASE_MAIN = "BEGIN { ForkServer::TestFile::serve(@ARGV) }\n"


@dataclass
class ProveOptions:
    paths: list[str]
    jobs: int = 1
    includes: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    preloads: list[str] = field(default_factory=list)
    recurse: bool = False
    verbose: bool = False
    timeout: float | None = None
    junit: Path | None = None
    perl: str = "perl"
    destruct: bool = False


# -- the files --------------------------------------------------------------------------


def find_tests(args: list[str], recurse: bool) -> list[str]:
    """prove's choice: the files named, and the *.t files of the directories
    named (with -r, of their subdirectories too); `t` when nothing is named."""
    found: list[str] = []
    for arg in args or ["t"]:
        p = Path(arg)
        if p.is_dir():
            pattern = "**/*.t" if recurse else "*.t"
            found += sorted(str(f) for f in p.glob(pattern) if f.is_file())
        else:
            found.append(arg)
    return found


def cold_reason(file: str) -> tuple[str | None, list[str]]:
    """(why this file must run in a fresh perl, or None; its shebang switches)."""
    try:
        with open(file, "rb") as fh:
            head = fh.read(65536).decode("utf-8", "replace")
    except OSError as e:
        return f"cannot read: {e.strerror}", []
    lines = head.splitlines()
    switches: list[str] = []
    if lines and lines[0].startswith("#!") and "perl" in lines[0]:
        switches = [w for w in lines[0].split()[1:] if w.startswith("-")]
    if any(line.strip() == NO_PRELOAD_MARK for line in lines):
        return "no-preload", switches
    others = [s for s in switches if s != "-w"]
    if others:
        return f"shebang switches {' '.join(others)}", switches
    return None, switches


# -- TAP and verdicts -------------------------------------------------------------------


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
        kind = r.category
        if kind == "test":
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
        elif kind == "plan":
            self.plans += 1
            if self.plans > 1:
                self.errors.append("More than one plan found in TAP output")
                return
            self.planned = r.expected_tests
            self.plan_at_line = self.lines_seen
            if r.expected_tests == 0 and r.directive.skip:
                self.skip_all = r.directive.reason or ""
        elif kind == "bail":
            self.bailed = r.reason

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


def build_spec(file: str, switches: list[str], cwd: str, env: dict[str, str], inc: list[str],
               args: list[str] = (), destruct: bool = False) -> bytes:
    """The config-pipe packet ForkServer::TestFile reads: what `perl FILE`
    would have."""
    items = [f"file={file}", f"cwd={cwd}", *(f"arg={a}" for a in args),
             *(f"inc={d}" for d in inc), *(f"env={k}={v}" for k, v in env.items())]
    if "-w" in switches:
        items.append("warnings=1")
    if destruct:
        items.append("destruct=1")
    return protocol.encode_packet(protocol.MODIFIER1_CONFIG, protocol.encode_array(items))


# -- the harness ------------------------------------------------------------------------


class BaseError(Exception):
    """The base could not be started."""


class Prove:
    def __init__(self, opts: ProveOptions, out=sys.stdout, err=sys.stderr) -> None:
        self.opts = opts
        self.out, self.errout = out, err
        self.tmp = Path(tempfile.mkdtemp(prefix="emperor-prove-"))
        self.sock = self.tmp / "fork.sock"
        self.base_pid: int | None = None
        self.base_pipe: socket.socket | None = None
        self.base_log = self.tmp / "base.log"
        self.inc_report = self.tmp / "inc"
        self.env = self.test_env()
        self.inc, self.harness_version = self.perl_facts()
        self.env["HARNESS_VERSION"] = self.harness_version
        self.jobs: dict[int, Job] = {}
        self.orphans_reaped = 0

    # prove's environment for a test: HARNESS_ACTIVE, HARNESS_VERSION, and
    # its -I directories in PERL5LIB (TAP::Parser::SourceHandler::Perl)
    def test_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("UWSGI_EMPEROR_")}
        env["HARNESS_ACTIVE"] = "1"
        if self.opts.verbose:
            env["HARNESS_IS_VERBOSE"] = "1"
        else:
            env.pop("HARNESS_IS_VERBOSE", None)
        if self.opts.includes:
            env["PERL5LIB"] = os.pathsep.join(
                [*self.opts.includes, *([env["PERL5LIB"]] if env.get("PERL5LIB") else [])])
        return env

    def perl_facts(self) -> tuple[list[str], str]:
        """The @INC `perl FILE` gets in the test environment, and prove's
        HARNESS_VERSION (TAP::Harness's version)."""
        out = subprocess.run(
            [self.opts.perl, "-MTAP::Harness", "-e",
             'print join "\\0", $TAP::Harness::VERSION, @INC'],
            env=self.env, capture_output=True, check=True).stdout.decode()
        version, *inc = out.split("\0")
        return inc, version

    # -- the base -----------------------------------------------------------------------

    def start_base(self) -> None:
        ours, theirs = socket.socketpair()
        argv = [self.opts.perl, f"-I{paths.perl_dir()}", "-MForkServer::TestFile",
                *(f"-M{m}" for m in self.opts.modules), "-e", BASE_MAIN, "--",
                "--inc-report", str(self.inc_report),
                "--fork-server", str(self.sock), "--name", "emperor-prove",
                # 4 KB pages: a test writes to much of what it inherits
                # (compiling, loading), and each first write to a 2 MB page
                # copies all of it; measured faster for tests (bench: prove)
                "--fork-server-hugepages", "false"]
        for f in self.opts.preloads:
            argv += ["--preload", os.path.abspath(f)]
        log = os.open(self.base_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        env = {**self.env, "UWSGI_EMPEROR_FD": str(theirs.fileno())}
        os.set_inheritable(theirs.fileno(), True)
        try:
            self.base_pid = os.posix_spawn(
                argv[0] if os.sep in argv[0] else _which(argv[0]), argv, env,
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                              (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                              (os.POSIX_SPAWN_DUP2, log, 2)],
                setsigdef=(signal.SIGPIPE,), setsid=True)
        finally:
            os.close(log)
            theirs.close()
        self.base_pipe = ours
        ours.settimeout(300)
        try:
            byte = ours.recv(1)
        except OSError:
            byte = b""
        if byte != b"\x01":
            pid, status = os.waitpid(self.base_pid, 0)
            self.base_pid = None
            text = " | ".join(self.base_log.read_text(errors="replace").split("\n")).strip(" |")
            raise BaseError(f"the base did not start ({launch.describe_status(status)}): {text}")

    def stop_base(self) -> None:
        if self.base_pipe is not None:
            self.base_pipe.close()  # end of file: the base stops
            self.base_pipe = None
        if self.base_pid is not None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                pid, _ = os.waitpid(self.base_pid, os.WNOHANG)
                if pid:
                    break
                time.sleep(0.01)
            else:
                launch.kill_tree(self.base_pid)
                os.waitpid(self.base_pid, 0)
            self.base_pid = None

    # -- starting a test ----------------------------------------------------------------

    def spec(self, file: str, switches: list[str]) -> bytes:
        return build_spec(file, switches, os.getcwd(), self.env, self.inc, destruct=self.opts.destruct)

    def start(self, job: Job) -> None:
        out_ours, out_theirs = socket.socketpair()
        err_ours, err_theirs = socket.socketpair()
        try:
            if job.cold is None:
                err_ours.sendall(self.spec(job.file, job.switches))
                job.pid = forkserver.adopt(
                    self.sock, [str(paths.vassal_program()), "--test-file", job.file],
                    out_theirs.fileno(), config_fd=err_theirs.fileno(), timeout=60)
            else:
                job.pid = self.spawn_cold(job, out_theirs.fileno(), err_theirs.fileno())
        except (OSError, forkserver.AdoptionError, protocol.ProtocolError) as e:
            job.error = f"could not start: {e}"
            job.status = 255 << 8
            job.open_streams = 0
            out_ours.close()
            err_ours.close()
            return
        finally:
            out_theirs.close()
            err_theirs.close()
        out_ours.shutdown(socket.SHUT_WR)
        err_ours.shutdown(socket.SHUT_WR)
        job.out, job.err = out_ours, err_ours
        job.started = time.monotonic()
        self.jobs[job.pid] = job

    def spawn_cold(self, job: Job, out_fd: int, err_fd: int) -> int:
        taint = [s for s in job.switches if s.lstrip("-")[:1] in ("T", "t")]
        libs = [f"-I{d}" for d in self.opts.includes] if taint else []
        argv = [self.opts.perl, *taint, *libs, *(f"-M{m}" for m in self.opts.modules), job.file]
        return os.posix_spawn(
            argv[0] if os.sep in argv[0] else _which(argv[0]), argv, self.env,
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                          (os.POSIX_SPAWN_DUP2, out_fd, 1), (os.POSIX_SPAWN_DUP2, err_fd, 2)],
            setsigdef=(signal.SIGPIPE,), setsid=True)

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        """One run of every test file: prove's output, prove's exit status."""
        self.setup()
        try:
            return self.run_batch(find_tests(self.opts.paths, self.opts.recurse))
        finally:
            self.teardown()

    def setup(self) -> None:
        launch.set_child_subreaper()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.old_wakeup = signal.set_wakeup_fd(self.wake_w.fileno())
        self.old_chld = signal.signal(signal.SIGCHLD, lambda *_: None)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)

    def teardown(self) -> None:
        for j in self.jobs.values():
            if j.status is None:
                self.kill(j)
        self.stop_base()
        self.reap_leftovers()
        self.sel.close()
        signal.signal(signal.SIGCHLD, self.old_chld)
        signal.set_wakeup_fd(self.old_wakeup)
        self.wake_r.close()
        self.wake_w.close()
        self.close_streams()
        _rmtree(self.tmp)

    def close_streams(self) -> None:
        for j in self.jobs.values():
            for s in (j.out, j.err):
                if s is not None:
                    s.close()
            j.out = j.err = None

    def run_batch(self, files: list[str]) -> int:
        """Run `files` (the base started if needed and not running), print
        prove's lines and summary; the exit status prove would have."""
        t0, cpu0 = time.monotonic(), os.times()
        queue = [Job(f, *cold_reason(f)) for f in files]
        finished: list[Job] = []
        bailed: str | None = None
        self.jobs = {}
        try:
            if self.base_pid is None and any(j.cold is None for j in queue):
                self.start_base()
            pending = list(queue)
            running: list[Job] = []
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
                    self.report_file(j, files)
                    if j.tap.bailed is not None and bailed is None:
                        bailed = j.tap.bailed
                        self.errout.flush()
                        self.out.write(f"Bailout called.  Further testing stopped:  {bailed}\n")
                        for other in running:
                            self.kill(other)
        finally:
            for j in self.jobs.values():
                if j.status is None:
                    self.kill(j)
            self.close_streams()
        ok = self.summary(finished, files, t0, cpu0)
        if self.opts.junit:
            write_junit(self.opts.junit, finished)
        if bailed is not None:
            self.errout.write(f"FAILED--Further testing stopped: {bailed}\n")  # prove dies with it
            self.errout.flush()
            return 255
        return 0 if ok else 1

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
                try:
                    while self.wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
            else:
                self.read(key.fileobj, key.data, self.sel)
        self.reap()
        self.expire(running)

    # -- serve mode (for `prove --exec`) ------------------------------------------------

    def serve(self, control: Path) -> int:
        """Keep a base and run the test files that `emperor prove --connect`
        clients hand over on the UNIX socket `control` (mode 0600): each
        client sends its file name with its stdout/stderr sockets, whose
        stderr already holds the spec; the reply is the test's wait status."""
        def stop(signum, frame):
            raise KeyboardInterrupt(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
        self.setup()
        umask = os.umask(0o177)
        try:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(control))
        finally:
            os.umask(umask)
        listener.listen(64)
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ, "listen")
        waiting: dict[int, socket.socket] = {}  # test pid -> its client's connection
        try:
            self.start_base()
            self.errout.write(f"emperor prove: serving on {control} (Ctrl-C to stop)\n")
            self.errout.flush()
            while True:
                for key, _ in self.sel.select(1.0):
                    if key.data is None:
                        try:
                            while self.wake_r.recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                    elif key.data == "listen":
                        self.serve_client(listener, waiting)
                self.reap()
                for pid, job in list(self.jobs.items()):
                    if job.status is not None:
                        conn = waiting.pop(pid, None)
                        del self.jobs[pid]
                        if conn is not None:
                            try:
                                conn.sendall(f"{job.status}\n".encode())
                            except OSError:
                                pass
                            conn.close()
                if self.base_pid is None:
                    self.start_base()  # it died: the next client gets a new one
        except KeyboardInterrupt:
            return 0
        finally:
            for conn in waiting.values():
                conn.close()
            self.sel.unregister(listener)
            listener.close()
            try:
                os.unlink(control)
            except OSError:
                pass
            self.teardown()

    def serve_client(self, listener: socket.socket, waiting: dict[int, socket.socket]) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        fds: list[int] = []
        try:
            conn.settimeout(5)
            msg, fds, _, _ = socket.recv_fds(conn, 4096, 2)
            file = msg.decode()
            if len(fds) != 2 or not file:
                raise ValueError(f"bad request ({len(fds)} descriptors)")
            job = Job(file, None, [])
            job.pid = forkserver.adopt(self.sock, [str(paths.vassal_program()), "--test-file", file],
                                       fds[0], config_fd=fds[1], timeout=60)
        except (OSError, ValueError, UnicodeDecodeError, forkserver.AdoptionError) as e:
            self.errout.write(f"emperor prove: refused a client: {e}\n")
            self.errout.flush()
            conn.close()
            return
        finally:
            for fd in fds:
                os.close(fd)
        job.open_streams = 0  # the client reads them
        job.started = time.monotonic()
        self.jobs[job.pid] = job
        waiting[job.pid] = conn

    # -- watch mode ---------------------------------------------------------------------

    def watch(self, interval: float = 0.3) -> int:
        """Run everything, then rerun the test files that change (and new
        ones); when a preloaded file changes, start a new base (the code
        deploy), then rerun everything. Until Ctrl-C."""
        def stop(signum, frame):
            raise KeyboardInterrupt(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
        self.setup()
        try:
            self.run_batch(find_tests(self.opts.paths, self.opts.recurse))
            tests = self.fingerprints(find_tests(self.opts.paths, self.opts.recurse))
            preloaded = self.fingerprints(self.preloaded_files())
            self.errout.write("emperor prove: watching for changes (Ctrl-C to stop)\n")
            self.errout.flush()
            while True:
                self.wait_events([], interval)  # also reaps what tests left behind
                now_tests = self.fingerprints(find_tests(self.opts.paths, self.opts.recurse))
                now_pre = self.fingerprints(list(preloaded))
                if now_pre != preloaded:
                    changed = sorted(f for f in preloaded if now_pre.get(f) != preloaded[f])
                    self.out.write(f"\nemperor prove: {', '.join(changed)} changed: new base\n")
                    self.stop_base()
                    self.run_batch(sorted(now_tests))
                    preloaded = self.fingerprints(self.preloaded_files())
                elif now_tests != tests:
                    changed = sorted(f for f in now_tests if now_tests[f] != tests.get(f))
                    if changed:
                        self.out.write(f"\nemperor prove: {', '.join(changed)} changed\n")
                        self.run_batch(changed)
                tests = now_tests
        except KeyboardInterrupt:
            return 0
        finally:
            self.teardown()

    @staticmethod
    def fingerprints(files: list[str]) -> dict[str, tuple[int, int, int] | None]:
        found: dict[str, tuple[int, int, int] | None] = {}
        for f in files:
            try:
                st = os.stat(f)
                found[f] = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                found[f] = None
        return found

    def preloaded_files(self) -> list[str]:
        """The files the base loaded that belong to the project: its
        --preload files and what it loaded from the -I directories or from
        below the working directory (not the system's modules)."""
        if self.base_pid is None:
            self.start_base()
        try:
            loaded = self.inc_report.read_text().split("\0")
        except OSError:
            loaded = []
        roots = [os.path.abspath(d) + os.sep for d in [*self.opts.includes, os.getcwd()]]
        mine = {os.path.abspath(f) for f in self.opts.preloads}
        for f in loaded:
            path = os.path.abspath(f) if f else ""
            if path and any(path.startswith(r) for r in roots):
                mine.add(path)
        return sorted(mine)

    def read(self, sock: socket.socket, job: Job, sel: selectors.BaseSelector) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            sel.unregister(sock)
            job.open_streams -= 1
            if sock is job.out and job.out_buf:
                self.tap_line(job, job.out_buf.decode("utf-8", "replace"))
                job.out_buf = b""
            return
        if sock is job.err:
            text = data.decode("utf-8", "replace")
            job.err_text.append(text)
            self.errout.write(text)
            self.errout.flush()
            return
        job.out_buf += data
        *lines, job.out_buf = job.out_buf.split(b"\n")
        for line in lines:
            self.tap_line(job, line.decode("utf-8", "replace"))

    def tap_line(self, job: Job, line: str) -> None:
        job.tap_text.append(line)
        job.tap.feed(line)

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
                job.status = status
                job.rusage = (ru.ru_utime, ru.ru_stime)
            elif pid == self.base_pid:
                self.base_pid = None
            else:
                self.orphans_reaped += 1

    def expire(self, running: list[Job]) -> None:
        if not self.opts.timeout:
            return
        now = time.monotonic()
        for j in running:
            if not j.timed_out and now >= j.started + self.opts.timeout and not j.done:
                j.timed_out = True
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
        me = os.getpid()
        try:
            import psutil
            kids = psutil.Process(me).children(recursive=True)
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

    # -- output -------------------------------------------------------------------------

    def name_line(self, file: str, files: list[str]) -> str:
        longest = max(len(f) for f in files)
        return f"{file} {'.' * (longest + 2 - len(file))} "

    def report_file(self, job: Job, files: list[str]) -> None:
        t = job.tap
        lines = [self.name_line(job.file, files)]
        if self.opts.verbose:
            lines[0] += "\n" + "".join(line + "\n" for line in job.tap_text)
        if job.error:
            lines.append(f"{job.error}\n")
        if job.timed_out:
            lines.append(f"timed out after {self.opts.timeout:g} s\n")
        if job.ok():
            if t.skip_all is not None:
                lines.append(f"skipped: {t.skip_all}".rstrip() + "\n")
            else:
                lines.append("ok\n")
        else:
            lines.append("\n" if not self.opts.verbose else "")
            if job.exit:
                lines.append(f"Dubious, test returned {job.exit} (wstat {job.status}, {job.status:#x})\n")
            total = t.planned if t.planned is not None else t.tests_run
            failed = len(t.failed) + total - t.tests_run
            if failed == 0:
                lines.append(f"All {total} subtests passed \n" if total else "No subtests run \n")
            else:
                lines.append(f"Failed {failed}/{total} subtests \n")
        self.out.write("".join(lines))
        self.out.flush()

    def summary(self, jobs: list[Job], files: list[str], t0: float, cpu0) -> bool:
        wall = time.monotonic() - t0
        cpu = os.times()
        tests = sum(j.tap.tests_run for j in jobs)
        cusr = sum(j.rusage[0] for j in jobs)
        csys = sum(j.rusage[1] for j in jobs)
        usr, sys_ = cpu.user - cpu0.user, cpu.system - cpu0.system
        all_ok = bool(jobs) and all(j.ok() for j in jobs) and len(jobs) == len(files)
        out = self.out
        if all_ok:
            out.write("All tests successful.\n")
        problems = [j for j in jobs if not j.ok() or j.tap.todo_passed]
        if problems:
            out.write("\nTest Summary Report\n-------------------\n")
            longest = max(len(f) for f in files)
            for j in problems:
                t = j.tap
                pad = " " * max(1, longest - len(j.file))
                status = describe_wait(j.status or 0)
                out.write(f"{j.file}{pad}(Wstat: {status} Tests: {t.tests_run} Failed: {len(t.failed)})\n")
                if t.failed:
                    label = "Failed test:" if len(t.failed) == 1 else "Failed tests:"
                    out.write(f"  {label}  {balanced_range(t.failed)}\n")
                if t.todo_passed:
                    out.write(f"  TODO passed:   {balanced_range(t.todo_passed)}\n")
                if j.exit:
                    out.write(f"  Non-zero exit status: {j.exit}\n")
                elif j.status:
                    out.write(f"  Non-zero wait status: {j.status}\n")
                if j.timed_out:
                    out.write(f"  Timed out after {self.opts.timeout:g} s\n")
                if j.error:
                    out.write(f"  {j.error}\n")
                if t.errors:
                    out.write(f"  Parse errors: {t.errors[0]}\n")
                    for e in t.errors[1:]:
                        out.write(f"{' ' * 16}{e}\n")
        out.write(f"Files={len(jobs)}, Tests={tests}, {int(wall):2d} wallclock secs "
                  f"({usr:5.2f} usr {sys_:5.2f} sys + {cusr:5.2f} cusr {csys:5.2f} csys = "
                  f"{usr + sys_ + cusr + csys:5.2f} CPU)\n")
        out.write(f"Result: {'PASS' if all_ok else ('NOTESTS' if not jobs else 'FAIL')}\n")
        out.flush()
        return all_ok


def write_junit(path: Path, jobs: list[Job]) -> None:
    """One <testsuite> per file, one <testcase> per TAP test line."""
    root = ET.Element("testsuites")
    for j in jobs:
        t = j.tap
        suite = ET.SubElement(root, "testsuite", name=j.file, tests=str(t.tests_run),
                              failures=str(len(t.failed)), skipped=str(t.skipped),
                              errors="0" if j.ok() or t.failed else "1")
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
            why = "; ".join([*t.errors, *( [f"exit status {j.exit}"] if j.exit else []),
                             *(["timed out"] if j.timed_out else []), *([j.error] if j.error else [])])
            ET.SubElement(ET.SubElement(suite, "testcase", classname=j.file, name="(file)"),
                          "error", message=why or "failed")
        ET.SubElement(suite, "system-out").text = "\n".join(j.tap_text)
        ET.SubElement(suite, "system-err").text = "".join(j.err_text)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def _which(prog: str) -> str:
    import shutil

    found = shutil.which(prog)
    if not found:
        raise FileNotFoundError(prog)
    return found


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def connect(control: Path, file: str, args: list[str], perl: str = "perl") -> int:
    """`prove --exec 'emperor prove --connect SOCK'`: run one test file
    through a base kept by `emperor prove --serve SOCK`, with this process's
    environment, working directory and arguments; its output on our stdout
    and stderr, its exit status ours. Runs it cold (`perl FILE`) when the
    file asks for that or when nothing serves on SOCK."""
    reason, switches = cold_reason(file)
    env = {k: v for k, v in os.environ.items() if not k.startswith("UWSGI_EMPEROR_")}
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if reason is None:
            conn.connect(str(control))
    except OSError as e:
        print(f"emperor prove: {control}: {e.strerror}: running {file} cold", file=sys.stderr)
        reason = "no base"
    if reason is not None:
        conn.close()
        taint = [s for s in switches if s.lstrip("-")[:1] in ("T", "t")]
        libs = [f"-I{d}" for d in env.get("PERL5LIB", "").split(os.pathsep) if d] if taint else []
        os.execvpe(perl, [perl, *taint, *libs, file, *args], env)
    inc = subprocess.run([perl, "-e", 'print join "\\0", @INC'], env=env,
                         capture_output=True, check=True).stdout.decode().split("\0")
    out_ours, out_theirs = socket.socketpair()
    err_ours, err_theirs = socket.socketpair()
    err_ours.sendall(build_spec(file, switches, os.getcwd(), env, inc, args))
    socket.send_fds(conn, [file.encode()], [out_theirs.fileno(), err_theirs.fileno()])
    out_theirs.close()
    err_theirs.close()
    out_ours.shutdown(socket.SHUT_WR)
    err_ours.shutdown(socket.SHUT_WR)
    sel = selectors.DefaultSelector()
    sel.register(out_ours, selectors.EVENT_READ, 1)
    sel.register(err_ours, selectors.EVENT_READ, 2)
    open_streams = 2
    while open_streams:
        for key, _ in sel.select():
            data = key.fileobj.recv(65536)
            if data:
                os.write(key.data, data)
            else:
                sel.unregister(key.fileobj)
                open_streams -= 1
    sel.close()
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = conn.recv(64)
        if not chunk:
            print(f"emperor prove: {control}: no status for {file}", file=sys.stderr)
            return 255
        reply += chunk
    status = int(reply)
    if os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))  # prove sees the same wait status
    return os.WEXITSTATUS(status)


def main(opts: ProveOptions, watch: bool = False, serve: Path | None = None) -> int:
    try:
        prove = Prove(opts)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"emperor prove: {e}", file=sys.stderr)
        return 2
    try:
        if serve is not None:
            return prove.serve(serve)
        return prove.watch() if watch else prove.run()
    except BaseError as e:
        print(f"emperor prove: {e}", file=sys.stderr)
        return 2
