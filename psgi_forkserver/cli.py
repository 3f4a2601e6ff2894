"""`emperor run VASSALS_DIR ...`, `emperor status`, `emperor reload|stop|start NAME`,
`emperor reload-base [--wait]`, `emperor reopen-logs`; see `emperor --help`."""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
from pathlib import Path

from .commands.clients import reload_base, reload_base_by_socket, reopen_logs, stats_socket
from .commands.front_cli import (DEFAULT_KEEPALIVE, add_front_arguments, check_front,
                                 front_options, nginx_conf_command, run_dir_of)
from .commands.prove_cli import add_prove_arguments, prove_command
from .commands.verbs import add_verbs, control_many, logs_command, status_command
from .options import Options, run_arguments


MAIN_EXAMPLES = """\
examples:
  emperor run examples/vassals                 run a fleet (status: http://127.0.0.1:PORT
                                               with --status-http, `emperor status`)
  emperor status                               every vassal: state, pid, error, memory
  emperor status app1                          one app: state, pid, why it does not serve
  emperor logs app1 -f                         its recent lines, then new ones
  emperor stop app1                            stop one app (it stays stopped)
  emperor start app1                           run it again
  emperor reload app1 'shop-*'                 a new process for apps, gap-free (--all: every one)
  emperor reload-base --wait                   code deploy: new base, every app moved
  emperor reopen-logs                          after logrotate: reopen every log file
  emperor nginx-conf examples/vassals          the routing by `domain`, for your own nginx
  emperor prove -j2 -r -I lib t/               Perl tests forked from a preloaded base
  emperor perl-lib                             where the Perl side is installed:
                                               PERL5LIB=$(emperor perl-lib) plackup -s ForkServer

`emperor COMMAND --help` shows each command's options and an example.
"""

EXAMPLES = {
    "run": "example:\n  emperor run examples/vassals --status-http 127.0.0.1:9100 --pidfile /tmp/emperor.pid\n"
           "  emperor run examples/vassals --http 127.0.0.1:8080   (the front door: apps by name)\n",
    "nginx-conf": "example:\n  emperor nginx-conf examples/vassals > /etc/nginx/psgi-routing.conf"
                  "   (then: emperor run examples/vassals --nginx-include"
                  " /etc/nginx/psgi-routing.conf --nginx-reload 'nginx -s reload')\n",
    "status": "example:\n  emperor status            (the one Emperor running here)\n"
              "  emperor status --json --dir examples/vassals\n"
              "  emperor status app1       (exit 0: it serves; 3: it does not, and why; 4: no such"
              " vassal)\n",
    "logs": "example:\n  emperor logs app1 -n 20 -f   (its last 20 lines, then new ones)\n",
    "reload": "example:\n  emperor reload app1       (exits 0 once a new process serves)\n"
              "  emperor reload 'shop-*' app2   (each waited for; exit 1 if one failed)\n",
    "stop": "example:\n  emperor stop app1         (stays stopped until `emperor start app1`"
            " or its file changes)\n",
    "start": "example:\n  emperor start app1        (exits 0 once it serves)\n",
    "prove": "example:\n  emperor prove -j2 -r -I lib t/    (prove's verdicts, tests forked from one"
             " preloaded base)\n",
    "reopen-logs": "example:\n  emperor reopen-logs       (logrotate's postrotate: reopen every log file)\n"
                   "  emperor reopen-logs --pidfile /tmp/emperor.pid   (by signal)\n",
    "perl-lib": "example:\n  emperor perl-lib          (then: PERL5LIB=$(emperor perl-lib)"
                " plackup -s ForkServer --port 5000 app.psgi)\n",
    "reload-base": "example:\n  emperor reload-base --wait    (exits 0 once every vassal runs on the"
                   " new base)\n  emperor reload-base --pidfile /tmp/emperor.pid   (by signal)\n",
}


def _sub(sub, name: str, **kw) -> argparse.ArgumentParser:
    return sub.add_parser(name, epilog=EXAMPLES[name],
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kw)


def _add_finder(p: argparse.ArgumentParser) -> None:
    """How a client finds the running Emperor's stats socket."""
    p.add_argument("--stats", type=Path, metavar="PATH",
                   help="the Emperor's stats socket (default: the one running here, "
                        "found in the run directory)")
    p.add_argument("--dir", type=Path, metavar="VASSALS_DIR", dest="vassals_dir",
                   help="the Emperor of this vassals directory (when several run)")


class _VersionAction(argparse.Action):
    """`--version`: argparse's, with the installed version looked up only
    when asked (importlib.metadata is most of a client command's start-up)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ver = version("psgi-forkserver")
        except PackageNotFoundError:
            ver = "unknown"
        print(f"{parser.prog} (psgi-forkserver) {ver}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emperor", description="psgi-forkserver Emperor: hosts many "
                                "Plack apps forked from one preloaded Perl base",
                                epilog=MAIN_EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action=_VersionAction,
                   help="show program's version number and exit")
    sub = p.add_subparsers(dest="command", required=True)
    run = _sub(sub, "run", help="run the vassals of a directory")
    run.add_argument("vassals_dir", metavar="VASSALS_DIR", type=Path)
    run_arguments(run)  # every option of options.Options
    add_front_arguments(run)
    nc = _sub(sub, "nginx-conf",
              help="print the routing by domain as an include file for your own nginx")
    nc.add_argument("vassals_dir", metavar="VASSALS_DIR", type=Path)
    nc.add_argument("--run-dir", type=Path, metavar="DIR",
                    help="the Emperor's --run-dir (default: the one `emperor run` picks "
                         "for VASSALS_DIR)")
    nc.add_argument("--keepalive", type=int, default=DEFAULT_KEEPALIVE, metavar="N",
                    help=f"idle connections nginx keeps per vassal (default {DEFAULT_KEEPALIVE}; "
                         "0: a new connection per request)")
    rl = _sub(sub, "reopen-logs", help="reopen every log file (--logto, logto keys), "
                                       "for logrotate")
    rl.add_argument("--pidfile", type=Path, metavar="PATH",
                    help="signal the Emperor of this --pidfile (SIGUSR2) instead of asking "
                         "on its stats socket")
    _add_finder(rl)
    rb = _sub(sub, "reload-base",
              help="code deploy: new base generation, move every adopted vassal")
    rb.add_argument("--pidfile", type=Path, metavar="PATH",
                    help="signal the Emperor of this --pidfile (SIGUSR1) instead of asking "
                         "on its stats socket")
    rb.add_argument("--wait", action="store_true",
                    help="wait for the outcome: exit 0 once every vassal runs on the new "
                         "generation, 1 with the reason otherwise")
    _add_finder(rb)
    rb.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                    help="--wait: give up after this long (default 300)")
    add_status_arguments(run)
    add_status_command(sub)
    add_verbs(sub, _sub, _add_finder)
    add_prove_arguments(_sub(sub, "prove", help="run Perl test files forked from a preloaded "
                                                  "base (prove's options)"))
    _sub(sub, "perl-lib", help="print the directory of the installed Perl side (ForkServer.pm, "
                               "Plack::Handler::ForkServer), for PERL5LIB or perl -I")
    return p


def check_paths(args: argparse.Namespace) -> str | None:
    """The first path option of `emperor run` that cannot work, as one line
    naming it; None when all can."""
    vdir: Path = args.vassals_dir
    if not vdir.is_dir():
        return f"{vdir}: not a directory"
    if not os.access(vdir, os.R_OK | os.X_OK):
        return f"{vdir}: cannot read the vassals directory"
    for opt, path, sock in (("--pidfile", args.pidfile, False), ("--stats", args.stats, True),
                            ("--logto", args.logto, False),
                            ("--use-fork-server", args.use_fork_server, True)):
        if path is None:
            continue
        parent = Path(os.path.abspath(path)).parent
        if not parent.is_dir():
            return f"{opt} {path}: directory {parent} does not exist"
        if opt != "--use-fork-server" and not os.access(parent, os.W_OK | os.X_OK):
            return f"{opt} {path}: cannot create files in {parent}"
        if os.path.isdir(path):
            return f"{opt} {path}: is a directory"
        if sock and len(os.fsencode(os.path.abspath(path))) > 107:
            return f"{opt} {path}: longer than a UNIX socket path may be (107 bytes)"
    if args.program is not None:
        if os.sep in args.program:
            if not (os.path.isfile(args.program) and os.access(args.program, os.X_OK)):
                return f"--vassal-binary {args.program}: not an executable file"
        elif shutil.which(args.program) is None:
            return f"--vassal-binary {args.program}: not found in PATH"
    return None


def main(argv: list[str] | None = None) -> int:
    from .prove.command import LONG_RUNNING_PROVE, prove_run

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prove"] and not LONG_RUNNING_PROVE.intersection(argv[1:]):
        return prove_run(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "reload-base":
        if args.pidfile is not None:
            stats = args.stats
            if args.wait and stats is None:
                stats = stats_socket(args, "reload-base", quiet=True)
            return reload_base(args.pidfile, args.wait, stats, args.timeout)
        stats = stats_socket(args, "reload-base")
        if stats is None:
            return 1
        return reload_base_by_socket(stats, args.wait, args.timeout)
    if args.command == "reopen-logs":
        return reopen_logs(args)
    if args.command == "nginx-conf":
        return nginx_conf_command(args)
    if args.command == "status":
        return status_command(args)
    if args.command in ("reload", "stop", "start"):
        return control_many(args)
    if args.command == "logs":
        return logs_command(args)
    if args.command == "prove":
        return prove_command(args)
    if args.command == "perl-lib":
        from .paths import perl_dir

        print(perl_dir())
        return 0
    bad = check_paths(args) or check_front(args)
    if bad is not None:
        print(f"emperor: {bad}", file=sys.stderr)
        return 2
    from .logs import Log

    try:
        log = Log(fmt=args.log_format,
                  path=args.logto.absolute() if args.logto is not None else None)
    except OSError as e:
        print(f"emperor: --logto {e}", file=sys.stderr)
        return 2
    # the Emperor itself only for `run`: the other commands are its clients
    from .emperor import Emperor
    from .emperor.locks import StartupError

    opts = Options.from_args(args, log=log, run_dir=run_dir_of(args), front=front_options(args))
    emperor = Emperor(opts)
    try:
        emperor.locks.take()  # locks and pidfile first: a second Emperor stops here
    except StartupError as e:
        print(f"emperor: {e}", file=sys.stderr)
        return 2
    from .status import RUN_DIR_ENV, run_dir

    # the vassals (the base, and so every adopted one) learn where to write
    # their requests files (status.read_requests)
    os.environ[RUN_DIR_ENV] = str(run_dir().absolute())
    # registered before the status server's own atexit (which removes the
    # stats socket in it), so it runs after: an exit for any reason leaves no
    # empty directory per vassals directory behind
    atexit.register(remove_empty_dirs, *own_dirs(args, opts.run_dir))
    try:
        opts.bound(bind_status(args))  # before anything starts: errors exit 2
    except (OSError, ValueError) as e:
        emperor.locks.release()
        if emperor.opts.pidfile is not None:
            emperor.opts.pidfile.unlink(missing_ok=True)
        msg = e.strerror if isinstance(e, OSError) and e.strerror else e
        print(f"emperor: {msg}", file=sys.stderr)
        return 2
    return emperor.run()


# -- status: `run --stats/--status-http`, `emperor status` ---------------------


def add_status_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--stats", type=Path, metavar="PATH",
                     help="serve the JSON status document and take commands on this UNIX "
                          "socket (mode 0600); default: one in the run directory "
                          "($PSGI_FORKSERVER_RUN_DIR, $XDG_RUNTIME_DIR/psgi-forkserver, "
                          "/run/psgi-forkserver for root)")
    run.add_argument("--status-http", metavar="HOST:PORT",
                     help="serve a status page over HTTP (loopback addresses only)")
    run.add_argument("--status-http-public", action="store_true",
                     help="allow --status-http on a non-loopback address (no authentication!)")


def add_status_command(sub) -> None:
    st = _sub(sub, "status", help="what runs and what it costs")
    st.add_argument("name", metavar="NAME", nargs="?", help="one vassal only")
    _add_finder(st)
    st.add_argument("--json", action="store_true", help="print the JSON document as is")
    st.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")


def own_dirs(args: argparse.Namespace, run: Path) -> list[Path]:
    """The directories this run may remove at exit when empty: the default
    run directory (and its sockets/); with --run-dir, which is the
    operator's and stays, the default stats socket's directory, unless
    it is that same directory."""
    if getattr(args, "run_dir", None) is None:
        return [run / "sockets", run]
    # with --stats too: the directory holds the record of where it listens
    from .status import default_stats_path

    stats_dir = default_stats_path(args.vassals_dir).parent
    return [] if stats_dir.resolve() == run.resolve() else [stats_dir]


def remove_empty_dirs(*dirs: Path) -> None:
    """Each directory, in order, if it is empty (ours: made by this run)."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            pass


def record_stats_path(default: Path, stats: Path) -> None:
    """`--stats PATH`: where this Emperor listens, recorded where `emperor
    status` looks (a symbolic link at the default socket's path, which a
    client connects through), removed at exit if still ours. Best effort:
    without it, clients need --stats."""
    tmp = default.with_name(f".{default.name}.{os.getpid()}")
    try:
        default.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        os.symlink(stats, tmp)
        os.replace(tmp, default)
    except OSError as e:
        print(f"emperor: cannot record --stats {stats} in {default.parent}: "
              f"{e.strerror or e} (`emperor status` needs --stats then)", file=sys.stderr)
        return

    def forget() -> None:
        try:
            if os.readlink(default) == str(stats):
                default.unlink()
        except OSError:
            pass
    atexit.register(forget)


def worker_gid(args: argparse.Namespace) -> int | None:
    """The group of the embedded nginx's workers, under a root Emperor with
    `--http` (checked by check_front before)."""
    if getattr(args, "http", None) is None or os.geteuid() != 0:
        return None
    from .frontdoor import nginx_worker_user
    try:
        return nginx_worker_user(args.nginx_user)[1]
    except ValueError:
        return None


def bind_status(args: argparse.Namespace):
    """The status server with its sockets bound. Without --stats, the
    default socket in the run directory: one that cannot be opened there
    is one line on stderr, not a reason to keep the fleet down."""
    from .status import StatusServer, default_stats_path
    from .status.access import read_token
    from .rundir import make_private_dir, run_dir_mode

    stats = args.stats
    default = default_stats_path(args.vassals_dir)
    try:  # a record of a run killed with -9 (this run holds the directory's lock)
        if default.is_symlink():
            default.unlink()
    except OSError:
        pass
    if stats is not None:
        server = StatusServer(
            stats_path=stats, http=args.status_http, http_public=args.status_http_public,
        ).bind()
        if Path(os.path.abspath(stats)) != Path(os.path.abspath(default)):
            record_stats_path(default, Path(os.path.abspath(stats)))
        return server
    if stats is None:
        stats = default
        why = None
        ours = getattr(args, "run_dir", None) is None  # the front door's run directory too
        gid = worker_gid(args) if ours else None
        try:
            make_private_dir(stats.parent, group=gid, mode=run_dir_mode(
                getattr(args, "nginx_include", None) if ours else None, gid))
        except OSError as e:
            why = e.strerror or str(e)
        if why is None and len(os.fsencode(str(stats))) > 107:
            why = "longer than a UNIX socket path may be"
        if why is None:
            try:
                StatusServer(stats_path=stats).bind().close()
            except OSError as e:
                why = e.strerror or str(e)
        if why is not None:
            print(f"emperor: no default stats socket {stats}: {why} "
                  "(`emperor status` needs --stats then)", file=sys.stderr)
            stats = None
    token = None
    if args.status_http_token_file is not None:
        if args.status_http is None:
            raise ValueError("--status-http-token-file needs --status-http")
        token = read_token(args.status_http_token_file)
    if args.status_http_hosts and args.status_http is None:
        raise ValueError("--status-http-host needs --status-http")
    return StatusServer(
        stats_path=stats, http=args.status_http, http_public=args.status_http_public,
        http_hosts=tuple(args.status_http_hosts), http_token=token,
    ).bind()


if __name__ == "__main__":
    sys.exit(main())
