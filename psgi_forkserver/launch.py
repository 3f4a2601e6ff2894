"""The Emperor's edge to the OS: starting, signalling and describing processes.

The Emperor (emperor/loop.py) is a reconcile loop: events record facts, each
vassal's state machine decides, and the loop carries out the actions. The
system calls those actions come down to live here, as small functions with
explicit inputs and outputs and no Emperor state: exec a vassal program
(posix_spawn, with its environment, descriptors and session), make the pipes
a vassal process talks to the Emperor on, write to them, SIGKILL a process
tree, become a child subreaper. They log nothing and keep no books; failures
are raised (OSError) for the Emperor to log and to feed back to the vassal.
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import fcntl
import os
import resource
import shutil
import signal
import socket
import struct
import termios
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil

from . import protocol
from .config import SECTION, VassalConfig, emperor_keys
from .spawn import INHERIT, spawn

#: keys of a vassal file that only the Emperor reads; the vassal never sees them
EMPEROR_KEYS = emperor_keys()  # declared in perl/ForkServer/options.json

PR_SET_CHILD_SUBREAPER = 36

Pipe = tuple[socket.socket, socket.socket]  # (the Emperor's end, the vassal's end)


def set_child_subreaper() -> None:
    """Become the reaper of every orphaned descendant (prctl); OSError if not."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(e)}")


@dataclass(frozen=True)
class Descriptors:
    """The Emperor's descriptor limits: `soft` is what it may use now,
    `inherited` the soft limit it was started with (what its children get)."""

    soft: int
    hard: int
    inherited: int


def raise_nofile() -> Descriptors:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each vassal costs the
    Emperor descriptors; the usual soft limit of 1,024 is reached near 500
    vassals). An unlimited hard limit is capped at fs.nr_open, the most a
    process may have."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                want = int(f.read())
        except (OSError, ValueError):
            want = soft
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError):
            want = soft
    else:
        want = soft
    return Descriptors(want, hard, soft)


def describe_status(status: int) -> str:
    """A wait status, for a log line: `exit status 1`, `killed by SIGKILL`."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    return f"status {status:#x}"


def program_argv(program: str) -> list[str]:
    """How to exec the vassal program: directly, or with perl if not executable."""
    if os.sep not in program:
        found = shutil.which(program)
        if found:
            return [found]
    if os.access(program, os.X_OK):
        return [program]
    return [shutil.which("perl") or "/usr/bin/perl", program]


def make_pipes(config: bool) -> list[Pipe]:
    """The Emperor pipe, and with `config` the config pipe, of a new process:
    AF_UNIX stream socketpairs, close-on-exec. OSError (EMFILE, ENFILE) if
    they cannot all be made; none is left open then."""
    pairs: list[Pipe] = []
    try:
        for _ in range(2 if config else 1):
            pairs.append(socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM))
    except OSError:
        for a, b in pairs:
            a.close()
            b.close()
        raise
    return pairs


def spawn_vassal(argv: Sequence[str], env: Mapping[str, str], pipe_fd: int,
                 config_fd: int | None, listen_fd: int | None,
                 nofile: int | None = None, output_fd: int | None = None) -> int:
    """Start the vassal program `argv` (argv[0] a path); its pid, or OSError.

    The child inherits `pipe_fd` (the Emperor pipe, as UWSGI_EMPEROR_FD) and
    `config_fd` if any (the config pipe, as UWSGI_EMPEROR_FD_CONFIG), with
    `env` otherwise; its descriptor 0 is `listen_fd` (the Emperor-owned
    http-socket) or /dev/null; 1 and 2 are `output_fd` (its output pipe,
    logs.py) if given, else the Emperor's."""
    env = dict(env)
    env.pop("UWSGI_EMPEROR_FD_CONFIG", None)
    env["UWSGI_EMPEROR_FD"] = str(pipe_fd)
    if config_fd is not None:
        os.set_inheritable(config_fd, True)
        env["UWSGI_EMPEROR_FD_CONFIG"] = str(config_fd)
    os.set_inheritable(pipe_fd, True)
    out = output_fd if output_fd is not None else INHERIT
    # its own session from birth, like every vassal of our Perl side
    # (which checks and does not repeat it): what it leaves behind can be
    # told by session id (emperor/orphans.py), a uWSGI vassal's too
    return spawn(argv, env, stdin=listen_fd, stdout=out, stderr=out, nofile=nofile)


def emperor_only_stripped(text: str) -> str:
    """The vassal file text without the keys only the Emperor reads."""
    out = []
    section = ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("[") and s.endswith("]"):
            section = s[1:-1].strip()
        elif section == SECTION and s and s[0] not in ";#":
            if s.partition("=")[0].strip() in EMPEROR_KEYS:
                continue
        out.append(line)
    return "\n".join(out) + "\n"


def config_text(cfg: VassalConfig, always: bool = False) -> bytes | None:
    """What to send on a config pipe: a rendered template, or a file with
    Emperor-only keys (the vassal program would reject them); else None.
    With `always`, any file's text: an adopted vassal of ours takes its
    output pipe from the config packet (logs.py)."""
    if getattr(cfg, "rendered", False) or getattr(cfg, "expanded", False):
        text = emperor_only_stripped(getattr(cfg, "text", "") or "")
    elif always or any(k in EMPEROR_KEYS for k, _ in cfg.options):
        raw = getattr(cfg, "text", None)
        if raw is None:
            try:
                raw = cfg.path.read_text(errors="replace")
            except OSError:
                raw = ""
        text = emperor_only_stripped(raw)
    else:
        return None
    data = text.encode("utf-8", "surrogateescape")
    if always and len(data) > protocol.MAX_BODY and not getattr(cfg, "rendered", False) \
            and not getattr(cfg, "expanded", False) \
            and not any(k in EMPEROR_KEYS for k, _ in cfg.options):
        return None  # it reads its file itself; its output stays the base's
    if len(data) > protocol.MAX_BODY:
        # checked before any pipe or process exists for it
        raise protocol.ProtocolError(f"config of {len(data)} bytes exceeds {protocol.MAX_BODY}: "
                            "it must fit one config packet")
    return data


def send_config(sock: socket.socket, text: bytes, output_fd: int | None = None) -> None:
    """The vassal's config on its config pipe, as one config packet; blocking,
    at most a second per send. OSError if it cannot be sent.

    `output_fd`, the process's output pipe (logs.py), rides along with the
    packet's first bytes as SCM_RIGHTS: the bytes stay uWSGI's, and a
    reader that does not look for it (read(2)) has it closed by the kernel."""
    sock.setblocking(True)
    sock.settimeout(1.0)
    data = protocol.encode_packet(protocol.MODIFIER1_CONFIG, text)
    if output_fd is not None:
        fds = array.array("i", [output_fd])
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        data = data[sent:]
    sock.sendall(data)


def unread_bytes(sock: socket.socket) -> int:
    """Bytes sent on a UNIX socket that its peer has not read yet (SIOCOUTQ);
    0 when it cannot be told."""
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return struct.unpack("i", buf)[0]


def send_byte(sock: socket.socket, byte: int) -> None:
    """One byte on an Emperor pipe; OSError if the process is gone."""
    sock.send(bytes([byte]))


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every descendant of it; best effort, never raises."""
    try:
        proc = psutil.Process(pid)
        victims = [proc, *proc.children(recursive=True)]
    except (psutil.Error, OSError):
        victims = []
        try:
            os.kill(pid, signal.SIGKILL)  # at least the process itself
        except OSError:
            pass
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except (psutil.Error, OSError):
            pass


class SignalQueue:
    """Signals as bytes on a wakeup socket (the C handler writes them), so
    the selector wakes for them and the loop handles them between turns,
    never inside a handler. `pop()` returns those received so far."""

    SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
               signal.SIGUSR2)

    def __init__(self) -> None:
        self.queued: list[int] = []
        self._r, self._w = socket.socketpair()
        for s in (self._r, self._w):
            s.setblocking(False)
        signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    @staticmethod
    def _handler(signum: int, frame: object) -> None:
        pass  # the C handler already wrote signum to the wakeup socket

    def fileno(self) -> int:
        return self._r.fileno()

    def on_readable(self, now: float) -> None:
        try:
            self.queued += self._r.recv(4096)
        except BlockingIOError:
            pass

    def pop(self) -> list[signal.Signals]:
        queued, self.queued = self.queued, []
        return [signal.Signals(n) for n in queued]
