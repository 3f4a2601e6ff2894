"""Starting prove and the base first thing, and deciding whether a run
wants a base at all.

prove's own start-up and the base's are the longest parts of a short run,
so `emperor prove` starts both before it imports anything else
(`start_prove`, `start_base_early`); `few_files` reads prove's command
line to see whether a base could pay off, and `prove_program` finds the
prove to hand the run to when it cannot.
"""

from __future__ import annotations

import os

# No pathlib (with re, enum, fnmatch: ~8 ms of CPU) nor shutil here: this
# is all a run of one file imports before it becomes prove.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

SHIM_MAIN = "exit ForkServer::Prove::main(@ARGV)"
BASE_MAIN = "BEGIN { ForkServer::Prove::TestFile::serve(@ARGV) }\n"


class Started:
    """prove, started first thing (its start-up is the longest): its pid,
    the private directory and the socket it will connect to; and the
    base, when one was started beside it.

    `config_r`: the read end of the pipe on which prove writes the base's
    library directories and preloads as soon as it knows them (its
    `--config-fd`), for the base started beside it: the base starts
    preloading then, however long this process takes to import its host."""

    def __init__(self, tmp: str, listener, pid: int, config_r: int | None = None) -> None:
        self.tmp, self.listener, self.pid, self.config_r = tmp, listener, pid, config_r
        self.base: EarlyBase | None = None

    def start_base(self, perl: str, env: dict[str, str]) -> None:
        """The base, beside prove (start_base_early); OSError if it cannot start."""
        r, self.config_r = self.config_r, None
        try:
            self.base = start_base_early(perl, self.tmp, env, r)
        finally:
            if r is not None:
                os.close(r)

    def no_base(self) -> None:
        """No base beside prove: what prove writes for one goes nowhere."""
        if self.config_r is not None:
            os.close(self.config_r)
            self.config_r = None


class EarlyBase:
    """A base started before its library directories and preloads are
    known: it loads its own code meanwhile, then reads them on its config
    pipe: from prove directly (`config_w` None), or from us on `config_w`
    (TestBase.configure). `pipe` is its Emperor pipe; `bare_pipe` the
    Emperor pipe of the bare base it clones before its preloads when prove
    asks for one (ForkServer::Prove::TestFile)."""

    def __init__(self, pid: int, pipe, config_w: int | None, bare_pipe=None) -> None:
        self.pid, self.pipe, self.config_w, self.bare_pipe = pid, pipe, config_w, bare_pipe
        self.configured_by_prove = config_w is None


def program(perl: str) -> str:
    """`perl` itself when it has a slash, else where PATH finds it
    (FileNotFoundError when nowhere). (spawn.program_path's search,
    without importing spawn's resource and signal: a 1-file run execs
    prove with no more than this.)"""
    if os.sep in perl:
        return perl
    for d in os.get_exec_path():
        path = os.path.join(d or os.curdir, perl)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(2, "not found in PATH", perl)


def spawn_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("UWSGI_EMPEROR_")}


def base_env() -> dict[str, str]:
    """prove's environment for its tests (HARNESS_ACTIVE), which the base
    loads its preloads in too (testfiles.test_env adds the options')."""
    env = spawn_env()
    env["HARNESS_ACTIVE"] = "1"
    env.pop("HARNESS_IS_VERBOSE", None)
    return env


def private_dir() -> str:
    """A new directory only we can enter, in $TMPDIR (else /tmp), as
    tempfile.mkdtemp makes (without importing tempfile: random, hashlib,
    weakref, shutil's compressors, ~5 ms of every run's start)."""
    where = os.environ.get("TMPDIR") or "/tmp"
    for _ in range(100):
        path = os.path.join(os.path.abspath(where), "emperor-prove-" + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(17, "no unused name for a private directory", where)


def remove_private_dir(path: str) -> None:
    """`private_dir()`'s directory and what is in it (files and sockets;
    shutil is imported only for a directory left inside)."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                import shutil

                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:
            pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def perl_dir() -> str:
    """paths.perl_dir(), as a string and without pathlib (started.py is
    what every run imports first)."""
    here = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    installed = os.path.join(here, "perl")
    if os.path.isfile(os.path.join(installed, "ForkServer.pm")):
        return installed
    return os.path.join(os.path.dirname(here), "perl")


def start_prove(perl: str, shim_args: list[str], prove_args: list[str]) -> Started:
    import socket

    tmp = private_dir()
    control = os.path.join(tmp, "prove.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)
    try:
        listener.bind(control)
    finally:
        os.umask(umask)
    listener.listen(64)
    listener.setblocking(False)
    config_r, config_w = os.pipe()
    os.set_inheritable(config_w, True)
    argv = [perl, f"-I{perl_dir()}", "-MForkServer::Prove", "-e", SHIM_MAIN, "--",
            "--socket", control, "--config-fd", str(config_w), *shim_args, "--", *prove_args]
    try:
        from ..spawn import spawn

        # in our session and terminal: Ctrl-C reaches prove with the rest of the job
        pid = spawn(argv, spawn_env(), setsid=False)
    except OSError:
        listener.close()
        os.close(config_r)
        remove_private_dir(tmp)
        raise
    finally:
        os.close(config_w)
    return Started(tmp, listener, pid, config_r)


def base_argv(perl: str, tmp: str | Path, modules: list[str] = []) -> list[str]:  # noqa: B006 (read only)
    """The base's command line, before its preloads (TestBase.argv adds them)."""
    return [perl, f"-I{perl_dir()}", "-MForkServer::Prove::TestFile",
            *(f"-M{m}" for m in modules), "-e", BASE_MAIN, "--",
            "--inc-report", os.path.join(tmp, "inc"), "--inc-keys", os.path.join(tmp, "inc-keys"),
            "--fork-server", os.path.join(tmp, "fork.sock"), "--name", "emperor-prove",
            # 4 KB pages: a test writes to much of what it inherits
            # (compiling, loading), and each first write to a 2 MB page
            # copies all of it; measured faster for tests (bench: prove)
            "--fork-server-hugepages", "false",
            # test files are never handed to warm spares: none to make
            "--fork-server-spares", "0"]


def spawn_base(argv: list[str], tmp: str | Path, env: dict[str, str], config_fd: int | None = None,
               bare_pipe: bool = False):
    """Start the base with `argv` (and `--config-fd`): its stdin and
    stdout /dev/null, stderr its log in `tmp`, in a session of its own;
    returns its pid, our end of its Emperor pipe, and with `bare_pipe` our
    end of the Emperor pipe of the bare base it may clone (else None)."""
    import socket

    from ..spawn import spawn

    ours, theirs = socket.socketpair()
    bare_ours, bare_theirs = socket.socketpair() if bare_pipe else (None, None)
    if bare_theirs is not None:  # before --config-fd: the config may ask for the bare base
        argv = [*argv, "--bare-pipe-fd", str(bare_theirs.fileno())]
        os.set_inheritable(bare_theirs.fileno(), True)
    if config_fd is not None:
        argv = [*argv, "--config-fd", str(config_fd)]
        os.set_inheritable(config_fd, True)
    os.set_inheritable(theirs.fileno(), True)
    try:
        pid = spawn(argv, {**env, "UWSGI_EMPEROR_FD": str(theirs.fileno())},
                    stdin=None, stdout=None, stderr=os.path.join(tmp, "base.log"))
    except BaseException:
        ours.close()
        if bare_ours is not None:
            bare_ours.close()
        raise
    finally:
        theirs.close()
        if bare_theirs is not None:
            bare_theirs.close()
    return pid, ours, bare_ours


def start_base_early(perl: str, tmp: str, env: dict[str, str], config_r: int | None = None) -> EarlyBase:
    """The base, started with prove (in `tmp`, prove's private directory),
    before the rest of `emperor prove` is even imported. With `config_r`
    (prove's --config-fd pipe, which the caller closes), prove configures
    it; else we do, on the returned base's `config_w`."""
    if config_r is not None:
        pid, pipe, bare_pipe = spawn_base(base_argv(perl, tmp), tmp, env, config_fd=config_r, bare_pipe=True)
        return EarlyBase(pid, pipe, None, bare_pipe)
    r, w = os.pipe()
    try:
        pid, pipe, _ = spawn_base(base_argv(perl, tmp), tmp, env, config_fd=r)
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    return EarlyBase(pid, pipe, w)


def prove_program(perl: str) -> str | None:
    """The `prove` script of this perl (next to it, else on PATH)."""

    try:
        real = os.path.realpath(program(perl))
    except FileNotFoundError:
        return None
    beside = os.path.join(os.path.dirname(real), "prove")
    if os.path.isfile(beside):
        return beside
    import shutil

    return shutil.which("prove")


_QUICK_OURS = frozenset(("--no-preload", "--no-learn", "--no-cold-retry", "--destruct"))


def few_files(prove_args: list[str], shim_args: list[str]) -> bool:
    """Whether prove's command line names no more test files than its
    jobs, and leaves the preload to us: then a base cannot pay off (it
    would load what each file loads, and every file starts at once), and
    prove runs the files itself. A guess on the side of starting one: an
    option not known here or a .proverc is "no"."""
    # (our options that prove itself honours as well as a fork would: it
    # preloads nothing and retries nothing; not --preload, which asks for a
    # base, nor --timeout, --junit, --shard)
    if any(a not in _QUICK_OURS for a in shim_args) or os.path.exists(".proverc") \
            or os.path.exists(os.path.expanduser("~/.proverc")):
        return False
    jobs, recurse, named = 1, False, []
    args = iter(prove_args)
    for arg in args:
        if arg in ("-j", "--jobs"):
            arg = "-j" + next(args, "")
        if arg.startswith(("-j", "--jobs=")):
            try:
                jobs = int(arg.removeprefix("--jobs=").removeprefix("-j"))
            except ValueError:
                return False
        elif arg.startswith("-") and arg.lstrip("-") and set(arg[1:]) <= set("lbrvwqQmfo") \
                and not arg.startswith("--"):
            recurse = recurse or "r" in arg
        elif arg in ("--merge", "--timer", "--recurse"):
            recurse = recurse or arg == "--recurse"
        elif not arg.startswith("-"):
            named.append(arg)
        else:
            return False
    files = forkable = 0
    for path in named or ["t"]:
        if os.path.isdir(path):
            found, could_fork = _count_tests(path, recurse, max(1, jobs) + 1 - forkable)
            files, forkable = files + found, forkable + could_fork
        elif path.endswith(".t") and os.path.isfile(path):
            files, forkable = files + 1, forkable + _may_fork(path)
        else:
            return False
        if forkable > max(1, jobs):
            return False
    return files > 0


def _count_tests(top: str, recurse: bool, enough: int) -> tuple[int, int]:
    """The *.t files in `top` (and below it with `recurse`), and how many
    of them a base may fork, counted until those are `enough`."""
    found = could_fork = 0
    for where, dirs, files in os.walk(top):
        for name in files:
            if name.endswith(".t"):
                found += 1
                could_fork += _may_fork(os.path.join(where, name))
        if could_fork >= enough or not recurse:
            break
    return found, could_fork


def _may_fork(path: str) -> bool:
    """False for a file whose #! line gives perl a switch other than -w
    (taint mode, the most common: Sub-Exporter's, Test-Exception's): prove
    runs it with that switch, which no fork of a running perl can take, so
    it runs cold under `emperor prove` too (ForkServer::Prove::Source's
    rule: the switches up to the first word that is none, as perl reads
    `#!perl -w  # -*- perl -*-`). (No `re` here: the 1-file path's start.)"""
    try:
        with open(path, "rb") as f:
            first = f.readline(512)
    except OSError:
        return True
    if not first.startswith(b"#!"):
        return True
    words = first[2:].split()  # (`#! /usr/bin/perl -Tw` too: Test-Exception's)
    if not words or b"perl" not in words[0]:
        return True
    for word in words[1:]:
        if not word.startswith(b"-"):
            break
        if word != b"-w":
            return False
    return True
