"""The one way a program is started: `spawn(argv, env, ...)`.

Every program the Emperor and `emperor prove` run (vassal programs, nginx,
`nginx -t`, the reload command, a prove base, a test file run cold, the
prove shim) starts here, with the same rules:

- the signals Python ignores (SIGPIPE, SIGXFSZ) and those an operator's
  shell may have ignored (`nohup`, `&`) are back to their defaults, and no
  signal is blocked: a program must not inherit the Emperor's dispositions;
- descriptors 0, 1 and 2 are said explicitly for each (`Stdio`); every other
  descriptor of ours is close-on-exec (Python's default), except those the
  caller made inheritable on purpose (a vassal's Emperor pipe);
- its own session (`setsid`), unless it must stay in the caller's terminal
  (the prove shim: Ctrl-C reaches it with the rest of the job).

posix_spawn (vfork + exec) is used: the Emperor's address space is never
copied, whatever its size. The one exception is `die_with_parent`: a
program that must get SIGTERM when the Emperor dies (nginx: a killed
Emperor must not leave it holding the port) is started by fork + exec,
since posix_spawn cannot set PR_SET_PDEATHSIG in the child.

Children that run our own Python code and exec nothing (a template
renderer, the cgroup guard) fork where they are, and a short command whose
output is read at once (`perl -e 'print @INC'`) is subprocess.run's: they
are not programs that live beside the Emperor.
"""

from __future__ import annotations

# imported by `emperor prove` before anything else: the standard library's
# lightest modules only (no dataclasses, pathlib or shutil at import)
import os
import resource
import signal
from collections.abc import Mapping, Sequence


class Inherit:
    """Keep the caller's descriptor as it is."""

    def __repr__(self) -> str:
        return "INHERIT"


INHERIT = Inherit()
# a descriptor to duplicate, a file to open (written: created or truncated,
# mode 0600), None for /dev/null, or INHERIT
Stdio = int | str | os.PathLike | None | Inherit

# reset in every child: Python ignores the first two, a shell may ignore the rest
DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                   signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD)

PR_SET_PDEATHSIG = 1


def program_path(name: str) -> str:
    """`name` itself when it has a slash, else where PATH finds it
    (FileNotFoundError when nowhere)."""
    if os.sep in name:
        return name
    # shutil.which's search, without importing shutil (zlib, bz2, lzma:
    # ~3 ms of CPU of every `emperor prove` run)
    for d in os.get_exec_path():
        path = os.path.join(d or os.curdir, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(2, "not found in PATH", name)


def _stdio(stdin: Stdio, stdout: Stdio, stderr: Stdio) -> list[tuple[int, int | tuple[str, int]]]:
    """(target, what goes there) for 0, 1 and 2, the inherited left out:
    a descriptor to duplicate, or (path, flags) to open (mode 0600)."""
    out: list[tuple[int, int | tuple[str, int]]] = []
    for target, how in ((0, stdin), (1, stdout), (2, stderr)):
        if isinstance(how, Inherit):
            continue
        if isinstance(how, int):
            out.append((target, how))
        else:
            name = os.devnull if how is None else os.fspath(how)
            flags = os.O_RDONLY if target == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            out.append((target, (name, flags)))
    return out


def _actions(stdin: Stdio, stdout: Stdio, stderr: Stdio) -> list[tuple]:
    return [(os.POSIX_SPAWN_DUP2, what, target) if isinstance(what, int)
            else (os.POSIX_SPAWN_OPEN, target, what[0], what[1], 0o600)
            for target, what in _stdio(stdin, stdout, stderr)]


def spawn(argv: Sequence[str], env: Mapping[str, str], *, stdin: Stdio = INHERIT,
          stdout: Stdio = INHERIT, stderr: Stdio = INHERIT, setsid: bool = True,
          nofile: int | None = None, die_with_parent: bool = False) -> int:
    """Start `argv` (argv[0] looked up in PATH when it has no slash) with
    exactly `env`; its pid, or OSError.

    `nofile`: the soft descriptor limit it starts with, when lower than
    ours (programs that close every descriptor up to the limit, or use
    select(), expect the usual 1,024). posix_spawn cannot set a limit, so
    ours is lowered around it (nothing opens meanwhile; descriptors above a
    lowered limit stay valid)."""
    path = program_path(argv[0])
    if die_with_parent:
        return _fork_exec(path, list(argv), dict(env), stdin, stdout, stderr, setsid)
    lowered = None
    if nofile is not None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if nofile < soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
            lowered = (soft, hard)
    try:
        return os.posix_spawn(path, list(argv), env, file_actions=_actions(stdin, stdout, stderr),
                              setsigdef=DEFAULT_SIGNALS, setsigmask=(), setsid=setsid)
    finally:
        if lowered is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, lowered)


def _fork_exec(path: str, argv: list[str], env: dict[str, str], stdin: Stdio, stdout: Stdio,
               stderr: Stdio, setsid: bool) -> int:
    import ctypes  # here: `emperor prove` starts faster without it
    import ctypes.util

    parent = os.getpid()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    # opened before the fork: the child makes only system calls until exec
    opened: dict[int, int] = {}  # target -> descriptor to dup2 there
    ours: list[int] = []  # those opened here, closed once it is started
    try:
        for target, what in _stdio(stdin, stdout, stderr):
            if isinstance(what, int):
                opened[target] = what
            else:
                opened[target] = os.open(what[0], what[1] | os.O_CLOEXEC, 0o600)
                ours.append(opened[target])
        pid = os.fork()
        if pid == 0:
            try:
                if setsid:
                    os.setsid()
                libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
                if os.getppid() != parent:  # it died before prctl: nobody to serve
                    os._exit(1)
                for target, fd in opened.items():
                    os.dup2(fd, target)  # dup2 clears close-on-exec on the copy
                for sig in DEFAULT_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                os.execve(path, argv, env)
            finally:
                os._exit(127)
        return pid
    finally:
        for fd in ours:
            os.close(fd)
