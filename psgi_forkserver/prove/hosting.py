"""`emperor prove [OURS] [PROVE'S OPTIONS] [FILES]`: prove itself (App::Prove,
in the Perl process ForkServer::Prove) runs the show, with its options,
.proverc, formatters and --state; this process starts the base when prove
asks for it, forks each test prove hands over, reads the test's output
while it runs, and answers with that output and the wait status when the
test has ended. It is the subreaper of the tests and of what they leave
behind, and kills a test at --timeout.

The requests, on a UNIX socket in a private directory, one per connection
(the client writes it whole, then shuts down its side):

    B <4-byte length> ITEM\\0ITEM...   start the base: inc=DIR, module=M,
                                       optional=M, file=F; reply "ok\\n" and
                                       the base's %INC keys, NUL-separated,
                                       or one line of error
    N <4-byte length>                  no base is needed: stop it
    T <4-byte length> FILE\\0SPEC      run FILE forked; SPEC is the config
                                       packet ForkServer::Prove::TestFile reads;
                                       reply "WSTATUS TIMEDOUT OUTLEN ERRLEN\\n"
                                       then the stdout and stderr bytes
"""

from __future__ import annotations

import ctypes
import os
import selectors
import signal
import socket
import struct
import sys
import time
from pathlib import Path

from .. import adoption, protocol
from ..nonblocking import SignalWakeup
from .base import BaseError, TestBase, start_with_streams
from .started import Started, perl_dir, remove_private_dir
from .testfiles import ProveOptions, file_timeout, test_env
from .trace import TRACE, trace


class Forked:
    """One forked test: its streams, its client, what it wrote. (A plain
    class: dataclasses would cost every run's start ~15 ms of CPU.)"""

    __slots__ = ("file", "conn", "pid", "out", "err", "out_bytes", "err_bytes", "status",
                 "started", "timeout", "timed_out")

    def __init__(self, file: str, conn: socket.socket, timeout: float | None = None) -> None:
        self.file, self.conn, self.timeout = file, conn, timeout
        self.pid = 0
        self.out: socket.socket | None = None
        self.err: socket.socket | None = None
        self.out_bytes, self.err_bytes = bytearray(), bytearray()
        self.status: int | None = None
        self.started = 0.0
        self.timed_out = False

    @property
    def done(self) -> bool:
        return self.status is not None and self.out is None and self.err is None


PR_SET_CHILD_SUBREAPER = 36
# (paths.vassal_program(), without pathlib)
VASSAL_PROGRAM = os.path.join(perl_dir(), "ForkServer.pm")



class Session:
    """What this process holds while prove runs: the options, a private
    directory, the base, the tests' environment, the selector woken by
    SIGCHLD. (Imports nothing of the TAP side: prove parses the TAP.)"""

    def __init__(self, opts: ProveOptions, err=sys.stderr, tmp: str | None = None) -> None:
        self.opts = opts
        self.errout = err
        if tmp is None:
            from .started import private_dir
            tmp = private_dir()
        self.tmp = Path(tmp)
        self.base = TestBase(opts, self.tmp)
        self.env = test_env(opts)
        self.orphans_reaped = 0

    def setup(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(e)}")
        self.wakeup = SignalWakeup()
        self.sel = self.wakeup.sel

    def drain_wake(self) -> None:
        self.wakeup.drain()

    def teardown(self) -> None:
        self.base.stop()
        self.reap_leftovers()
        self.wakeup.close()
        remove_private_dir(str(self.tmp))

    def reap_leftovers(self) -> None:
        """What tests left running (daemons, orphans that outlived their
        test) is killed and reaped: nothing outlives the run. psutil is
        imported only when a child is left."""
        killed = False
        deadline = time.monotonic() + 10
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                continue
            if not killed:
                from ..launch import kill_tree
                for child in child_pids():
                    kill_tree(child)
                killed = True
            elif time.monotonic() > deadline:
                return
            else:
                time.sleep(0.01)


def child_pids() -> list[int]:
    import psutil
    try:
        return [p.pid for p in psutil.Process(os.getpid()).children()]
    except psutil.Error:
        return []


class Host:
    def __init__(self, prove: Session, shim_args: list[str], prove_args: list[str]) -> None:
        self.prove = prove
        self.shim_args, self.prove_args = shim_args, prove_args
        self.forked: dict[int, Forked] = {}
        self.shim_pid: int | None = None
        self.shim_status: int | None = None
        self.base_error: str | None = None

    def run(self, started: Started) -> int:
        """`started`: prove, already running, and the socket it connects to."""
        prove = self.prove
        listener, self.shim_pid = started.listener, started.pid
        prove.setup()
        prove.sel.register(listener, selectors.EVENT_READ, "listen")
        self.reap()  # (what ended before SIGCHLD was ours to see)
        try:
            # the base started beside prove (unless prove will surely not
            # want one): it loads its code while prove reads its command line
            if started.base is not None:
                prove.base.take_early(started.base)
            while self.shim_status is None or self.forked:
                if self.shim_status is not None:
                    for f in self.forked.values():  # prove is gone: nobody reads them
                        prove_kill(f.pid)
                self.turn(listener)
            status = self.shim_status
            if os.WIFSIGNALED(status):
                return 128 + os.WTERMSIG(status)
            return os.WEXITSTATUS(status)
        finally:
            if self.shim_pid is not None and self.shim_status is None:
                prove_kill(self.shim_pid)
            for f in self.forked.values():
                prove_kill(f.pid)
                for s in (f.out, f.err, f.conn):
                    if s is not None:
                        s.close()
            prove.sel.unregister(listener)
            listener.close()
            prove.teardown()

    def turn(self, listener: socket.socket) -> None:
        wait = 0.5
        now = time.monotonic()
        for f in self.forked.values():
            if f.timeout is not None and f.status is None:
                wait = max(0.0, min(wait, f.started + f.timeout - now))
        for key, _ in self.prove.sel.select(wait):
            if key.data is None:
                self.prove.drain_wake()
            elif key.data == "listen":
                self.accept(listener)
            else:
                self.read(key.fileobj, key.data)
        self.reap()
        now = time.monotonic()
        for f in list(self.forked.values()):
            if f.timeout is not None and f.status is None and now >= f.started + f.timeout:
                f.timed_out = True
                prove_kill(f.pid)
            if f.done:
                self.answer(f)

    # -- requests -----------------------------------------------------------------------

    def accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        try:
            kind, payload = read_request(conn)
            if kind == b"B":
                answer = self.start_base(payload)
                try:
                    conn.sendall(answer)
                except OSError:
                    pass  # prove ended without running a file (it reads the answer before the first)
                conn.close()
                if TRACE is not None:
                    trace("base-ready", "base", 0, 0)
            elif kind == b"N":  # prove runs every file itself: no base
                self.prove.base.stop()
                conn.close()
            elif kind in (b"T", b"U"):  # U: from the bare base
                self.start_test(conn, payload, bare=kind == b"U")
            else:
                raise ValueError(f"unknown request {kind!r}")
        except (OSError, ValueError) as e:
            self.prove.errout.write(f"emperor prove: bad request from prove: {e}\n")
            conn.close()

    def start_base(self, payload: bytes) -> bytes:
        """The base (started early, loading its own code while prove reads
        its command line), given prove's library directories and the
        preloads."""
        items = [i for i in payload.decode("utf-8", "surrogateescape").split("\0") if i]
        base = self.prove.base
        try:
            if base.pid is None:  # not started early
                base.start_early(self.prove.env)
            if base.config_w is None and not base.configured_by_prove:
                raise BaseError("the base started early is gone")
            base.configure(items)
        except (BaseError, OSError) as e:
            return f"{e}\n".encode()
        if "bare=1" in items:
            base.bare_ready()  # (when it is not, prove runs those files cold)
        else:
            base.stop_bare()
        try:
            keys = self.prove.base.inc_keys.read_bytes()
        except OSError:
            keys = b""
        return b"ok\n" + keys

    def start_test(self, conn: socket.socket, payload: bytes, bare: bool = False) -> None:
        file_b, _, spec = payload.partition(b"\0")
        file = file_b.decode("utf-8", "surrogateescape")
        if TRACE is not None:
            trace("request", file, 0, 0)
        f = Forked(file, conn, timeout=file_timeout(file, self.prove.opts.timeout))

        base = self.prove.base

        def start(out_fd: int, err_fd: int) -> int:
            if (base.bare_pid if bare else base.pid) is None:
                raise BaseError("the bare base is not running" if bare else "the base is not running")
            return adoption.adopt(base.bare_sock if bare else base.sock, [VASSAL_PROGRAM, "--test-file", file],
                                  out_fd, config_fd=err_fd, timeout=60)
        try:
            f.pid, f.out, f.err = start_with_streams(start, spec)
        except (OSError, BaseError, adoption.AdoptionError, protocol.ProtocolError) as e:
            conn.sendall(reply(255 << 8, False, b"", f"emperor prove: could not start {file}: {e}\n".encode()))
            conn.close()
            return
        f.started = time.monotonic()
        if TRACE is not None:
            trace("forked", file, f.pid, 0)
        for s in (f.out, f.err):
            s.setblocking(False)
            self.prove.sel.register(s, selectors.EVENT_READ, f)
        self.forked[f.pid] = f

    def read(self, sock: socket.socket, f: Forked) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            (f.out_bytes if sock is f.out else f.err_bytes).extend(data)
            return
        self.prove.sel.unregister(sock)
        sock.close()
        if sock is f.out:
            f.out = None
        else:
            f.err = None

    def answer(self, f: Forked) -> None:
        del self.forked[f.pid]
        if TRACE is not None:
            trace("answer", f.file, f.pid, 0)
        status = f.status or 0
        if f.timed_out:
            f.err_bytes += f"emperor prove: {f.file}: timed out after {f.timeout:g} s: killed\n".encode()
            # it outlived --timeout: a kill's verdict, also when it ended on
            # its own between our last look and the kill (a starved host)
            if not os.WIFSIGNALED(status):
                status = signal.SIGKILL
        try:
            f.conn.sendall(reply(status, f.timed_out, bytes(f.out_bytes), bytes(f.err_bytes)))
        except OSError:
            pass
        f.conn.close()

    def reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if TRACE is not None:
                who = ("prove" if pid == self.shim_pid else self.forked[pid].file if pid in self.forked
                       else "base" if pid == self.prove.base.pid
                       else "bare base" if pid == self.prove.base.bare_pid else "orphan")
                trace("exit", who, pid, usage.ru_utime + usage.ru_stime)
            if pid == self.shim_pid:
                self.shim_status = status
            elif pid in self.forked:
                self.forked[pid].status = status
            elif pid == self.prove.base.pid:
                self.prove.base.reaped(status)
            elif pid == self.prove.base.bare_pid:
                self.prove.base.bare_reaped()
            else:
                self.prove.orphans_reaped += 1


def prove_kill(pid: int) -> None:
    """A test (or prove) and its process group and descendants."""
    from ..launch import kill_tree  # psutil: imported when needed
    kill_tree(pid)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def reply(status: int, timed_out: bool, out: bytes, err: bytes) -> bytes:
    return f"{status} {int(timed_out)} {len(out)} {len(err)}\n".encode() + out + err


def read_request(conn: socket.socket) -> tuple[bytes, bytes]:
    """One request: the client writes it whole at once."""
    conn.setblocking(True)
    conn.settimeout(10)
    data = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    if len(data) < 5:
        raise ValueError("short request")
    (length,) = struct.unpack(">I", data[1:5])
    if len(data) != 5 + length:
        raise ValueError(f"request of {len(data) - 5} bytes, said {length}")
    return data[:1], data[5:]


def run(prove: Session, shim_args: list[str], prove_args: list[str], started: Started) -> int:
    try:
        if TRACE is not None:
            trace("host", "python", os.getpid(), 0)
        return Host(prove, shim_args, prove_args).run(started)
    except KeyboardInterrupt:
        return 130
    finally:
        if TRACE is not None:
            import resource
            u = resource.getrusage(resource.RUSAGE_SELF)
            trace("end", "python", os.getpid(), u.ru_utime + u.ru_stime)
        sys.stdout.flush()
