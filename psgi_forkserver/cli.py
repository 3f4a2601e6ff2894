"""`emperor run VASSALS_DIR ...`, `emperor status`, `emperor reload|stop|start NAME`,
`emperor reload-base [--wait]`, `emperor reopen-logs`; see `emperor --help`."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import paths
from .frontdoor import DEFAULT_KEEPALIVE
from .emperor import Emperor, Options, StartupError, pidfile_is_held


MAIN_EXAMPLES = """\
examples:
  emperor run examples/vassals                 run a fleet (status: http://127.0.0.1:PORT
                                               with --status-http, `emperor status`)
  emperor status                               every vassal: state, pid, error, memory
  emperor stop app1                            stop one app (it stays stopped)
  emperor start app1                           run it again
  emperor reload app1                          a new process for one app, gap-free
  emperor reload-base --wait                   code deploy: new base, every app moved
  emperor reopen-logs                          after logrotate: reopen every log file
  emperor prove -j2 -r -I lib t/               Perl tests forked from a preloaded base
  emperor nginx-conf examples/vassals          the routing by `domain`, for your own nginx

`emperor COMMAND --help` shows each command's options and an example.
"""

EXAMPLES = {
    "run": "example:\n  emperor run examples/vassals --status-http 127.0.0.1:9100 --pidfile /tmp/emperor.pid\n"
           "  emperor run examples/vassals --http 127.0.0.1:8080   (the front door: apps by name)\n",
    "status": "example:\n  emperor status            (the one Emperor running here)\n"
              "  emperor status --json --dir examples/vassals\n",
    "reload": "example:\n  emperor reload app1       (exits 0 once a new process serves)\n",
    "stop": "example:\n  emperor stop app1         (stays stopped until `emperor start app1`"
            " or its file changes)\n",
    "start": "example:\n  emperor start app1        (exits 0 once it serves)\n",
    "prove": "example:\n  emperor prove -j2 -r -I lib t/    (prove's verdicts, tests forked from one"
             " preloaded base)\n",
    "reopen-logs": "example:\n  emperor reopen-logs       (logrotate's postrotate: reopen every log file)\n"
                   "  emperor reopen-logs --pidfile /tmp/emperor.pid   (by signal)\n",
    "nginx-conf": "example:\n  emperor nginx-conf examples/vassals > /etc/nginx/psgi-routing.conf"
                  "   (then: emperor run examples/vassals --nginx-include"
                  " /etc/nginx/psgi-routing.conf --nginx-reload 'nginx -s reload')\n",
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


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("psgi-forkserver")
    except PackageNotFoundError:
        ver = "unknown"
    p = argparse.ArgumentParser(prog="emperor", description="psgi-forkserver Emperor: hosts many "
                                "Plack apps forked from one preloaded Perl base",
                                epilog=MAIN_EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s (psgi-forkserver) {ver}")
    sub = p.add_subparsers(dest="command", required=True)
    run = _sub(sub, "run", help="run the vassals of a directory")
    run.add_argument("vassals_dir", metavar="VASSALS_DIR", type=Path)
    run.add_argument(
        "--use-fork-server", "--emperor-use-fork-server", dest="use_fork_server",
        metavar="SOCK", type=Path,
        help="adopt vassals through this fork-server socket",
    )
    run.add_argument(
        "--vassal-fork-base", dest="fork_bases", metavar="NAME", action="append", default=[],
        help="this vassal file is a base (repeatable); default: files with a fork-server key",
    )
    run.add_argument(
        "--vassal-binary", "--emperor-wrapper", dest="program", metavar="PATH",
        help="the vassal program (default: the installed ForkServer.pm)",
    )
    run.add_argument("--mercy", type=float, default=30.0, metavar="SECONDS",
                     help="graceful stop time before SIGKILL (default 30)")
    run.add_argument("--adopt-timeout", type=float, default=10.0, metavar="SECONDS",
                     help="wait this long for a fork server's reply (default 10)")
    run.add_argument("--template-timeout", type=float, default=5.0, metavar="SECONDS",
                     help="a vassal template still rendering after this long is stopped: "
                          "config-error (default: 5)")
    run.add_argument("--rescan-interval", type=float, default=10.0, metavar="SECONDS",
                     help="full rescan of the directory, besides inotify (default 10)")
    run.add_argument("--pidfile", type=Path, metavar="PATH",
                     help="write the Emperor's pid here (for `emperor reload-base`)")
    run.add_argument("--backoff-first", type=float, default=1.0, metavar="SECONDS",
                     help="crash loop: first restart delay, doubling (default 1)")
    run.add_argument("--backoff-max", type=float, default=180.0, metavar="SECONDS",
                     help="crash loop: longest restart delay (default 180)")
    run.add_argument("--stable-after", type=float, default=10.0, metavar="SECONDS",
                     help="a vassal that lived this long did not crash-loop (default 10)")
    run.add_argument("--reload-grace", type=float, default=1.0, metavar="SECONDS",
                     help="a new vassal that never sends byte 17 replaces the old one "
                          "this long after byte 1/5 (default 1)")
    run.add_argument("--deploy-parallel", type=int, default=4, metavar="N",
                     help="code deploy: vassals moved to the new base at a time (default 4)")
    run.add_argument("--adopt-parallel", type=int, default=8, metavar="N",
                     help="adoption requests in flight at once; the others queue (default 8)")
    run.add_argument("--emperor-sockets", dest="own_sockets", default=None,
                     action=argparse.BooleanOptionalAction,
                     help="bind each vassal's http-socket in the Emperor and pass it "
                          "(default: only with the built-in vassal program)")
    run.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="text: TIME emperor: [VASSAL] message; json: one object a line "
                          "(time, level, vassal, pid, event, message)")
    run.add_argument("--logto", type=Path, metavar="PATH",
                     help="the Emperor's log to this file (default stderr); "
                          "reopened by `emperor reopen-logs`")
    rl = _sub(sub, "reopen-logs", help="reopen every log file (--logto, logto keys), "
                                       "for logrotate")
    rl.add_argument("--pidfile", type=Path, metavar="PATH",
                    help="signal the Emperor of this --pidfile (SIGUSR2) instead of asking "
                         "on its stats socket")
    _add_finder(rl)
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
    for name, what in (("reload", "a new process for one vassal (gap-free when the Emperor "
                                  "owns its socket)"),
                       ("stop", "stop one vassal; it stays stopped until `start` or its file "
                                "changes"),
                       ("start", "run a stopped (or throttled) vassal again now")):
        c = _sub(sub, name, help=what)
        c.add_argument("name", metavar="NAME", help="the vassal (its file name without .ini)")
        _add_finder(c)
        c.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                       help="wait this long for the outcome (default 60)")
        c.add_argument("--no-wait", dest="wait", action="store_false",
                       help="exit once the Emperor took the command")
    add_prove_command(sub)
    return p


def is_emperor(pid: int) -> bool:
    """Whether `pid` runs `emperor run` (its command line)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return False
    for i, a in enumerate(argv[:3]):
        if os.path.basename(a) == "emperor" or a.endswith("psgi_forkserver.cli"):
            return "run" in argv[i + 1:]
    return False


def signal_emperor(pidfile: Path, sig: signal.Signals, command: str) -> int | None:
    """`sig` to the Emperor of `pidfile`, only once it is sure to be one (a
    stale pidfile may name any process by now): its pid, or None with the
    reason printed."""
    try:
        pid = int(pidfile.read_text().strip())
        held = pidfile_is_held(pidfile)
    except (OSError, ValueError) as e:
        print(f"emperor: {command}: {pidfile}: {getattr(e, 'strerror', None) or e}",
              file=sys.stderr)
        return None
    if not held or not is_emperor(pid):
        why = "no Emperor holds it" if not held else f"pid {pid} is not an Emperor"
        print(f"emperor: {command}: {pidfile}: stale pidfile ({why}); nothing signalled",
              file=sys.stderr)
        return None
    try:
        os.kill(pid, sig)
    except OSError as e:
        print(f"emperor: {command}: pid {pid}: {e.strerror}", file=sys.stderr)
        return None
    print(f"emperor: {command}: signalled pid {pid}", flush=True)
    return pid


def reopen_logs(args: argparse.Namespace) -> int:
    """`emperor reopen-logs`: SIGUSR2 with --pidfile, else the command on
    the stats socket (whose reply says which files could not be reopened)."""
    if args.pidfile is not None:
        return 0 if signal_emperor(args.pidfile, signal.SIGUSR2, "reopen-logs") else 1
    from .status import fetch_command

    stats = _find(args, "reopen-logs")
    if stats is None:
        return 1
    try:
        reply = fetch_command(stats, "reopen-logs")
    except (OSError, ValueError) as e:
        print(f"emperor: reopen-logs: {stats}: {getattr(e, 'strerror', None) or e}",
              file=sys.stderr)
        return 1
    print(f"emperor: reopen-logs: {reply.get('message')}",
          file=sys.stdout if reply.get("ok") else sys.stderr, flush=True)
    return 0 if reply.get("ok") else 1


WAIT_POLL = 0.25  # --wait: seconds between two looks at the stats document


def reload_base(pidfile: Path, wait: bool = False, stats: Path | None = None,
                timeout: float = 300.0) -> int:
    """SIGUSR1 to the Emperor of `pidfile`, only once it is sure to be one
    (a stale pidfile may name any process by now); with `wait`, follow the
    deploy on the stats socket until it ends (the document's
    `emperor.deploy`, see bases.py).

    Which deploy is ours: `requests` counts the SIGUSR1s the Emperor
    handled; ours is the first deploy whose `request` is past the count
    read before signalling (a request that arrives while the same new
    generation is still starting shares that deploy)."""
    if wait and stats is None:
        print("emperor: reload-base: --wait needs the Emperor's stats socket (--stats)",
              file=sys.stderr)
        return 2
    before = 0
    if wait:
        try:
            before = _deploy_doc(stats)["requests"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"emperor: reload-base: {stats}: {e}", file=sys.stderr)
            return 1
    if signal_emperor(pidfile, signal.SIGUSR1, "reload-base") is None:
        return 1
    if not wait:
        return 0
    return _wait_deploy(stats, before, timeout)


def reload_base_by_socket(stats: Path, wait: bool, timeout: float) -> int:
    """`emperor reload-base` over the stats socket (no pidfile needed)."""
    from .status import fetch_command

    try:
        reply = fetch_command(stats, "reload-base")
    except (OSError, ValueError) as e:
        print(f"emperor: reload-base: {stats}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"emperor: reload-base: {reply.get('message')}", file=sys.stderr)
        return 1
    print(f"emperor: reload-base: {reply.get('message')}", flush=True)
    if not wait:
        return 0
    return _wait_deploy(stats, reply["requests"] - 1, timeout)


def _wait_deploy(stats: Path, before: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        try:
            doc = _deploy_doc(stats)
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"emperor: reload-base: {stats}: {e}", file=sys.stderr)
            return 1
        last = doc.get("last")
        if last is not None and last.get("request", 0) > before and last.get("finished"):
            return _outcome(last)
        time.sleep(WAIT_POLL)
    state = f" (last seen: {last['state']}, generation {last['generation']})" if last else ""
    print(f"emperor: reload-base: no outcome within {timeout:g} s{state}", file=sys.stderr)
    return 1


def _deploy_doc(stats: Path) -> dict[str, Any]:
    from .status import fetch

    deploy = fetch(stats)["emperor"]["deploy"]
    if not isinstance(deploy, dict):
        raise ValueError("this Emperor does not report deploys")
    return deploy


def _outcome(d: dict[str, Any]) -> int:
    what = (f"generation {d['generation']}: {d['state']}, {d['moved']} moved, "
            f"{len(d['failed'])} failed, {d['duration_s']:.2f} s")
    if d["state"] == "done":
        print(f"emperor: reload-base: {what}")
        return 0
    why = d.get("reason") or "; ".join(f"{n}: {r}" for n, r in d["failed"].items())
    print(f"emperor: reload-base: {what}: {why}", file=sys.stderr)
    return 1


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
    args = build_parser().parse_args(argv)
    if args.command == "reload-base":
        if args.pidfile is not None:
            stats = args.stats
            if args.wait and stats is None:
                stats = _find(args, "reload-base", quiet=True)
            return reload_base(args.pidfile, args.wait, stats, args.timeout)
        stats = _find(args, "reload-base")
        if stats is None:
            return 1
        return reload_base_by_socket(stats, args.wait, args.timeout)
    if args.command == "reopen-logs":
        return reopen_logs(args)
    if args.command == "status":
        return status_command(args)
    if args.command == "nginx-conf":
        return nginx_conf_command(args)
    if args.command in ("reload", "stop", "start"):
        return control_command(args)
    if args.command == "prove":
        return prove_command(args)
    vdir: Path = args.vassals_dir
    bad = check_paths(args) or check_front(args)
    if bad is not None:
        print(f"emperor: {bad}", file=sys.stderr)
        return 2
    program = args.program or str(paths.vassal_program())
    if os.sep in program:
        program = os.path.abspath(program)
    use_fs = args.use_fork_server.resolve() if args.use_fork_server else None
    from .logs import Log

    try:
        log = Log(fmt=args.log_format, path=args.logto.absolute() if args.logto else None)
    except OSError as e:
        print(f"emperor: --logto {e}", file=sys.stderr)
        return 2
    opts = Options(
        log=log,
        vassals_dir=vdir.absolute(),  # not resolved: a symlink flipped to a new directory is followed
        program=program,
        use_fork_server=use_fs,
        fork_bases=tuple(args.fork_bases),
        mercy=args.mercy,
        adopt_timeout=args.adopt_timeout,
        template_timeout=args.template_timeout,
        rescan_interval=args.rescan_interval,
        backoff_first=args.backoff_first,
        backoff_max=args.backoff_max,
        stable_after=args.stable_after,
        reload_grace=args.reload_grace,
        deploy_parallel=max(1, args.deploy_parallel),
        adopt_parallel=max(1, args.adopt_parallel),
        own_sockets=args.own_sockets,
        pidfile=args.pidfile.resolve() if args.pidfile else None,
        run_dir=run_dir_of(args),
        front=front_options(args),
    )
    emperor = Emperor(opts)
    try:
        emperor.claim()  # locks and pidfile first: a second Emperor stops here
    except StartupError as e:
        print(f"emperor: {e}", file=sys.stderr)
        return 2
    from .status import RUN_DIR_ENV, run_dir

    # the vassals (the base, and so every adopted one) learn where to write
    # their requests files (status.read_requests)
    os.environ[RUN_DIR_ENV] = str(run_dir().absolute())
    try:
        opts.status = bind_status(args)  # before anything starts: errors exit 2
    except (OSError, ValueError) as e:
        emperor.release()
        if emperor.opts.pidfile is not None:
            emperor.opts.pidfile.unlink(missing_ok=True)
        msg = e.strerror if isinstance(e, OSError) and e.strerror else e
        print(f"emperor: {msg}", file=sys.stderr)
        return 2
    return emperor.run()


# -- the front door: `run --http/--nginx-include`, `emperor nginx-conf` -------


def add_front_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--run-dir", type=Path, metavar="DIR",
                     help="sockets of vassals with `domain` and the front door's files "
                          "(default: the default stats socket's directory, "
                          "/run/psgi-forkserver/HASH of VASSALS_DIR as root)")
    run.add_argument("--http", metavar="HOST:PORT",
                     help="the front door: run nginx on this address, routing by Host name "
                          "(the vassals' `domain` keys)")
    run.add_argument("--nginx-include", type=Path, metavar="PATH",
                     help="keep this nginx include file (upstreams and a $host map) up to date")
    run.add_argument("--nginx-reload", metavar="COMMAND",
                     help="run this shell command after each change of --nginx-include")
    run.add_argument("--nginx", metavar="PATH", help="the nginx binary (default: from PATH)")
    run.add_argument("--http-access-log", default=True, action=argparse.BooleanOptionalAction,
                     help="nginx's access log in the Emperor's log, prefixed [front] (default: on)")
    run.add_argument("--nginx-keepalive", type=int, default=DEFAULT_KEEPALIVE, metavar="N",
                     help=f"idle connections nginx keeps open per vassal (default "
                          f"{DEFAULT_KEEPALIVE}; 0: one connection per request)")


def run_dir_of(args: argparse.Namespace) -> Path:
    from .frontdoor import default_run_dir

    if getattr(args, "run_dir", None) is not None:
        return Path(os.path.abspath(args.run_dir))
    return default_run_dir(args.vassals_dir)


def check_front(args: argparse.Namespace) -> str | None:
    """The first front-door option of `emperor run` that cannot work, or None."""
    from .frontdoor import check_listen, find_nginx
    from .sockets import MAX_UNIX_PATH

    run_dir = run_dir_of(args)
    # the longest socket path it will hold must fit in a sockaddr_un
    # the longest path it will hold (sockets.auto_socket_path: h-HASH.sock)
    if len(os.fsencode(str(run_dir / "sockets" / "h-0123456789abcdef.sock"))) > MAX_UNIX_PATH:
        return f"--run-dir {run_dir}: too long for UNIX socket paths under it"
    if args.run_dir is not None or args.http is not None or args.nginx_include is not None:
        # asked for: it must work now (otherwise it is made when a vassal
        # with `domain` first needs a socket, and a failure is that vassal's)
        try:
            run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        except OSError as e:
            return f"--run-dir {run_dir}: {e.strerror or e}"
    if args.http is not None:
        nginx = args.nginx or find_nginx()
        if nginx is None or not os.access(nginx, os.X_OK):
            return f"--http: nginx not found{f' at {args.nginx}' if args.nginx else ''} " \
                   "(apt-get install nginx)"
        bad = check_listen(args.http)
        if bad is not None:
            return f"--http {args.http}: {bad}"
    if args.nginx_include is not None:
        parent = Path(os.path.abspath(args.nginx_include)).parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            return f"--nginx-include {args.nginx_include}: cannot create files in {parent}"
    if args.nginx_reload is not None and args.nginx_include is None:
        return "--nginx-reload needs --nginx-include"
    return None


def front_options(args: argparse.Namespace):
    from .frontdoor import FrontDoorOptions, find_nginx

    if args.http is None and args.nginx_include is None:
        return None
    return FrontDoorOptions(
        run_dir=run_dir_of(args), listen=args.http,
        include=Path(os.path.abspath(args.nginx_include)) if args.nginx_include else None,
        reload_cmd=args.nginx_reload, nginx=args.nginx or find_nginx(),
        keepalive=max(0, args.nginx_keepalive), access_log=args.http_access_log,
        backoff_first=args.backoff_first, backoff_max=min(30.0, args.backoff_max),
        stable_after=args.stable_after,
    )


def static_routes(vassals_dir: Path, run_dir: Path):
    """The routes `emperor run` would serve once every vassal is up: each
    file read and judged as the Emperor reads it, names claimed in name
    order (the first keeps a name); (routes, one line per refused file)."""
    from . import config as cfgmod
    from .frontdoor import Route, nginx_target
    from .sockets import wanted_address

    claimed: dict[str, str] = {}
    routes, errors = [], []
    selector = cfgmod.BaseSelector()
    for name, path in sorted(cfgmod.discover(vassals_dir).items()):
        cfg = cfgmod.load(path, judge=True)
        if cfg is None:
            continue
        if cfg.error:
            errors.append(f"{name}: {cfg.error}")
            continue
        if selector.is_base(cfg):
            continue
        domains = sorted({d.lower() for d in cfg.get_all("domain")})
        taken = [d for d in domains if d in claimed]
        if taken:
            errors.append(f"{name}: domain {taken[0]} is already served by vassal {claimed[taken[0]]}")
            continue
        want = wanted_address(cfg, run_dir / "sockets")
        if not domains or want is None:
            continue
        claimed.update((d, name) for d in domains)
        routes.append(Route(name, tuple(domains), nginx_target(want[0]),
                            protocol="uwsgi" if cfg.get("socket") else "http"))
    return routes, errors


def nginx_conf_command(args: argparse.Namespace) -> int:
    from .frontdoor import render_routing

    vdir: Path = args.vassals_dir
    if not vdir.is_dir():
        print(f"emperor: nginx-conf: {vdir}: not a directory", file=sys.stderr)
        return 2
    routes, errors = static_routes(vdir.resolve(), run_dir_of(args))
    for e in errors:
        print(f"emperor: nginx-conf: {e}", file=sys.stderr)
    sys.stdout.write(render_routing(routes, max(0, args.keepalive)))
    return 0


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
    _add_finder(st)
    st.add_argument("--json", action="store_true", help="print the JSON document as is")
    st.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")


def bind_status(args: argparse.Namespace):
    """The status server with its sockets bound. Without --stats, the
    default socket in the run directory: one that cannot be opened there
    is one line on stderr, not a reason to keep the fleet down."""
    from .status import StatusServer, default_stats_path

    stats = args.stats
    if stats is None:
        stats = default_stats_path(args.vassals_dir)
        why = None
        try:
            stats.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
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
    return StatusServer(
        stats_path=stats, http=args.status_http, http_public=args.status_http_public,
    ).bind()


def _find(args: argparse.Namespace, what: str, quiet: bool = False) -> Path | None:
    """The stats socket a client command talks to (--stats, --dir, or the
    only Emperor running here); None after saying why not."""
    if args.stats is not None:
        return args.stats
    from .status import find_stats

    try:
        return find_stats(args.vassals_dir)
    except ValueError as e:
        if not quiet:
            print(f"emperor: {what}: {e}", file=sys.stderr)
        return None


#: states in which a started (or reloaded) vassal serves
SERVING = ("loyal", "running", "on-demand")


def control_command(args: argparse.Namespace) -> int:
    """`emperor reload|stop|start NAME`: ask, then follow the vassal in the
    stats document until the outcome; print it, exit 1 if it did not happen."""
    from .status import fetch, fetch_command

    cmd, name = args.command, args.name
    stats = _find(args, cmd)
    if stats is None:
        return 1
    try:
        reply = fetch_command(stats, cmd, name)
    except (OSError, ValueError) as e:
        print(f"emperor: {cmd}: {stats}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"emperor: {cmd} {name}: {reply.get('message')}", file=sys.stderr)
        return 1
    print(f"emperor: {cmd} {name}: {reply.get('message')}", flush=True)
    if not args.wait or reply.get("command") == "reload-base":
        return 0
    before = reply.get("vassal") or {}
    deadline = time.monotonic() + args.timeout
    v: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            v = fetch(stats)["vassals"].get(name) or {}
        except (OSError, ValueError, KeyError) as e:
            print(f"emperor: {cmd} {name}: {stats}: {e}", file=sys.stderr)
            return 1
        state = v.get("state")
        err = v.get("last_error")
        new_error = err and err != before.get("last_error")
        if cmd == "stop" and state == "stopped":
            print(f"emperor: stop {name}: stopped ({v.get('last_exit') or 'no process'})")
            return 0
        if cmd != "stop":
            pid = v.get("pid")
            fresh = cmd == "start" or pid != before.get("pid") or state == "on-demand"
            if state in SERVING and fresh and not v.get("other_pids"):
                print(f"emperor: {cmd} {name}: {state}, pid {pid}")
                return 0
            # (the first document may be taken before the loop acted on
            # the command: "stopped" counts only once held again)
            if new_error or state == "config-error" or v.get("held"):
                print(f"emperor: {cmd} {name}: {state}: {v.get('error') or err or 'stopped again'}",
                      file=sys.stderr)
                return 1
        time.sleep(WAIT_POLL)
    print(f"emperor: {cmd} {name}: not done within {args.timeout:g} s (state {v.get('state')})",
          file=sys.stderr)
    return 1


def status_command(args: argparse.Namespace) -> int:
    import json

    from .status import fetch, format_table

    stats = _find(args, "status")
    if stats is None:
        return 1
    try:
        doc = fetch(stats, timeout=args.timeout)
    except (OSError, ValueError) as e:
        print(f"emperor: status: {stats}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        sys.stdout.write(format_table(doc))
    return 0


# -- prove: a Perl test harness forked from a preloaded base ---------------------


def add_prove_command(sub) -> None:
    pr = _sub(sub, "prove", help="run Perl test files forked from a preloaded base (prove's options)")
    pr.add_argument("paths", metavar="PATH", nargs="*", help="test files and directories (default: t)")
    pr.add_argument("-j", "--jobs", type=int, default=1, metavar="N", help="run N tests at once")
    pr.add_argument("-I", dest="includes", action="append", default=[], metavar="DIR",
                    help="library directory (in the base and in every test's @INC)")
    pr.add_argument("-M", dest="modules", action="append", default=[], metavar="MODULE",
                    help="preload MODULE, as prove's -M (imported into main)")
    pr.add_argument("--preload", action="append", default=[], metavar="FILE",
                    help="require FILE in the base before forking")
    pr.add_argument("-r", "--recurse", action="store_true", help="recurse into directories")
    pr.add_argument("-v", "--verbose", action="store_true", help="print every test's TAP")
    pr.add_argument("--timeout", type=float, metavar="SECONDS",
                    help="kill a test file that runs longer than this")
    pr.add_argument("--junit", type=Path, metavar="FILE", help="also write a JUnit XML report")
    pr.add_argument("--perl", default="perl", metavar="PATH", help="the perl to run (default: perl)")
    pr.add_argument("--watch", action="store_true",
                    help="keep the base; rerun test files when they change, and start a new "
                         "base (then rerun all) when a preloaded file changes")
    pr.add_argument("--serve", type=Path, metavar="SOCK",
                    help="keep a base and run the files `--connect SOCK` clients hand over "
                         "(for `prove --exec`)")
    pr.add_argument("--connect", type=Path, metavar="SOCK",
                    help="run the one test file PATH [ARGS] through `emperor prove --serve SOCK`: "
                         "prove --exec 'emperor prove --connect SOCK'")
    pr.add_argument("--destruct", action="store_true",
                    help="forked tests end with perl's global destruction of the whole "
                         "inherited heap (slower; default: only what the test created)")


def prove_command(args: argparse.Namespace) -> int:
    from .prove import ProveOptions, connect, main as prove_main

    if args.connect is not None:
        if not args.paths:
            print("emperor prove: --connect needs a test file", file=sys.stderr)
            return 2
        return connect(args.connect, args.paths[0], args.paths[1:], perl=args.perl)
    serve = args.serve.resolve() if args.serve else None
    return prove_main(watch=args.watch, serve=serve, opts=ProveOptions(
        paths=args.paths, jobs=max(1, args.jobs), includes=args.includes, modules=args.modules,
        preloads=args.preload, recurse=args.recurse, verbose=args.verbose,
        timeout=args.timeout, junit=args.junit, perl=args.perl, destruct=args.destruct,
    ))


if __name__ == "__main__":
    sys.exit(main())
