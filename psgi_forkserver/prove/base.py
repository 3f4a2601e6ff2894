"""The base the tests are forked from: an ordinary base vassal with a fork
server, started with the user's preloads (ForkServer::Prove::TestFile::serve)."""

from __future__ import annotations

import os
import re
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from .. import protocol
from .started import EarlyBase, base_argv, spawn_base
from .testfiles import ProveOptions
from .trace import trace


def is_module_name(what: str) -> bool:
    """`Foo::Bar` (preloaded by name) rather than a file to require."""
    return bool(re.fullmatch(r"[A-Za-z_]\w*(?:::\w+)*", what)) and not os.path.isfile(what)


class BaseError(Exception):
    """The base could not be started."""


class TestBase:
    """One base process at a time; `pid` is None when there is none."""

    __test__ = False  # not a pytest class

    def __init__(self, opts: ProveOptions, tmp: Path) -> None:
        self.opts = opts
        self.sock = tmp / "fork.sock"
        self.log = tmp / "base.log"
        self.inc_report = tmp / "inc"  # the files it loaded (for --watch)
        self.inc_keys = tmp / "inc-keys"  # its %INC keys (for telling what is preloaded)
        self.pid: int | None = None
        self.pipe: socket.socket | None = None
        self.config_w: int | None = None  # the early base's --config-fd
        self.configured_by_prove = False  # prove writes the early base's config itself
        self.ended_status = 0  # its wait status, when a wait of the caller's took it
        # the bare base (none of the suite's modules loaded) that the early base
        # clones before its preloads when prove asks for one
        self.bare_sock = tmp / "bare.sock"
        self.bare_keys = tmp / "inc-keys.bare"
        self.bare_pipe: socket.socket | None = None
        self.bare_pid: int | None = None

    def argv(self) -> list[str]:
        argv = base_argv(self.opts.perl, self.sock.parent, self.opts.modules)
        for f in self.opts.preloads:
            if is_module_name(f):
                argv += ["--preload-module", f]
            else:
                argv += ["--preload", os.path.abspath(f)]
        for m in self.opts.required_modules:
            argv += ["--preload-module", m]
        for m in self.opts.optional_modules:
            argv += ["--preload-optional", m]
        return argv

    def start(self, env: dict[str, str]) -> None:
        """Start it and wait for its byte 1; BaseError when it does not come."""
        self.spawn(env)
        self.wait_ready()

    def take_early(self, early: EarlyBase) -> None:
        """The base `emperor prove` started beside prove (started.py)."""
        self.pid, self.pipe, self.config_w = early.pid, early.pipe, early.config_w
        self.configured_by_prove = early.configured_by_prove
        self.bare_pipe = early.bare_pipe

    def bare_ready(self) -> bool:
        """Whether the bare base (asked for in the config) is serving: its
        byte 1 (it was cloned before the full base's preloads, so it comes
        first). When it is not, its %INC keys are removed: prove then
        runs those files cold."""
        pipe = self.bare_pipe
        if pipe is not None and self.bare_pid is None:
            pipe.settimeout(30)
            try:
                byte = pipe.recv(1)
            except OSError:
                byte = b""
            if byte == bytes([protocol.VassalByte.SPAWNED]):  # (else it is gone: no pid to kill)
                try:
                    self.bare_pid = int((self.sock.parent / "bare.pid").read_text())
                except (OSError, ValueError):
                    self.bare_pid = None
            if self.bare_pid is None:
                self.stop_bare()
        if self.bare_pid is None:
            try:
                self.bare_keys.unlink()
            except OSError:
                pass
            return False
        return True

    def start_early(self, env: dict[str, str]) -> None:
        """Start it before its library directories and preloads are known
        (it loads its own code meanwhile); `configure` gives them."""
        self.config_w = None
        self.configured_by_prove = False
        r, w = os.pipe()
        try:
            self.spawn(env, config_fd=r)
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        self.config_w = w

    def configure(self, items: list[str]) -> None:
        """The early base's directories and preloads (`--config-fd` items:
        inc=DIR, module=M, optional=M, file=F); waits for it to be ready."""
        if self.configured_by_prove:  # prove wrote them on the base's pipe already
            self.configured_by_prove = False
            self.wait_ready()
            return
        w, self.config_w = self.config_w, None
        if w is None:
            raise BaseError("the base was not started early")
        try:
            data = "\0".join(items).encode("utf-8", "surrogateescape")
            while data:
                data = data[os.write(w, data):]
        except OSError:
            pass  # it died: wait_ready says how
        finally:
            os.close(w)
        self.wait_ready()

    def spawn(self, env: dict[str, str], config_fd: int | None = None) -> None:
        self.pid, self.pipe, _ = spawn_base(self.argv(), self.sock.parent, env, config_fd)

    def wait_ready(self) -> None:
        ours = self.pipe
        assert ours is not None
        ours.settimeout(300)
        try:
            byte = ours.recv(1)
        except OSError:
            byte = b""
        if byte != bytes([protocol.VassalByte.SPAWNED]):
            status: int | None = self.ended_status
            if self.pid is not None:  # (else a wait4 of the caller's took it: reaped())
                try:
                    _, status = os.waitpid(self.pid, 0)
                except ChildProcessError:
                    # a wait for any child took it before its pid was ours
                    # to match (SIGCHLD while it was handed over): the log says why
                    status = None
            self.pid = None
            text = " | ".join(self.log.read_text(errors="replace").split("\n")).strip(" |")
            from ..launch import describe_status
            how = describe_status(status) if status is not None else "it ended"
            raise BaseError(f"the base did not start ({how}): {text}")

    def reaped(self, status: int) -> None:
        """It ended, and the caller's wait for any child took its status."""
        self.pid, self.ended_status = None, status

    def bare_reaped(self) -> None:
        """The bare base ended, and the caller's wait for any child took it."""
        self.bare_pid = None

    def stop_bare(self) -> None:
        if self.bare_pipe is not None:
            self.bare_pipe.close()  # end of file: it stops
            self.bare_pipe = None
        if self.bare_pid is not None:
            _kill_and_reap(self.bare_pid, "bare base")
            self.bare_pid = None

    def stop(self) -> None:
        self.stop_bare()
        if self.config_w is not None:  # started early, never configured
            os.close(self.config_w)
            self.config_w = None
        if self.pipe is not None:
            self.pipe.close()  # end of file: the base stops
            self.pipe = None
        if self.pid is not None:
            _kill_and_reap(self.pid, "base")
            self.pid = None

    def preloaded(self) -> set[str] | None:
        """The keys of its %INC (None before it has started; the file
        has KEY<TAB>PATH items)."""
        try:
            return {item.partition("\t")[0] for item in self.inc_keys.read_text().split("\0")}
        except OSError:
            return None

    def loaded_files(self) -> list[str]:
        """What it reported having loaded (every file in %INC)."""
        try:
            return self.inc_report.read_text().split("\0")
        except OSError:
            return []


def start_with_streams(start: Callable[[int, int], int],
                       spec: bytes | None) -> tuple[int, socket.socket, socket.socket]:
    """Start a test with its stdout and stderr on socket pairs of ours:
    `start(out_fd, err_fd)` gets the far ends (stderr's already holding the
    spec, when there is one) and returns the pid; we keep the near ends,
    shut for writing. What `start` raises is raised, every end closed."""
    out_ours, out_theirs = socket.socketpair()
    err_ours, err_theirs = socket.socketpair()
    try:
        if spec is not None:
            err_ours.sendall(spec)
        pid = start(out_theirs.fileno(), err_theirs.fileno())
    except BaseException:
        out_ours.close()
        err_ours.close()
        raise
    finally:
        out_theirs.close()
        err_theirs.close()
    out_ours.shutdown(socket.SHUT_WR)
    err_ours.shutdown(socket.SHUT_WR)
    return pid, out_ours, err_ours


def _kill_and_reap(pid: int, what: str) -> None:
    """A base has nothing to save, and a test run waits for its end."""
    try:
        os.kill(pid, signal.SIGKILL)
        _, _, usage = os.wait4(pid, 0)
        trace("exit", what, pid, usage.ru_utime + usage.ru_stime)
    except (ProcessLookupError, ChildProcessError):
        pass
