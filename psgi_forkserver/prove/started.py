"""Starting prove first thing, and deciding whether it will want a base.

prove's own start-up is the longest part of a short run, so `emperor
prove` starts it before anything else (`start_prove`); `few_files` reads
prove's command line to see whether it wants a base at all.
"""

from __future__ import annotations

import os
from pathlib import Path


SHIM_MAIN = "exit ForkServer::Prove::main(@ARGV)"


class Started:
    """prove, started first thing (its start-up is the longest): its pid,
    the private directory and the socket it will connect to."""

    def __init__(self, tmp: str, listener, pid: int) -> None:
        self.tmp, self.listener, self.pid = tmp, listener, pid


def start_prove(perl: str, shim_args: list[str], prove_args: list[str]) -> Started:
    import shutil
    import socket
    import tempfile

    from ..paths import perl_dir
    from ..spawn import spawn

    tmp = tempfile.mkdtemp(prefix="emperor-prove-")
    control = os.path.join(tmp, "prove.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)
    try:
        listener.bind(control)
    finally:
        os.umask(umask)
    listener.listen(64)
    listener.setblocking(False)
    argv = [perl, f"-I{perl_dir()}", "-MForkServer::Prove", "-e", SHIM_MAIN, "--",
            "--socket", control, *shim_args, "--", *prove_args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("UWSGI_EMPEROR_")}
    try:
        # in our session and terminal: Ctrl-C reaches prove with the rest of the job
        pid = spawn(argv, env, setsid=False)
    except OSError:
        listener.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Started(tmp, listener, pid)


def few_files(prove_args: list[str], shim_args: list[str]) -> bool:
    """Whether prove's command line names no more test files than its
    jobs, and leaves the preload to us: then prove runs them itself
    (ForkServer::Prove's rule) and wants no base. A guess on the side of
    starting one: an option not known here or a .proverc is "no"."""
    if shim_args or os.path.exists(".proverc") or os.path.exists(os.path.expanduser("~/.proverc")):
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
    files = 0
    for path in named or ["t"]:
        if os.path.isdir(path):
            files += sum(1 for _ in Path(path).glob("**/*.t" if recurse else "*.t"))
        elif path.endswith(".t") and os.path.isfile(path):
            files += 1
        else:
            return False
        if files > max(1, jobs):
            return False
    return files > 0
